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
blocks with backpressure: the dataset is never held in memory. One run writes a dataset
root at a time: a run holds the root's writer lease (pipeline.lease) while it writes, and
every commit it makes is fenced by that lease.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.annotator import FUNNEL, Annotator, Decoder, Encoder, postprocess_batch
from actors.dedup import Deduplicator
from actors.reader import read_images
from actors.writer import ALREADY_COMMITTED, Writer
from amg import checkpoint_defaults
from dataset import DatasetWriter, storage_options
from dataset.lineage import file_sha256, listing_hash, new_lineage
from model.footprint import GIB
from schemas.annotate import AnnotateConfig

from .lease import LeaseLost, WriterLease
from .pools import describe, gpus_per_actor, pool_roles, scaling_hint, size_pools, unplaceable
from .progress import committed_state
from .sources import InputError, check_output, list_inputs

STAGES = ("read", "dedup", "encode", "decode", "postprocess", "write")


def build(ds: ray.data.Dataset, config: AnnotateConfig, lineage: dict, committed: list, device: str,
          lease_token: str, text_embeddings: list[list[float]] | None = None) -> ray.data.Dataset:
    """Append the annotation stages to a dataset of listing rows; returns the summary stream.
    lease_token: the run's writer lease (WriterLease.token), which fences the writers' commits;
    text_embeddings: the vectors of config.text (see text_vectors)."""
    amg = config.amg.model_dump()
    model_args = (config.checkpoint, config.model_type, device, config.precision, amg)
    text = dict(texts=config.text, text_embeddings=text_embeddings) if config.text else {}

    def pool(p, **extra):
        if p.max == "auto" or p.memory_gb is None:
            raise ValueError("the model pools are sized first (pipeline.pools.size_pools)")
        memory = {"memory": int(p.memory_gb * GIB)} if p.memory_gb else {}
        return dict(compute=ray.data.ActorPoolStrategy(min_size=p.min, max_size=p.max), batch_size=p.batch_size,
                    num_cpus=p.num_cpus, num_gpus=gpus_per_actor(p, device),
                    resources=p.resources or None, **memory, **extra)

    ds = ds.map_batches(read_images, batch_size=config.read_batch_size, num_cpus=config.read_num_cpus,
                        resources=config.read_resources or None,
                        fn_kwargs=dict(limits=config.limits.model_dump(), endpoint_url=config.endpoint_url))
    ds = ds.map_batches(Deduplicator, fn_constructor_args=(committed, config.near_duplicate_distance),
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0, batch_size=config.read_batch_size)
    if config.fused(device):
        ds = ds.map_batches(Annotator, **pool(config.encoder, fn_constructor_args=model_args, fn_constructor_kwargs=dict(
            num_threads=int(config.encoder.num_cpus), endpoint_url=config.endpoint_url,
            encoder_precision=config.encoder_precision, **text)))
    else:
        ds = ds.map_batches(Encoder, **pool(config.encoder, fn_constructor_args=model_args, fn_constructor_kwargs=dict(
            num_threads=int(config.encoder.num_cpus), endpoint_url=config.endpoint_url,
            embedding_dtype=config.embedding_dtype, encoder_precision=config.encoder_precision)))
        ds = ds.map_batches(Decoder, **pool(config.decoder, fn_constructor_args=model_args, fn_constructor_kwargs=dict(
            num_threads=int(config.decoder.num_cpus), endpoint_url=config.endpoint_url, **text)))
        ds = ds.map_batches(postprocess_batch, num_cpus=config.postprocess_num_cpus, batch_size=1,
                            resources=config.postprocess_resources or None,
                            fn_kwargs=dict(amg=amg))
    return ds.map_batches(Writer, fn_constructor_args=(config.output, lineage, config.endpoint_url, config.replace,
                                                       lease_token),
                          compute=ray.data.ActorPoolStrategy(size=config.writers), num_cpus=0,
                          batch_size=config.chunk_images)


