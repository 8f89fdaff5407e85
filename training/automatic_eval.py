"""Held-out evaluation of automatic mode: the automatic mask generator's masks against
ground-truth instances, scored with class-agnostic COCO metrics (AR@100, AR@1000, AP)."""
from __future__ import annotations

from typing import Iterable

from amg import AmgParams, AutomaticMaskGenerator
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


def held_out_scenes(seed: int, count: int, size: int = 256):
    """Synthetic scenes of a seed that training does not use."""
    return (make_scene(scene_seed(seed, i), size) for i in range(count))
