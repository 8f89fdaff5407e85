"""The automatic generator against the official one, live, on the *trained* bundled
checkpoint loaded into both (the official classes take our weights by their own names):
real photos and synthetic scenes, default filters and a multi-crop setting with small-region
cleanup. Every official mask is matched one-to-one by one of ours."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator

from amg import AutomaticMaskGenerator
from amg.compare import match_records
from model import load_checkpoint
from schemas.annotate import DEFAULT_CHECKPOINT
from tests.official import build_official, pixels_off_threshold
from training.synthetic import make_scene

# A comparison of near-empty results proves nothing: at least this many official masks.
MIN_MASKS = {"photo": 12, "synthetic": 24}


@pytest.fixture(scope="module")
def models():
    ours, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    official = build_official(ours.config)
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), official.eval()


@pytest.fixture(scope="module")
def images():
    photo = Image.open("examples/images/chelsea.jpg").convert("RGB")
    photo.thumbnail((320, 320))
    return {"photo": np.asarray(photo), "synthetic": make_scene(seed=2024, size=(240, 320)).image}


# The bundled model is small and unsure of itself: its predicted IoUs sit around 0.3-0.6 and
# no mask passes the official 0.88 / 0.95 here. The filters stay on, at thresholds where the
# photo keeps 127 (default) / 224 (multicrop) masks and the scene 101 / 171 (measured), so
# every stage is compared.
FILTERS = dict(pred_iou_thresh=0.1, stability_score_thresh=0.1)
SETTINGS = {
    "default": dict(points_per_side=16, **FILTERS),
    "multicrop": dict(points_per_side=12, crop_n_layers=1, min_mask_region_area=40, **FILTERS),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("image_name", ["photo", "synthetic"])
def test_same_masks_as_official_with_trained_weights(models, images, setting, image_name):
    ours, official = models
    image = images[image_name]
    kwargs = dict(SETTINGS[setting], output_mode="coco_rle")
    torch.manual_seed(0)
    theirs = SamAutomaticMaskGenerator(official, **kwargs).generate(image)
    mine = AutomaticMaskGenerator(ours, **kwargs).generate(image)
    assert len(theirs) >= MIN_MASKS[image_name], f"only {len(theirs)} official masks"
    result = match_records(mine, theirs)
    assert len(mine) == len(theirs) == result["matched"]
    # Every pair at mask IoU >= 0.99, but for a rounding flip: one pixel of a 90-pixel mask
    # whose official logit is 8.8e-6 (the kernels' sums run in another order; seen on an AVX2
    # machine) leaves IoU 0.989. Such a pair must differ only where the official logits lie
    # within float error of the threshold.
    below = [(i, j) for (i, j), v in zip(result["pairs"], result["ious"]) if v < 0.99]
    assert len(below) <= 1, f"{len(below)} masks under IoU 0.99"
    for i, j in below:
        assert pixels_off_threshold(official, image, mine[i], theirs[j]) < 1e-4
    assert result["equal_rle"] >= 0.95 * len(theirs)
