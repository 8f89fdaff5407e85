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
from model import Sam, get_config
from model.checkpoint import load_weights
from tests.official import build_official, pixels_off_threshold, randomize
from training.synthetic import make_scene

# Random weights: the same weights go into both generators. Random weights give low
# predicted IoUs and unstable masks, so the IoU and stability filters are off here and
# NMS is loose, which leaves enough distinct masks to compare the whole pipeline
# (grid, crops, filters, NMS, cleanup, RLE) record by record.
LOOSE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.99, crop_nms_thresh=0.99)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = get_config("vit_tiny256")
    official = build_official(config)
    randomize(official, seed=5)
    ours = Sam(config).eval()
    load_weights(ours, official.state_dict())
    return ours, official


@pytest.fixture(scope="module")
def images():
    photo = Image.open("examples/images/coffee.jpg").convert("RGB")
    photo.thumbnail((320, 320))
    return {"photo": np.asarray(photo), "synthetic": make_scene(seed=12345, size=(240, 320)).image}


SETTINGS = {
    "default": dict(points_per_side=16, **LOOSE),
    "multicrop": dict(points_per_side=12, crop_n_layers=1, min_mask_region_area=40, **LOOSE),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("image_name", ["photo", "synthetic"])
def test_same_masks_as_official(models, images, setting, image_name):
    ours, official = models
    image = images[image_name]
    kwargs = dict(SETTINGS[setting], output_mode="coco_rle")
    theirs = SamAutomaticMaskGenerator(official, **kwargs).generate(image)
    mine = AutomaticMaskGenerator(ours, **kwargs).generate(image)
    assert len(theirs) >= 5, "too few masks for a meaningful comparison"
    result = match_records(mine, theirs)
    assert len(mine) == len(theirs)
    assert result["matched"] == len(theirs)
    assert result["min_iou"] >= 0.99
    # Record by record (one per prompt here): the same masks but for pixels whose official
    # logit is within float rounding of the threshold. With ~10 masks a fraction of equal
    # RLEs says little; this says why any two differ (one pixel of one mask flips on some
    # CPUs' kernels, not on others).
    for a, b in zip(sorted(mine, key=lambda r: r["point_coords"]), sorted(theirs, key=lambda r: r["point_coords"])):
        assert a["crop_box"] == b["crop_box"] and abs(a["area"] - b["area"]) <= 0.001 * b["area"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-4
        assert pixels_off_threshold(official, image, a, b) < 1e-4
    assert result["equal_rle"] >= 0.9 * len(theirs)


def test_records_agree_with_pycocotools(models, images):
    ours, _ = models
    image = images["synthetic"]
    kw = dict(points_per_side=16, **LOOSE)
    records = AutomaticMaskGenerator(ours, output_mode="coco_rle", **kw).generate(image)
    binary = AutomaticMaskGenerator(ours, output_mode="binary_mask", **kw).generate(image)
    raw = AutomaticMaskGenerator(ours, output_mode="uncompressed_rle", **kw).generate(image)
    assert len(records) == len(binary) == len(raw) >= 5
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
        assert rec["crop_box"] == [0, 0, image.shape[1], image.shape[0]]


def test_masks_are_made_and_filtered_in_pixel_bounded_chunks(models, images, monkeypatch):
    """The candidates of a larger image are filtered and made into masks fewer at a time
    (amg.decode's pixel budgets bound the memory), with the same records as in big chunks."""
    import amg.decode

    ours, _ = models
    image = np.asarray(Image.fromarray(images["synthetic"]).resize((960, 720), Image.BILINEAR))
    kw = dict(points_per_side=6, output_mode="coco_rle", **LOOSE)
    whole = AutomaticMaskGenerator(ours, **kw).generate(image)
    pixels = image.shape[0] * image.shape[1]
    monkeypatch.setattr(amg.decode, "UPSAMPLE_PIXELS", 3 * pixels + 1)
    monkeypatch.setattr(amg.decode, "FILTER_PIXELS", 5 * pixels)
    made, filtered = [], []
    to_rle, filter_chunk = amg.decode.masks_to_rle_counts, amg.decode.filter_chunk
    monkeypatch.setattr(amg.decode, "masks_to_rle_counts", lambda masks: made.append(len(masks)) or to_rle(masks))
    monkeypatch.setattr(amg.decode, "filter_chunk",
                        lambda model, low_res, *a: filtered.append(len(low_res)) or filter_chunk(model, low_res, *a))
    chunked = AutomaticMaskGenerator(ours, **kw).generate(image)
    assert len(whole) >= 5
    assert max(made) == 3 and sum(made) == len(whole)
    assert max(filtered) == 5 and sum(filtered) == 3 * 36
    key = lambda r: (r["point_coords"], r["predicted_iou"])  # noqa: E731
    assert sorted(chunked, key=key) == sorted(whole, key=key)


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


def test_point_grids_alone_replace_the_default_side():
    """point_grids given without points_per_side is one grid source, not two: the default 32
    gives way (also over a checkpoint's recommended points_per_side). Both given is an error."""
    params = AmgParams(point_grids=[[[0.5, 0.5]]])
    assert params.points_per_side is None and [g.tolist() for g in params.grids()] == [[[0.5, 0.5]]]
    assert params.over({"points_per_side": 16, "pred_iou_thresh": 0.5}).points_per_side is None
    assert AmgParams.model_validate({"points_per_side": None, "point_grids": [[[0.5, 0.5]]]}) == params
    for side in (32, 8):
        with pytest.raises(ValidationError, match="points_per_side and point_grids are both given: give one of them"):
            AmgParams(points_per_side=side, point_grids=[[[0.5, 0.5]]])
    with pytest.raises(ValidationError, match="one of points_per_side or point_grids must be given"):
        AmgParams(points_per_side=None, point_grids=None)


def test_explicit_point_grid(models, images):
    ours, _ = models
    grid = [[(x, y) for y in np.linspace(0.1, 0.9, 8) for x in np.linspace(0.1, 0.9, 8)]]
    records = AutomaticMaskGenerator(ours, points_per_side=None, point_grids=grid, **LOOSE).generate(
        images["synthetic"])
    assert len(records) > 0
    allowed = {(round(x * 320, 6), round(y * 240, 6)) for x, y in grid[0]}
    assert all((round(r["point_coords"][0][0], 6), round(r["point_coords"][0][1], 6)) in allowed for r in records)


def test_mixed_block_groups_give_the_same_records(models, images, monkeypatch):
    """Logits as rough as random weights' leave most blocks mixed, and the exact evaluation
    holds memory per mixed pixel: it runs in groups of at most amg.upsample.MIXED_PIXELS such
    pixels. A budget of one pixel (every candidate a group of its own) gives the records of
    one group per chunk."""
    import amg.upsample

    ours, _ = models
    kwargs = dict(LOOSE, points_per_side=16, output_mode="coco_rle")
    whole = AutomaticMaskGenerator(ours, **kwargs).generate(images["photo"])
    sizes = []
    groups = amg.upsample.Blocks.groups
    monkeypatch.setattr(amg.upsample.Blocks, "groups",
                        lambda self, *a, **k: sizes.append(len(out := groups(self, *a, **k))) or out)
    monkeypatch.setattr(amg.upsample, "MIXED_PIXELS", 1)
    split = AutomaticMaskGenerator(ours, **kwargs).generate(images["photo"])
    assert len(whole) >= 5 and split == whole
    assert max(sizes) > 10  # candidates evaluated one by one
