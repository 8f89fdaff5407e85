"""Held-out evaluation of automatic mode: the automatic mask generator's masks against
ground-truth instances, scored with class-agnostic COCO metrics (AR@100, AR@1000, AP), and
the ceiling its candidates set on recall whatever the ranking."""
from __future__ import annotations

from typing import Iterable

import numpy as np
from pycocotools import mask as coco_mask

from amg import AmgParams, AutomaticMaskGenerator
from amg.rle import to_coco_rle
from model import Sam

from .evaluate import coco_metrics
from .synthetic import make_scene, scene_seed

# The generator's defaults, except that RLE output is what the metrics read.
EVAL_PARAMS = AmgParams(output_mode="coco_rle")


def automatic_metrics(model: Sam, scenes: Iterable, params: AmgParams = EVAL_PARAMS) -> dict[str, float]:
    """scenes: objects with .image (H x W x 3 uint8) and .masks (N x H x W bool)."""
    generator = AutomaticMaskGenerator(model, params)
    ids, gts, predictions = [], [], []
    for i, scene in enumerate(scenes):
        ids.append(i)
        gts.append(scene.masks)
        predictions.append(generator.generate(scene.image))
    metrics = coco_metrics(ids, gts, predictions)
    metrics["masks_per_image"] = sum(map(len, predictions)) / max(len(predictions), 1)
    return metrics


# COCO's area ranges (pixels of the ground-truth mask) and IoU thresholds 0.5:0.95.
SIZE_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, float("inf"))}
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def candidate_ceiling(model: Sam, scenes: Iterable, params: AmgParams = EVAL_PARAMS) -> dict[str, float]:
    """The recall that no filter, threshold or ranking can exceed: every candidate of the
    point grid (filters and NMS off; other settings from params, e.g. crop layers), and
    for each ground-truth instance the best mask IoU any of them reaches. "ceiling" is that
    recall averaged over IoU 0.5:0.95, as COCO's AR averages it (AR@100 <= AR@1000 <=
    ceiling), overall and per COCO size; with the median best IoU, recall at IoU 0.5 and
    instance counts, it tells candidate quality (the model's masks) apart from ranking
    (its IoU predictions and the thresholds)."""
    generator = AutomaticMaskGenerator(model, params.model_copy(update={
        "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0, "crop_nms_thresh": 1.0,
        "min_mask_region_area": 0, "output_mode": "coco_rle"}))
    best, areas, candidates, images = [], [], 0, 0
    for scene in scenes:
        records = generator.generate(scene.image)
        truth = [to_coco_rle(m) for m in scene.masks]
        found = [to_coco_rle(r["segmentation"]) for r in records]
        iou = np.asarray(coco_mask.iou(found, truth, [0] * len(truth))).reshape(len(found), len(truth))
        best += list(iou.max(0) if len(found) else np.zeros(len(truth)))
        areas += [float(coco_mask.area(t)) for t in truth]
        candidates, images = candidates + len(records), images + 1
    best, areas = np.asarray(best), np.asarray(areas)
    out = {"instances": len(best), "candidates_per_image": candidates / max(images, 1)}
    for name, (lo, hi) in {"all": (0, float("inf")), **SIZE_RANGES}.items():
        b = best[(areas >= lo) & (areas < hi)]
        suffix = "" if name == "all" else f"_{name}"
        out[f"ceiling{suffix}"] = float(np.mean([(b >= t).mean() for t in IOU_THRESHOLDS])) if len(b) else -1.0
        out[f"instances{suffix}"] = len(b)
        if name == "all":
            out["recall_at_0.5"] = float((b >= 0.5).mean()) if len(b) else -1.0
            out["median_best_iou"] = float(np.median(b)) if len(b) else -1.0
    return out


def held_out_scenes(seed: int, count: int, size: int = 256):
    """Synthetic scenes of a seed that training does not use."""
    return (make_scene(scene_seed(seed, i), size) for i in range(count))
