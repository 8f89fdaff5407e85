"""The auto-annotation graph on Ray Data, top to bottom.

    listing (uri, size, etag) minus inputs a previous run already finished
      -> read + hash + decode + validate      CPU tasks             actors.reader
      -> exact / near-duplicate detection     1 actor               actors.dedup
      -> encode -> decode -> post-process     fused: 1 actor pool   actors.annotator
                                              split: encoder pool (GPU), decoder pool (GPU),
                                                     post-process CPU tasks
      -> commit a chunk per batch             writer actor(s)       actors.writer
      -> one summary row per input, consumed here as it streams

Every input row flows to the writer, whatever its fate (see actors.batch), so each input
ends in exactly one of the annotations, duplicates or quarantine tables. Ray Data streams
blocks with backpressure: the dataset is never held in memory.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pyarrow.compute as pc
import ray

from actors.annotator import FUNNEL, Annotator, Decoder, Encoder, postprocess_batch
from actors.dedup import Deduplicator
from actors.reader import read_images
from actors.writer import Writer
from dataset import DatasetWriter, storage_options
from dataset.lineage import file_sha256, listing_hash, new_lineage
from schemas.annotate import AnnotateConfig

from .progress import committed_state
from .sources import list_inputs

STAGES = ("read", "dedup", "encode", "decode", "postprocess", "write")


def build(ds: ray.data.Dataset, config: AnnotateConfig, lineage: dict, committed: list, device: str) -> ray.data.Dataset:
    """Append the annotation stages to a dataset of listing rows; returns the summary stream."""
    amg = config.amg.model_dump()
    gpu = device == "cuda"
    model_args = (config.checkpoint, config.model_type, device, config.precision, amg)

    def pool(p, **extra):
        return dict(concurrency=(p.min, p.max), batch_size=p.batch_size, num_cpus=p.num_cpus,
                    num_gpus=p.num_gpus if p.num_gpus is not None else (1 if gpu else 0),
                    resources=p.resources or None, **extra)

    ds = ds.map_batches(read_images, batch_size=config.read_batch_size, num_cpus=config.read_num_cpus,
                        fn_kwargs=dict(limits=config.limits.model_dump(), endpoint_url=config.endpoint_url))
    ds = ds.map_batches(Deduplicator, fn_constructor_args=(committed, config.near_duplicate_distance),
                        concurrency=1, num_cpus=0, batch_size=config.read_batch_size)
    if config.fused(device):
        ds = ds.map_batches(Annotator, **pool(config.encoder, fn_constructor_args=model_args, fn_constructor_kwargs=dict(
            num_threads=int(config.encoder.num_cpus), endpoint_url=config.endpoint_url)))
    else:
        ds = ds.map_batches(Encoder, **pool(config.encoder, fn_constructor_args=model_args, fn_constructor_kwargs=dict(
            num_threads=int(config.encoder.num_cpus), endpoint_url=config.endpoint_url,
            embedding_dtype=config.embedding_dtype)))
        ds = ds.map_batches(Decoder, **pool(config.decoder, fn_constructor_args=model_args, fn_constructor_kwargs=dict(
            num_threads=int(config.decoder.num_cpus), endpoint_url=config.endpoint_url)))
        ds = ds.map_batches(postprocess_batch, num_cpus=config.postprocess_num_cpus, batch_size=1,
                            fn_kwargs=dict(amg=amg))
    return ds.map_batches(Writer, fn_constructor_args=(config.output, lineage, config.endpoint_url),
                          concurrency=config.writers, num_cpus=0, batch_size=config.chunk_images)


def run(config: AnnotateConfig, log=print) -> dict[str, Any]:
    """Annotate config.input into the dataset at config.output; returns the run summary.
    Needs a connected Ray (ray.init)."""
    t0 = time.perf_counter()
    device = config.resolved_device(ray.cluster_resources().get("GPU", 0))
    listing = list_inputs(config.input, config.endpoint_url)
    lineage = new_lineage(round=config.round, stage="auto", params=config.model_dump(
        mode="json", include={"amg", "model_type", "precision", "near_duplicate_distance", "limits"}),
        checkpoint_hash=_checkpoint_hash(config), run_id=config.run_id,
        listing_hash=listing_hash(listing.to_pylist()))
    options = storage_options(config.output, config.endpoint_url)
    done_uris, committed = committed_state(config.output, options)
    todo = listing.filter(pc.invert(pc.is_in(listing["uri"], value_set=done_uris)))
    log(f"run {lineage.run_id}: {listing.num_rows} inputs in {config.input}, {listing.num_rows - todo.num_rows} "
        f"already done, {todo.num_rows} to go -> {config.output} ({device}, "
        f"{'fused' if config.fused(device) else 'split'} stages)")

    writer = DatasetWriter(config.output, lineage, mode="append", options=options)
    writer.start_run([{**r, "listing_hash": lineage.listing_hash, "run_id": lineage.run_id} for r in listing.to_pylist()])
    summary = _summarize([], config, lineage.run_id, listing.num_rows, device)
    if todo.num_rows:
        blocks = [todo.slice(i, config.read_batch_size) for i in range(0, todo.num_rows, config.read_batch_size)]
        ds = build(ray.data.from_arrow(blocks), config, lineage.model_dump(), committed, device)
        rows = []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows.extend(_summary_rows(batch))
        summary = _summarize(rows, config, lineage.run_id, listing.num_rows, device)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["already_done"] = listing.num_rows - todo.num_rows
    _write_summary(config, summary)
    summary["report"] = _write_report(config, log)
    return summary


def _checkpoint_hash(config: AnnotateConfig) -> str:
    return "" if config.checkpoint.startswith(("s3://", "s3a://")) else file_sha256(config.checkpoint)


def _summary_rows(batch: dict) -> list[dict]:
    n = len(batch["uri"])
    return [{k: (batch[k][i] if k in batch else None) for k in ("uri", "status", "reason", "masks", "funnel",
                                                                  *(f"t_{s}" for s in STAGES))} for i in range(n)]


def _summarize(rows: list[dict], config: AnnotateConfig, run_id: str, listed: int, device: str) -> dict[str, Any]:
    counts = Counter(r["status"] for r in rows)
    funnel = Counter()
    for r in rows:
        funnel.update(json.loads(r["funnel"]) if r["funnel"] else {})
    busy = {s: float(sum(r[f"t_{s}"] or 0.0 for r in rows)) for s in STAGES}
    annotated = counts.get("annotated", 0)
    return {
        "run_id": run_id, "input": config.input, "output": config.output, "device": device,
        "fused_stages": config.fused(device), "listed": listed, "processed": len(rows),
        "annotated": annotated, "duplicate": counts.get("duplicate", 0), "quarantined": counts.get("quarantined", 0),
        "masks": int(sum(int(r["masks"] or 0) for r in rows)),
        "quarantine_reasons": dict(Counter(str(r["reason"]).split(":")[0] for r in rows if r["status"] == "quarantined")),
        "funnel": {k: int(funnel.get(k, 0)) for k in (*FUNNEL, "kept")},
        # busy seconds of each stage summed over its workers, and images per busy second:
        # the per-worker throughput that capacity planning scales from.
        "stage_seconds": {s: round(v, 3) for s, v in busy.items()},
        "stage_images_per_s": {s: round(len(rows) / v, 3) if v > 0 else None for s, v in busy.items()},
    }


def _write_summary(config: AnnotateConfig, summary: dict) -> None:
    """<output>/runs/<run_id>.json, beside the tables (local or S3)."""
    from .sources import is_s3, s3_filesystem

    path = f"{config.output.rstrip('/')}/runs/{summary['run_id']}.json"
    text = json.dumps(summary, indent=2, sort_keys=True)
    if is_s3(path):
        s3_filesystem(config.endpoint_url).pipe_file(path.split("://", 1)[1], text.encode())
    else:
        import os
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _write_report(config: AnnotateConfig, log) -> str | None:
    """The data-quality report of the dataset as this run left it (dashboards/); a failure
    is logged as a warning and never fails the run."""
    try:
        from dashboards import write_report

        return write_report(config.output, endpoint_url=config.endpoint_url)
    except Exception as e:
        log(f"warning: data-quality report not written: {type(e).__name__}: {e}")
        return None