def run(config: AnnotateConfig, log=print, lease: WriterLease | None = None,
        listing: pa.Table | None = None) -> dict[str, Any]:
    """Annotate config.input into the dataset at config.output; returns the run summary.
    Needs a connected Ray (ray.init). The run holds the root's writer lease (pipeline.lease)
    from before it reads what the dataset holds until its last write: a second run on the
    same root meanwhile is refused (LeaseHeld, an InputError). lease: one the caller holds
    already (a rebuild, around its own writes); listing: the inputs' listing the caller
    decided by (a rebuild: an object changed after it is left to the next rebuild, not
    recorded as done with its old annotations kept)."""
    t0 = time.perf_counter()
    check_output(config.output, config.endpoint_url)
    # Inputs and the checkpoint are read before the lease is taken: a run refused for
    # either makes nothing at the output (reading needs no lease).
    if listing is None:
        listing = list_inputs(config.input, config.endpoint_url)
    config = with_checkpoint_defaults(config, log)
    # The run id is chosen first, so that the lease names the run.
    config = config.model_copy(update={"run_id": config.run_id or uuid.uuid4().hex})
    if lease is not None:
        lease.name_run(config.run_id)
        return _run(config, listing, log, lease, t0)
    with WriterLease(config.output, config.endpoint_url, run_id=config.run_id, log=log) as lease:
        return _run(config, listing, log, lease, t0)


def _run(config: AnnotateConfig, listing: pa.Table, log, lease: WriterLease, t0: float) -> dict[str, Any]:
    gpus = ray.cluster_resources().get("GPU", 0)
    device = config.resolved_device(gpus)
    if device.startswith("cuda") and not gpus:
        log(f"warning: device {device} but the cluster has no GPU now: the GPU workers wait until GPU nodes join")
    text_embeddings = text_vectors(config) if config.text else None
    lineage = new_lineage(round=config.round, stage="auto", params=config.model_dump(
        mode="json", include={"amg", "model_type", "precision", "encoder_precision", "near_duplicate_distance", "limits", "text"}),
        checkpoint_hash=_checkpoint_hash(config), run_id=config.run_id,
        listing_hash=listing_hash(listing.to_pylist()))
    options = storage_options(config.output, config.endpoint_url)
    done_uris, committed = committed_state(config.output, options, lineage.run_id if config.replace else None)
    todo = listing.filter(pc.invert(pc.is_in(listing["uri"], value_set=done_uris)))
    log(f"run {lineage.run_id}: {listing.num_rows} inputs in {config.input}, {listing.num_rows - todo.num_rows} "
        f"already done, {todo.num_rows} to go -> {config.output} ({device}, "
        f"{'fused' if config.fused(device) else 'split'} stages)")

    hint = scaling_hint(config, device, ray.cluster_resources())
    nodes = ray.nodes()
    config = size_pools(config, device, nodes, model_config(config))
    if todo.num_rows:
        for line in [describe(config, device), *unplaceable(config, device, nodes), *([hint] if hint else [])]:
            log(line)
    tally = Tally()
    if todo.num_rows:  # a run with nothing to do writes nothing
        writer = DatasetWriter(config.output, lineage, mode="append", options=options, fence=lease.confirm)
        writer.start_run([{**r, "listing_hash": lineage.listing_hash, "run_id": lineage.run_id}
                          for r in listing.to_pylist()])
        blocks = [todo.slice(i, config.read_batch_size) for i in range(0, todo.num_rows, config.read_batch_size)]
        ds = build(ray.data.from_arrow(blocks), config, lineage.model_dump(), committed, device, lease.token,
                   text_embeddings)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                tally.add(batch)
                lease.check()  # taken over by another run (a heartbeat stalled): stop writing
        except Exception:
            try:
                lease.confirm()  # a writer refused to commit for a lost lease: say so in one line
            except LeaseLost:
                raise
            except Exception:  # the store cannot be read either: the run's own error says more
                pass
            raise
    summary = _summarize(tally, config, lineage.run_id, listing.num_rows, device)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["already_done"] = listing.num_rows - todo.num_rows
    if summary["processed"]:
        _write_summary(config, summary)
    summary["report"] = _write_report(config, log) if summary["processed"] else None
    return summary


def with_checkpoint_defaults(config: AnnotateConfig, log=print) -> AnnotateConfig:
    """config with the generator settings its checkpoint recommends (amg.checkpoint_defaults)
    under the ones given by flag or file: what the run records and uses. Official
    checkpoints recommend none. InputError when the checkpoint cannot be read."""
    from model.checkpoint import local_checkpoint
    from model import CheckpointError, read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(local_checkpoint(config.checkpoint, config.endpoint_url), config.model_type)
    except (CheckpointError, OSError) as e:
        raise checkpoint_error(config.checkpoint, e) from e
    defaults = {k: v for k, v in checkpoint_defaults(meta).items() if k not in config.amg.model_fields_set}
    if not defaults:
        return config
    log("generator settings recommended by the checkpoint (a flag overrides each): "
        + ", ".join(f"{k}={v}" for k, v in sorted(defaults.items())))
    return config.model_copy(update={"amg": config.amg.over(defaults)})


