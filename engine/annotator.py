"""The simulated annotator: a person replaced by ground truth, speaking the service's HTTP
protocol exactly as the page does, so the manual and semi-automatic stages run (and are
tested) without anyone at the screen.

Clicks follow the usual interactive-segmentation protocol (as in the SAM paper's
evaluation): the first click is a foreground point at the pixel deepest inside the object;
each later click goes to the pixel deepest inside the larger error region of the current
mask, foreground where the mask misses the object, background where it spills over. The
previous low-res logits go back with every click. The annotator stops at a target IoU or
after a click budget and accepts the best mask it saw, as a person would undo back to it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import requests
from pycocotools import mask as coco_mask
from scipy import ndimage

from amg.rle import coco_to_mask, to_coco_rle

from .labelstudio import brush_to_coco
from .semi_auto import brush_result


class EngineError(RuntimeError):
    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class EngineClient:
    """The service's JSON protocol over HTTP; keeps the latency of every click."""

    def __init__(self, base_url: str, timeout_s: float = 120.0):
        self.base = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = requests.Session()
        self.clicks: list[dict[str, float]] = []  # per predict: round_trip_ms, server_ms, encoded

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        r = self.http.request(method, self.base + path, json=body, timeout=self.timeout_s)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            raise EngineError(r.status_code, detail)
        return r.json()

    def images(self) -> dict:
        return self.call("GET", "/api/images")

    def open(self, index: int) -> dict:
        return self.call("POST", f"/api/images/{index}/open")

    def predict(self, **request: Any) -> dict:
        start = time.perf_counter()
        out = self.call("POST", "/api/predict", request)
        self.clicks.append({"round_trip_ms": (time.perf_counter() - start) * 1000, "server_ms": out["server_ms"],
                            "encoded": float(out["encoded"])})
        return out

    def commit(self, index: int, image_id: str, masks: list[dict]) -> dict:
        return self.call("POST", "/api/commit", {"index": index, "image_id": image_id, "masks": masks})

    def stats(self) -> dict:
        return self.call("GET", "/api/stats")


# -- ground truth -> clicks, coverage ---------------------------------------------------------------
def next_click(predicted: np.ndarray | None, truth: np.ndarray) -> tuple[float, float, int]:
    """(x, y, label) of the next click on H x W bool masks: the deepest pixel of the larger
    error region (label 1 inside a miss, 0 inside a spill); the object's deepest pixel
    when there is no mask yet or no error."""
    predicted = np.zeros_like(truth) if predicted is None else predicted
    best = (-1.0, 0, 0, 1)
    for region, label in ((truth & ~predicted, 1), (predicted & ~truth, 0)):
        if region.any():
            # Padding makes the image border count as the region's edge.
            depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(depth.argmax()), depth.shape)
            if depth[y, x] > best[0]:
                best = (float(depth[y, x]), int(x), int(y), label)
    if best[0] < 0:  # a perfect mask: confirm it with a click inside the object
        return next_click(None, truth)
    return float(best[1]), float(best[2]), best[3]


def best_ious(truth: np.ndarray, segmentations: Sequence[dict]) -> np.ndarray:
    """N: for each of N x H x W ground-truth masks, its best IoU with any of the masks."""
    if len(truth) == 0:
        return np.zeros(0)
    if len(segmentations) == 0:
        return np.zeros(len(truth))
    gt = [to_coco_rle(m) for m in truth]
    ious = coco_mask.iou(gt, [to_coco_rle(s) for s in segmentations], [0] * len(segmentations))
    return np.asarray(ious).reshape(len(truth), len(segmentations)).max(axis=1)


def coverage(truth: np.ndarray, segmentations: Sequence[dict]) -> float:
    """Mean over ground-truth objects of their best IoU with the masks: how much of the
    ground truth a set of masks gives an annotator for free."""
    return float(best_ious(truth, segmentations).mean()) if len(truth) else 1.0


def missing_objects(truth: np.ndarray, segmentations: Sequence[dict], covered_iou: float) -> list[int]:
    """Ground-truth objects no mask covers at covered_iou, largest first."""
    missing = np.flatnonzero(best_ious(truth, segmentations) < covered_iou)
    return sorted(missing.tolist(), key=lambda i: -int(truth[i].sum()))


