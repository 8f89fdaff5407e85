"""The writer: each batch it receives is one chunk, committed to the dataset before the
call returns (quarantine and duplicate records first, then the images in one Delta
transaction), so whatever Ray Data has seen finish is durable. It hands back one small row
per input for the run summary: an image this run's rows hold is "annotated"; one whose row
another run had committed (the writer wrote nothing for it) is "already_committed".

Every commit is fenced by the run's writer lease (pipeline.lease.confirm): once another run
has taken the lease over, the writer refuses to commit, drops the batch and fails with
LeaseLost, and the driver ends the run with that one line."""
from __future__ import annotations

import json
import time
import uuid
from functools import partial

import numpy as np

from dataset import DatasetWriter
from pipeline.lease import confirm
from schemas import LineageRecord

from . import metrics
from .batch import DUPLICATE, OK, QUARANTINED, node_id, objects

ALREADY_COMMITTED = "already_committed"
SUMMARY_COLUMNS = ("uri", "status", "reason", "masks", "funnel", "t_read", "t_dedup", "t_encode", "t_decode",
                   "t_postprocess", "t_write")


class Writer:
    def __init__(self, root: str, lineage: dict, endpoint_url: str | None = None, replace: bool = False,
                 lease_token: str | None = None):
        """lease_token: the token of the run's writer lease (WriterLease.token), checked before
        each commit; None (a writer outside a pipeline run) commits unfenced."""
        self.lineage = LineageRecord(**lineage)
        fence = partial(confirm, root, endpoint_url, self.lineage.run_id, lease_token) if lease_token else None
        # Each writer numbers its chunks under its own app id, so several writers of one run
        # never mistake each other's chunks for their own. A full rebuild replaces rows.
        self.writer = DatasetWriter(root, self.lineage, mode="replace" if replace else "append",
                                    endpoint_url=endpoint_url,
                                    app_id=f"{self.lineage.run_id}/{uuid.uuid4().hex[:12]}", fence=fence)
        self.chunk = 0

    def __call__(self, batch: dict) -> dict:
        t = time.perf_counter()
        status, run_id = list(batch["status"]), self.lineage.run_id
        rows = range(len(status))
        self.writer.append("quarantine", [
            {"uri": str(batch["uri"][i]), "reason": str(batch["reason"][i]),
             "image_id": batch["image_id"][i] or None, "run_id": run_id}
            for i in rows if status[i] == QUARANTINED])
        self.writer.append("duplicates", [
            {"uri": str(batch["uri"][i]), "image_id": batch["image_id"][i], "duplicate_of": batch["duplicate_of"][i],
             "kind": batch["kind"][i], "distance": int(batch["distance"][i]), "run_id": run_id}
            for i in rows if status[i] == DUPLICATE])
        images = [
            {"image_id": batch["image_id"][i], "uri": str(batch["uri"][i]), "width": int(batch["width"][i]),
             "height": int(batch["height"][i]), "phash": batch["phash"][i] or None,
             "annotations": json.loads(batch["annotations"][i])}
            for i in rows if status[i] == OK]
        elsewhere: set[str] = set()
        if images:
            self.writer.commit_images(images, chunk=self.chunk)
            self.chunk += 1
            elsewhere = set(self.writer.already_committed)
        n = len(status)
        final = [s if s != OK else ALREADY_COMMITTED if batch["image_id"][i] in elsewhere else "annotated"
                 for i, s in enumerate(status)]
        out = {k: batch[k] for k in batch if k in SUMMARY_COLUMNS or k.startswith("node_")}
        out["t_write"] = np.full(n, (time.perf_counter() - t) / max(n, 1))
        out["node_write"] = objects([node_id()] * n)
        out["status"] = objects(final)
        if elsewhere and "masks" in out:  # masks written: none for those
            out["masks"] = np.where([s == ALREADY_COMMITTED for s in final], 0, out["masks"])
        metrics.record(out)  # live metrics (Ray dashboard / Prometheus): every row ends here
        return out