def model_config(config: AnnotateConfig):
    """The config (model.SamConfig) of the run's checkpoint; InputError when it cannot be read."""
    from model.checkpoint import local_checkpoint
    from model import CheckpointError, read_checkpoint_config

    try:
        return read_checkpoint_config(local_checkpoint(config.checkpoint, config.endpoint_url), config.model_type)
    except (CheckpointError, OSError) as e:
        raise checkpoint_error(config.checkpoint, e) from e


def checkpoint_error(checkpoint: str, error: Exception) -> InputError:
    """The one-line error of a checkpoint that cannot be read, naming it once (checkpoint
    errors start with the file's path; a fetched S3 checkpoint's path is the local copy's)."""
    from model.checkpoint import checkpoint_problem

    return InputError(f"checkpoint {checkpoint_problem(checkpoint, error)}")


def text_vectors(config: AnnotateConfig) -> list[list[float]]:
    """config.text embedded once, here, by the embedder the checkpoint was trained with;
    InputError when the checkpoint has no text input."""
    from model.text import embed_texts, load_embedder

    model = model_config(config)
    if not model.takes_text:
        raise InputError(f"checkpoint {config.checkpoint} has no text prompt input: text prompts need one "
                         "trained for them (jobs/train_text.py)")
    vectors = embed_texts(load_embedder(model.text_embedder), config.text, model.text_embed_dim)
    return vectors.tolist()


def _checkpoint_hash(config: AnnotateConfig) -> str:
    return "" if config.checkpoint.startswith(("s3://", "s3a://")) else file_sha256(config.checkpoint)


class Tally:
    """Running totals of the summary rows as they stream out (nothing kept per input)."""

    def __init__(self):
        self.status, self.reasons, self.funnel = Counter(), Counter(), Counter()
        self.busy = dict.fromkeys(STAGES, 0.0)
        self.nodes: dict[str, set[str]] = {}
        self.rows = self.masks = 0

    def add(self, batch: dict) -> None:
        self.rows += len(batch["uri"])
        self.status.update(str(s) for s in batch["status"])
        self.reasons.update(str(r).split(":")[0] for r, s in zip(batch["reason"], batch["status"]) if s == "quarantined")
        self.masks += int(sum(int(m) for m in batch.get("masks", ())))
        for f in batch.get("funnel", ()):
            if f:
                self.funnel.update(json.loads(f))
        for stage in STAGES:
            if f"t_{stage}" in batch:
                self.busy[stage] += float(sum(batch[f"t_{stage}"]))
            if f"node_{stage}" in batch:
                self.nodes.setdefault(stage, set()).update(str(n) for n in batch[f"node_{stage}"] if n)


def _summarize(tally: Tally, config: AnnotateConfig, run_id: str, listed: int, device: str) -> dict[str, Any]:
    return {
        "run_id": run_id, "input": config.input, "output": config.output, "device": device,
        "fused_stages": config.fused(device), "listed": listed, "processed": tally.rows,
        "annotated": tally.status.get("annotated", 0), "duplicate": tally.status.get("duplicate", 0),
        "quarantined": tally.status.get("quarantined", 0), "masks": tally.masks,
        # images another run had committed meanwhile (the writer wrote nothing for them)
        "already_committed": tally.status.get(ALREADY_COMMITTED, 0),
        "quarantine_reasons": dict(tally.reasons),
        "funnel": {k: int(tally.funnel.get(k, 0)) for k in (*FUNNEL, "kept")},
        # busy seconds of each stage summed over its workers, and images per busy second:
        # the per-worker throughput that capacity planning scales from.
        "stage_seconds": {s: round(v, 3) for s, v in tally.busy.items()},
        "stage_images_per_s": {s: round(tally.rows / v, 3) if v > 0 else None for s, v in tally.busy.items()},
        "stage_nodes": {s: sorted(v) for s, v in tally.nodes.items()},  # Ray node ids each stage ran on
        # the model pools as sized for the run (pipeline.pools): bounds and what each actor asked
        "model_pools": {name: getattr(config, name).model_dump(include={"min", "max", "num_cpus", "num_gpus",
                                                                         "memory_gb"})
                        for name in pool_roles(config, device)},
    }


def _write_summary(config: AnnotateConfig, summary: dict) -> None:
    """<output>/runs/<run_id>.json, beside the tables (local or S3)."""
    from dataset.storage import RUNS_DIR, is_s3

    from .sources import s3_filesystem

    path = f"{config.output.rstrip('/')}/{RUNS_DIR}/{summary['run_id']}.json"
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