# -- the annotator ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What clicking on one object gave: the accepted response and how it got there."""
    response: dict
    iou: float
    clicks: int
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class SimulatedAnnotator:
    def __init__(self, client: EngineClient, *, max_clicks: int = 5, target_iou: float = 0.9,
                 min_iou: float = 0.0, covered_iou: float = 0.5, max_objects: int | None = None):
        self.client = client
        self.max_clicks, self.target_iou, self.min_iou = max_clicks, target_iou, min_iou
        self.covered_iou, self.max_objects = covered_iou, max_objects

    def segment(self, index: int, image_id: str, truth: np.ndarray) -> Outcome:
        """Click on one object until the mask is good enough or the budget is spent."""
        points: list[tuple[float, float]] = []
        labels: list[int] = []
        low_res, predicted, best = None, None, None
        for click in range(1, self.max_clicks + 1):
            x, y, label = next_click(predicted, truth)
            points.append((x, y))
            labels.append(label)
            out = self.client.predict(index=index, image_id=image_id, points=points, labels=labels,
                                      mask_input=low_res)
            low_res = out["low_res"]
            predicted = coco_to_mask(out["segmentation"])
            union = np.logical_or(predicted, truth).sum()
            iou = float(np.logical_and(predicted, truth).sum() / union) if union else 0.0
            if best is None or iou > best.iou:
                best = Outcome(out, iou, click, list(points), list(labels))
            if iou >= self.target_iou:
                break
        return best

    def objects_to_do(self, truth: np.ndarray, prefilled: Sequence[dict]) -> list[int]:
        todo = missing_objects(truth, prefilled, self.covered_iou)
        return todo[: self.max_objects] if self.max_objects is not None else todo

    def annotate(self, index: int, truth: np.ndarray) -> dict:
        """Open image `index`, keep its pre-filled masks, click the missing objects, commit.
        Returns the opened image, the outcomes per ground-truth object and the commit."""
        opened = self.client.open(index)
        prefilled = [p["segmentation"] for p in opened["prefill"]]
        outcomes = {}
        for obj in self.objects_to_do(truth, prefilled):
            outcome = self.segment(index, opened["image_id"], truth[obj])
            if outcome.iou >= self.min_iou and outcome.response["area"] > 0:
                outcomes[obj] = outcome
        masks = [{"segmentation": p["segmentation"], "point_coords": p["point_coords"],
                  "predicted_iou": p["predicted_iou"], "stability_score": p["stability_score"]}
                 for p in opened["prefill"]]
        masks += [{"segmentation": o.response["segmentation"], "point_coords": o.points,
                   "predicted_iou": o.response["score"]} for o in outcomes.values()]
        commit = self.client.commit(index, opened["image_id"], masks)
        return {"opened": opened, "outcomes": outcomes, "masks": masks, "commit": commit}

    def complete_task(self, task: dict, index: int, truth: np.ndarray) -> dict:
        """A Label Studio task finished as an annotator would in Label Studio with this
        service as its click tool: the pre-annotations kept, the missing objects added as
        brush masks. Returns the task with its annotation, as Label Studio exports it."""
        opened = self.client.open(index)
        if opened["image_id"] != task["data"]["image_id"]:
            raise ValueError(f"image {index} is not the task's image")
        kept = [dict(r) for p in task.get("predictions") or () for r in p["result"]]
        h, w = opened["height"], opened["width"]
        prefilled = [brush_to_coco(r["value"]["rle"], h, w) for r in kept]
        added = []
        for n, obj in enumerate(self.objects_to_do(truth, prefilled)):
            outcome = self.segment(index, opened["image_id"], truth[obj])
            if outcome.iou >= self.min_iou and outcome.response["area"] > 0:
                added.append(brush_result(outcome.response["segmentation"], f"added-{n}"))
        annotation = {"id": 1, "result": kept + added, "was_cancelled": False, "ground_truth": False,
                      "completed_by": 1}
        return {**task, "annotations": [annotation]}
