"""training.automatic_eval.candidate_ceiling: the recall an automatic generator's candidates
allow whatever the ranking, checked against a direct computation on binary masks and
against COCO's AR of the same candidates."""
from __future__ import annotations

import numpy as np
import pytest

from amg import AmgParams, AutomaticMaskGenerator
from model import load_checkpoint
from schemas.annotate import DEFAULT_CHECKPOINT
from training.automatic_eval import automatic_metrics, candidate_ceiling, held_out_scenes


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(DEFAULT_CHECKPOINT)[0].eval()


def test_ceiling_is_the_best_candidate_iou_of_each_instance(model):
    scenes = list(held_out_scenes(41, 3, 256))
    grid = AmgParams(points_per_side=8)
    out = candidate_ceiling(model, scenes, grid)

    # Directly: every candidate as a binary mask, mask IoU with each instance in numpy.
    everything = AutomaticMaskGenerator(model, AmgParams(points_per_side=8, pred_iou_thresh=0,
                                                         stability_score_thresh=0, box_nms_thresh=1.0))
    best, areas = [], []
    for scene in scenes:
        found = np.stack([r["segmentation"] for r in everything.generate(scene.image)]).reshape(-1, 256 * 256)
        truth = scene.masks.reshape(len(scene.masks), -1)
        inter = truth.astype(np.float64) @ found.T.astype(np.float64)
        union = truth.sum(1)[:, None] + found.sum(1)[None, :] - inter
        best += list((inter / union).max(1))
        areas += list(truth.sum(1))
    best, areas = np.array(best), np.array(areas)
    thresholds = np.linspace(0.5, 0.95, 10)
    assert out["instances"] == len(best) > 0 and out["candidates_per_image"] == 3 * 64
    assert out["ceiling"] == pytest.approx(np.mean([(best >= t).mean() for t in thresholds]))
    assert out["median_best_iou"] == pytest.approx(np.median(best))
    small = best[areas < 32**2]
    assert out["instances_small"] == len(small)
    if len(small):
        assert out["ceiling_small"] == pytest.approx(np.mean([(small >= t).mean() for t in thresholds]))
    assert 0 < out["ceiling"] <= 1

    # COCO's AR of the same candidates (one-to-one matching, scores as ranking) cannot exceed it.
    coco = automatic_metrics(model, scenes, AmgParams(points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0,
                                                      box_nms_thresh=1.0, output_mode="coco_rle"))
    assert coco["AR100"] <= coco["AR1000"] <= out["ceiling"] + 1e-9
