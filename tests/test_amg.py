"""Automatic mask generation: parameters, output records, and equivalence with the
official SamAutomaticMaskGenerator run live on the same trained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pydantic import ValidationError
from segment_anything import SamAutomaticMaskGenerator

from amg import AmgParams, AutomaticMaskGenerator
from amg.compare import match_records
from model import load_checkpoint
from tests.official import build_official
from training.synthetic import make_scene

CHECKPOINT = "checkpoints/samengine_tiny256.pt"


@pytest.fixture(scope="module")
def models():
    ours, _ = load_checkpoint(CHECKPOINT)
    official = build_official(ours.config)
    official.load_state_dict(ours.state_dict())
    return ours, official


@pytest.fixture(scope="module")
def images():
    photo = Image.open("examples/images/coffee.jpg").convert("RGB")
    photo.thumbnail((320, 320))
    return {"photo": np.asarray(photo), "synthetic": make_scene(seed=12345, size=(240, 320)).image}


SETTINGS = {
    "default": dict(points_per_side=16),
    "multicrop": dict(points_per_side=12, crop_n_layers=1, min_mask_region_area=40),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("image_name", ["photo", "synthetic"])
def test_same_masks_as_official(models, images, setting, image_name):
    ours, official = models
    image = images[image_name]
    kwargs = dict(SETTINGS[setting], output_mode="coco_rle")
    theirs = SamAutomaticMaskGenerator(official, **kwargs).generate(image)
    mine = AutomaticMaskGenerator(ours, **kwargs).generate(image)
    assert len(theirs) >= 10, "too few masks for a meaningful comparison"
    result = match_records(mine, theirs)
    assert len(mine) == len(theirs)
    assert result["matched"] == len(theirs)
    assert result["min_iou"] >= 0.99
    assert result["equal_rle"] >= 0.95 * len(theirs)


def test_records_agree_with_pycocotools(models, images):
    ours, _ = models
    image = images["synthetic"]
    records = AutomaticMaskGenerator(ours, points_per_side=16, output_mode="coco_rle").generate(image)
    binary = AutomaticMaskGenerator(ours, points_per_side=16, output_mode="binary_mask").generate(image)
    raw = AutomaticMaskGenerator(ours, points_per_side=16, output_mode="uncompressed_rle").generate(image)
    assert len(records) == len(binary) == len(raw) >= 10
    for rec, bin_rec, raw_rec in zip(records, binary, raw):
        rle = {"size": rec["segmentation"]["size"], "counts": rec["segmentation"]["counts"].encode()}
        decoded = coco_mask.decode(rle).astype(bool)
        assert np.array_equal(decoded, bin_rec["segmentation"])
        assert decoded.shape == image.shape[:2]
        assert rec["area"] == int(coco_mask.area(rle)) == int(decoded.sum())
        assert rec["bbox"] == coco_mask.toBbox(rle).tolist()
        assert sum(raw_rec["segmentation"]["counts"]) == image.shape[0] * image.shape[1]
        assert set(rec) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                            "stability_score", "crop_box"}
        assert rec["predicted_iou"] > 0.88 and rec["stability_score"] >= 0.95
        assert rec["crop_box"] == [0, 0, image.shape[1], image.shape[0]]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(points_per_side=0), "points_per_side"),
        (dict(points_per_batch=-1), "points_per_batch"),
        (dict(box_nms_thresh=1.5), "box_nms_thresh"),
        (dict(crop_n_layers=-1), "crop_n_layers"),
        (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"),
        (dict(min_mask_region_area=-5), "min_mask_region_area"),
        (dict(output_mode="png"), "output_mode"),
        (dict(stability_score_thresh=2.0), "stability_score_thresh"),
        (dict(points_per_sid=8), "points_per_sid"),
        (dict(points_per_side=None), "points_per_side or point_grids"),
        (dict(points_per_side=None, point_grids=[[[0.5, 0.5]]], crop_n_layers=1), "point_grids"),
        (dict(points_per_side=None, point_grids=[[[1.5, 0.5]]]), "normalized"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        AmgParams(**kwargs)


def test_explicit_point_grid(models, images):
    ours, _ = models
    grid = [[(x, y) for y in np.linspace(0.1, 0.9, 8) for x in np.linspace(0.1, 0.9, 8)]]
    a = AutomaticMaskGenerator(ours, points_per_side=None, point_grids=grid).generate(images["synthetic"])
    assert all(0 <= r["point_coords"][0][0] <= 320 for r in a)
    assert len(a) > 0


def test_precision_bf16_matches_fp32_closely(models, images):
    ours, _ = models
    image = images["synthetic"]
    fp32 = AutomaticMaskGenerator(ours, points_per_side=16, output_mode="coco_rle").generate(image)
    bf16 = AutomaticMaskGenerator(ours, points_per_side=16, output_mode="coco_rle",
                                  precision="bf16").generate(image)
    result = match_records(bf16, fp32)
    assert result["matched"] >= 0.8 * len(fp32)
    assert np.median(result["ious"]) >= 0.95
