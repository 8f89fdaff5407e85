"""The row format between stages: a batch is a dict of equal-length numpy arrays.

Every input row travels the whole graph, whatever happens to it, so that each input ends in
exactly one table. `status` says where it is going:

    ok           still being annotated (at the writer: an annotated image)
    duplicate    an exact or near duplicate of a kept image (duplicate_of, kind, distance)
    quarantined  could not be read, decoded or annotated (reason)

Stages only touch rows whose status is "ok" and pass the others through. Python objects
(images, embeddings, candidate masks, records) ride in object columns.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import numpy as np

OK, DUPLICATE, QUARANTINED = "ok", "duplicate", "quarantined"


def objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array of values (numpy would otherwise try to stack arrays)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def column(batch: dict[str, np.ndarray], name: str, default: Any = None) -> list[Any]:
    n = len(batch["uri"])
    return list(batch[name]) if name in batch else [default] * n


def quarantine(batch: dict[str, np.ndarray], i: int, reason: str) -> None:
    batch["status"][i] = QUARANTINED
    batch["reason"][i] = reason


def map_ok(batch: dict[str, np.ndarray], stage: str, fn: Callable[[int], None]) -> dict[str, np.ndarray]:
    """Call fn(i) for every row still "ok"; an exception quarantines that row alone with the
    stage and error as its reason. Adds the stage's busy seconds per row as t_<stage>."""
    batch["status"] = batch["status"].astype(object)
    batch["reason"] = batch["reason"].astype(object)
    seconds = np.zeros(len(batch["uri"]), dtype=np.float64)
    for i in ok_rows(batch):
        t = time.perf_counter()
        try:
            fn(i)
        except Exception as e:  # one bad image never stops the run
            quarantine(batch, i, f"{stage}_error: {type(e).__name__}: {e}"[:500])
        seconds[i] = time.perf_counter() - t
    batch[f"t_{stage}"] = seconds
    batch[f"node_{stage}"] = objects([node_id()] * len(seconds))
    return batch


def node_id() -> str:
    """The Ray node this code runs on ("" outside Ray): the summary reports where each stage ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def ok_rows(batch: dict[str, np.ndarray]) -> Iterator[int]:
    return (i for i, s in enumerate(batch["status"]) if s == OK)


def drop(batch: dict[str, np.ndarray], *names: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k not in names}
