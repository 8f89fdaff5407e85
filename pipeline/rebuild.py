"""Scheduled rebuilds of a dataset from its source, incremental or full.

Incremental: list the source and compare each object's size and ETag (mtime for local
files) with the last listing the dataset recorded; only objects that differ are hashed,
and only those whose content really changed lose their old rows. Then the normal resumable
run annotates what is new or changed. Unchanged images keep their rows and the Parquet
files holding them: the new version shares every untouched file.

Full: re-annotate every listed input (a new checkpoint or new parameters), replacing each
image's row as its chunk commits, so readers of the latest version always see every image
once. Its run id is derived from the checkpoint and parameters, so rerunning the same full
rebuild resumes it and, once complete, changes nothing.

Both are idempotent: a second run finds nothing to do and writes nothing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable

from dataset.lineage import sha256_hex
from dataset.maintenance import vacuum
from dataset.storage import arrow_dataset, is_delta_table, storage_options, table_uri
from dataset.writer import METADATA_KEY, writer_properties
from schemas.annotate import AnnotateConfig

from .lease import WriterLease
from .sources import list_inputs, read_bytes

RECORD_TABLES = ("annotations", "duplicates", "quarantine")
IN_LIST = 500  # URIs per DELETE predicate


@dataclass
class Changes:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # content differs: old rows go, the object is redone
    touched: list[str] = field(default_factory=list)  # size/ETag differ, content the same: nothing to do
    deleted: list[str] = field(default_factory=list)  # recorded before, gone from the source now


def _table(root: str, name: str, columns: list[str], options: dict[str, str]) -> pa.Table | None:
    uri = table_uri(root, name)
    if not is_delta_table(uri, options):
        return None
    return arrow_dataset(DeltaTable(uri, storage_options=options), uri, options).to_table(columns=columns)


def last_listing(root: str, options: dict[str, str]) -> dict[str, tuple]:
    """uri -> (size, etag) as the most recent run that listed it saw the object."""
    listing = _table(root, "listing", ["uri", "size", "etag", "run_id"], options)
    lineage = _table(root, "lineage", ["run_id", "created_at"], options)
    if listing is None or lineage is None or listing.num_rows == 0:
        return {}
    rows = listing.join(lineage, "run_id").sort_by([("created_at", "ascending")]).to_pylist()
    return {r["uri"]: (r["size"], r["etag"]) for r in rows}  # later runs overwrite earlier ones


def recorded_ids(root: str, options: dict[str, str]) -> dict[str, str | None]:
    """uri -> the image_id the dataset holds for it (annotations, duplicates or quarantine)."""
    out: dict[str, str | None] = {}
    for name in RECORD_TABLES:
        t = _table(root, name, ["uri", "image_id"], options)
        if t is not None:
            out.update(zip(t["uri"].to_pylist(), t["image_id"].to_pylist()))
    return out


def find_changes(config: AnnotateConfig, listing: pa.Table, options: dict[str, str]) -> Changes:
    before = last_listing(config.output, options)
    ids = recorded_ids(config.output, options)
    changes = Changes()
    for row in listing.to_pylist():
        uri = row["uri"]
        if uri not in ids:
            changes.new.append(uri)
        elif uri in before and before[uri] != (row["size"], row["etag"]):
            data = read_bytes(uri, max_bytes=config.limits.max_bytes, endpoint_url=config.endpoint_url)
            same = ids[uri] == hashlib.sha256(data).hexdigest()
            (changes.touched if same else changes.changed).append(uri)
    listed = set(listing["uri"].to_pylist())
    changes.deleted = sorted(u for u in ids if u not in listed)
    return changes


def orphaned_duplicates(root: str, stale: list[str], listed: set[str], options: dict[str, str]) -> list[str]:
    """Listed inputs recorded as duplicates of an image whose rows go with `stale` (changed or
    pruned at the source). Without their original they are examined again (their records go
    too): the old bytes of a changed file under another name, or a renamed file whose old
    name is pruned, would otherwise be lost from the dataset."""
    if not stale:  # nothing goes: no table is read
        return []
    images = _table(root, "annotations", ["uri", "image_id"], options)
    dups = _table(root, "duplicates", ["uri", "duplicate_of"], options)
    if images is None or dups is None:
        return []
    going = set(stale)
    gone = {i for u, i in zip(images["uri"].to_pylist(), images["image_id"].to_pylist()) if u in going}
    return sorted(u for u, of in zip(dups["uri"].to_pylist(), dups["duplicate_of"].to_pylist())
                  if of in gone and u in listed and u not in going)


def delete_records(root: str, uris: list[str], options: dict[str, str], reason: str,
                   keep_run: str | None = None, *, fence: Callable[[], None] | None = None) -> int:
    """Delete the rows of these URIs from the three record tables (one commit per table and
    batch of URIs); with keep_run, rows written by that run stay. fence: called right before
    each commit, raises to refuse it (a rebuild's WriterLease.confirm). Returns rows deleted."""
    deleted = 0
    for name in RECORD_TABLES:
        uri = table_uri(root, name)
        if not uris or not is_delta_table(uri, options):
            continue
        dt = DeltaTable(uri, storage_options=options)
        for start in range(0, len(uris), IN_LIST):
            quoted = ", ".join("'" + u.replace("'", "''") + "'" for u in uris[start:start + IN_LIST])
            predicate = f"uri IN ({quoted})"
            if keep_run is not None:
                predicate += f" AND (run_id IS NULL OR run_id <> '{keep_run}')"
            if fence is not None:
                fence()
            metrics = dt.delete(predicate, writer_properties=writer_properties(name), commit_properties=CommitProperties(
                custom_metadata={METADATA_KEY: {"maintenance": "rebuild", "table": name, "reason": reason}}))
            deleted += int(metrics.get("num_deleted_rows", 0))
    return deleted


def full_rebuild_run_id(config: AnnotateConfig, checkpoint_hash: str) -> str:
    """The same checkpoint and parameters give the same run id, so a rerun resumes."""
    params = config.model_dump_json(include={"amg", "model_type", "precision", "near_duplicate_distance", "limits"})
    return "full-" + sha256_hex(f"{checkpoint_hash}|{params}")[:24]


def rebuild(config: AnnotateConfig, *, full: bool = False, prune_deleted: bool = False,
            retention_hours: int | None = None, log=print) -> dict:
    """Run one rebuild; returns what it did. Needs a connected Ray. The rebuild holds the
    root's writer lease (pipeline.lease) from its first read to its last write (deletes,
    the run, the vacuum): a rebuild while another run writes the root is refused, and each
    of its writes is fenced by that lease (a rebuild whose lease another run took over stops
    with LeaseLost before its next delete, commit or vacuum)."""
    with WriterLease(config.output, config.endpoint_url, log=log) as lease:
        return _rebuild(config, full, prune_deleted, retention_hours, log, lease)


def _rebuild(config: AnnotateConfig, full: bool, prune_deleted: bool, retention_hours: int | None, log,
             lease: WriterLease) -> dict:
    from .graph import _checkpoint_hash, run

    options = storage_options(config.output, config.endpoint_url)
    listing = list_inputs(config.input, config.endpoint_url)
    report: dict = {"mode": "full" if full else "incremental", "listed": listing.num_rows}
    if full:
        run_id = full_rebuild_run_id(config, _checkpoint_hash(config))
        config = config.model_copy(update={"replace": True, "run_id": run_id})
        summary = run(config, log=log, lease=lease, listing=listing)
        # Inputs now recorded by this run lose what earlier runs recorded for them elsewhere
        # (an image now quarantined, a duplicate now kept, ...): one table per input.
        report["superseded_rows"] = delete_records(config.output, listing["uri"].to_pylist(), options,
                                                   "superseded by full rebuild", keep_run=run_id,
                                                   fence=lease.confirm)
    else:
        changes = find_changes(config, listing, options)
        report.update(new=len(changes.new), changed=len(changes.changed), touched=len(changes.touched),
                      deleted=len(changes.deleted))
        stale = changes.changed + (changes.deleted if prune_deleted else [])
        orphans = orphaned_duplicates(config.output, stale, set(listing["uri"].to_pylist()), options)
        report["requeued_duplicates"] = len(orphans)
        report["removed_rows"] = delete_records(config.output, stale + orphans, options,
                                                "changed or deleted at the source, or a duplicate of such",
                                                fence=lease.confirm)
        if changes.touched and not (changes.new or changes.changed):
            _record_listing(config, listing, options, lease.confirm)  # so the next rebuild does not hash them again
        summary = run(config, log=log, lease=lease, listing=listing)
    report["run"] = summary
    if retention_hours is not None:
        report["vacuumed_files"] = 0
        for name in ("annotations", "duplicates", "quarantine", "listing", "lineage"):
            if not is_delta_table(table_uri(config.output, name), options):
                continue  # a root not made by the pipeline (an import) may lack some tables
            lease.confirm()  # a vacuum deletes files: only while the lease is still this rebuild's
            report["vacuumed_files"] += len(vacuum(config.output, name, retention_hours=retention_hours,
                                                   options=options))
    return report


def _record_listing(config: AnnotateConfig, listing: pa.Table, options: dict[str, str],
                    fence: Callable[[], None]) -> None:
    from dataset import DatasetWriter
    from dataset.lineage import listing_hash, new_lineage

    lh = listing_hash(listing.to_pylist())
    lineage = new_lineage(round=config.round, stage="auto", listing_hash=lh)
    DatasetWriter(config.output, lineage, options=options, fence=fence).start_run(
        [{**r, "listing_hash": lh, "run_id": lineage.run_id} for r in listing.to_pylist()])
