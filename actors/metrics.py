"""Live metrics of a running pipeline, through `ray.util.metrics`: they show in the Ray
dashboard and on each node's Prometheus endpoint (names prefixed `ray_` there).

The writer sees every input row last, with its final status, masks, funnel and the busy
seconds of every stage it went through (`t_<stage>`), so it records all of them in one call
(`record`); no other actor needs to. The metric objects are created on first use, inside
the worker process that records (creating them needs a connected Ray worker).

    samengine_images_total{status}              inputs finished: annotated, duplicate, quarantined,
                                                already_committed (by another writer)
    samengine_quarantined_total{reason}         quarantined inputs by reason (text before ':')
    samengine_masks_kept_total                  masks written
    samengine_funnel_masks_total{step}          candidates left after each step of the automatic stage:
                                                candidates, iou, stability, crop_edge, kept
    samengine_filter_dropped_total{filter}      candidates each filter removed: iou, stability,
                                                crop_edge, nms_cleanup
    samengine_stage_seconds{stage}              histogram: busy seconds per image of each stage
    samengine_masks_per_image                   histogram: masks kept per annotated image
"""
from __future__ import annotations

import json
import logging

import numpy as np

STAGES = ("read", "dedup", "encode", "decode", "postprocess", "write")
FUNNEL_STEPS = ("candidates", "iou", "stability", "crop_edge", "kept")
# Each filter's drops = survivors before it - survivors after it.
FILTERS = (("iou", "candidates", "iou"), ("stability", "iou", "stability"),
           ("crop_edge", "stability", "crop_edge"), ("nms_cleanup", "crop_edge", "kept"))
SECONDS_BOUNDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
MASKS_BOUNDS = [1, 5, 10, 25, 50, 100, 200, 500, 1000]

_metrics: dict | None = None
_log = logging.getLogger(__name__)


def _create() -> dict:
    from ray.util.metrics import Counter, Histogram

    return {
        "images": Counter("samengine_images", "Inputs finished, by final status.", tag_keys=("status",)),
        "quarantined": Counter("samengine_quarantined", "Quarantined inputs, by reason.", tag_keys=("reason",)),
        "masks": Counter("samengine_masks_kept", "Masks written to the dataset."),
        "funnel": Counter("samengine_funnel_masks", "Candidate masks left after each step of the automatic stage.",
                          tag_keys=("step",)),
        "dropped": Counter("samengine_filter_dropped", "Candidate masks removed by each filter.",
                           tag_keys=("filter",)),
        "seconds": Histogram("samengine_stage_seconds", "Busy seconds per image of each pipeline stage.",
                             boundaries=SECONDS_BOUNDS, tag_keys=("stage",)),
        "masks_per_image": Histogram("samengine_masks_per_image", "Masks kept per annotated image.",
                                     boundaries=MASKS_BOUNDS),
    }


def metrics() -> dict:
    """The metric objects of this process, created on first call."""
    global _metrics
    if _metrics is None:
        _metrics = _create()
    return _metrics


def record(batch: dict) -> None:
    """Record the writer's output rows (status, reason, masks, funnel JSON, t_<stage>).
    Never raises: live metrics must not cost a chunk."""
    try:
        _record(batch, metrics())
    except Exception as e:  # pragma: no cover - a metrics backend problem is only logged
        _log.warning("samengine metrics not recorded: %s: %s", type(e).__name__, e)


def _record(batch: dict, m: dict) -> None:
    status = [str(s) for s in batch["status"]]
    for s in set(status):
        m["images"].inc(status.count(s), tags={"status": s})
    reasons = [str(r).split(":")[0] for r, s in zip(batch.get("reason", [""] * len(status)), status)
               if s == "quarantined"]
    for r in set(reasons):
        m["quarantined"].inc(reasons.count(r), tags={"reason": r or "unknown"})

    annotated = [i for i, s in enumerate(status) if s == "annotated"]
    masks = np.asarray(batch.get("masks", np.zeros(len(status))), np.int64)
    if annotated:
        kept = int(masks[annotated].sum())
        if kept:
            m["masks"].inc(kept)
        for i in annotated:
            m["masks_per_image"].observe(int(masks[i]))

    funnel = dict.fromkeys(FUNNEL_STEPS, 0)
    for text in batch.get("funnel", ()):
        for k, v in (json.loads(text) if text else {}).items():
            if k in funnel:
                funnel[k] += int(v)
    if funnel["candidates"]:
        for step, n in funnel.items():
            if n:
                m["funnel"].inc(n, tags={"step": step})
        for name, before, after in FILTERS:
            if funnel[before] - funnel[after] > 0:
                m["dropped"].inc(funnel[before] - funnel[after], tags={"filter": name})

    for stage in STAGES:
        for t in np.asarray(batch.get(f"t_{stage}", ()), np.float64):
            if t > 0:  # 0: the row skipped this stage (already a duplicate or quarantined)
                m["seconds"].observe(float(t), tags={"stage": stage})
