"""Committing a run to the dataset: one Delta transaction per chunk of images.

A chunk's Parquet files become visible only when its commit lands in `_delta_log`, so a
writer killed mid-chunk leaves the previous version as it was (its orphan files are
removed by `dataset.maintenance.vacuum`). Every commit carries the run's lineage in its
commit metadata under the key "samengine", and an image commit the rounds and stages its
masks have (an import may keep a file's own): how readers find the last version of a run
or round.

Two ways to keep a retried chunk from duplicating rows:
- mode="merge" (default): MERGE ... ON image_id WHEN NOT MATCHED INSERT. Safe whatever
  happened before and with several writers, but every commit scans the table's image_id
  column.
- mode="replace": MERGE ... ON image_id, updating rows that exist and inserting the rest:
  a full rebuild re-annotates images already in the table, one chunk at a time, so the
  latest version always holds every image once (old or new annotations).
- mode="append": skip images the writer knows are committed and make the commit
  idempotent per (app_id, chunk) with a Delta app transaction (app_id: the run id by default). Costs nothing per commit
  beyond the write; assumes no two writers commit the same image at the same time (each
  image goes to one writer), which is how the pipeline shards its input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake

from schemas import (
    IMAGES, TABLES, LineageRecord, annotation_id, assign_image_keys, natural_image_key, to_table,
)

from .storage import arrow_dataset, is_delta_table, storage_options, table_uri

# zstd level 3: within a few per cent of the best ratio on RLE strings at a fraction of the cost.
WRITER_PROPERTIES = WriterProperties(compression="ZSTD", compression_level=3)
# Images rows hold all their masks (tens of KB to MBs each): their row groups are counted in
# few rows, so that readers working a row group at a time (the report's sample, exports) hold
# little. delta-rs' default (a million rows) made a compacted file of 20,000 images one row
# group of 1.6M masks.
IMAGE_ROWS_PER_GROUP = 256
IMAGES_WRITER_PROPERTIES = WriterProperties(compression="ZSTD", compression_level=3,
                                            max_row_group_size=IMAGE_ROWS_PER_GROUP)


def writer_properties(table: str) -> WriterProperties:
    """How the files of a table (a TABLES name) are written."""
    return IMAGES_WRITER_PROPERTIES if table == "annotations" else WRITER_PROPERTIES
METADATA_KEY = "samengine"


def open_table(uri: str, schema: pa.Schema, options: dict[str, str]) -> DeltaTable:
    """The Delta table at uri, created empty with schema if there is none yet."""
    if not is_delta_table(uri, options):
        # mode="ignore": a writer that loses the race to create version 0 just opens it.
        DeltaTable.create(uri, schema, mode="ignore", storage_options=options)
    return DeltaTable(uri, storage_options=options)


@dataclass(frozen=True)
class Skipped:
    """An input an importer could not use (a missing image file, an unreadable record): in
    an image stream given to commit_all it becomes a quarantine row with its reason."""

    uri: str
    reason: str


def commit_metadata(lineage: LineageRecord, **extra: Any) -> dict[str, Any]:
    return {METADATA_KEY: {**lineage.model_dump(), **extra}}


class DatasetWriter:
    """Writes one run (one round and stage, one lineage) into the dataset at root."""

    def __init__(self, root: str, lineage: LineageRecord, *, mode: Literal["merge", "replace", "append"] = "merge",
                 endpoint_url: str | None = None, options: dict[str, str] | None = None,
                 app_id: str | None = None, fence: Callable[[], None] | None = None):
        self.root, self.lineage, self.mode = str(root), lineage, mode
        # Called right before each commit; raises to refuse it (a pipeline run's writer
        # lease, pipeline.lease.confirm: only the run holding the root commits).
        self.fence = fence
        # Delta app-transaction id of this writer's chunk numbers: the run id, or one id per
        # writer when several writers of one run number their chunks independently.
        self.app_id = app_id or lineage.run_id
        self.options = options if options is not None else storage_options(self.root, endpoint_url)
        self.images = open_table(table_uri(self.root, "annotations"), IMAGES, self.options)
        self._keys: np.ndarray | None = None  # sorted image_keys of the table, loaded on first use
        self._owners: dict[int, str | None] = {}  # key -> image_id, for the keys of the current chunk
        self.skipped = 0  # Skipped items commit_all met (quarantined now or by an earlier run)
        # image_ids of the last commit_images call whose rows another run had committed, so
        # that the call wrote nothing for them (a retried chunk of this same run's is not one)
        self.already_committed: list[str] = []
        self._unrecorded: list | None = None  # a deferred run's listing, until its first write

    # -- the run's own records -------------------------------------------------------------
    def start_run(self, listing: Iterable[Any] = (), *, deferred: bool = False) -> None:
        """Record the run's lineage and input listing, once per run_id (a resumed run adds nothing).
        Every table of the layout exists afterwards, empty or not, so readers need no special case.
        deferred: record them only with the run's first write (an image commit or a
        quarantine row), so that a run that finds nothing new (a rerun of an import) leaves
        no lineage row."""
        for name in ("quarantine", "duplicates", "lineage"):
            schema, _ = TABLES[name]
            open_table(table_uri(self.root, name), schema, self.options)
        self._unrecorded = list(listing)
        if not deferred:
            self._record_run()

    def _record_run(self) -> None:
        """The lineage and listing that start_run holds back, if it does."""
        if self._unrecorded is None:
            return
        listing, self._unrecorded = self._unrecorded, None
        if not self._run_recorded("lineage"):
            self.append("lineage", [self.lineage])
        if listing and not self._run_recorded("listing"):
            self.append("listing", listing)

    def append(self, name: str, records: Iterable[Any]) -> int | None:
        """Append records to a side table (quarantine, duplicates, listing, lineage) in one commit."""
        schema, _ = TABLES[name]
        table = to_table(records, schema)
        if table.num_rows == 0:
            return None
        dt = open_table(table_uri(self.root, name), schema, self.options)
        self._fence()
        write_deltalake(dt, table, mode="append", writer_properties=WRITER_PROPERTIES,
                        commit_properties=CommitProperties(
                            custom_metadata=commit_metadata(self.lineage, table=name, rows=table.num_rows)))
        dt.update_incremental()
        return dt.version()

    # -- images ------------------------------------------------------------------------------
    def commit_images(self, images: Iterable[dict], chunk: int | None = None) -> int | None:
        """Commit a chunk of image records as one Delta transaction; returns the new version,
        or None when every image of the chunk was already committed.

        Records are the generator's: image_id, uri, width, height, phash and annotations (SA-1B
        fields). What they lack is filled in: image_key, each mask's id, stage and round.
        """
        if self.mode == "append" and chunk is None:
            raise ValueError("mode='append' needs the chunk number: it is what makes a retry idempotent")
        self.images.update_incremental()
        self.already_committed = []
        if self.mode == "append":
            done = self.images.transaction_version(self.app_id)
            if done is not None and chunk <= done:  # this writer committed the chunk already
                return None
        images = list(images)
        self._prefetch_owners([natural_image_key(im["image_id"]) for im in images])
        keys = assign_image_keys([im["image_id"] for im in images], self._owner)
        keys.update({im["image_id"]: im["image_key"] for im in images if "image_key" in im})
        held = set() if self.mode == "replace" else \
            {im["image_id"] for im in images if self._owner(keys[im["image_id"]]) == im["image_id"]}
        new = [im for im in images if im["image_id"] not in held]
        self.already_committed = self._held_by_other_runs({keys[i]: i for i in held})
        if not new:
            return None
        self._record_run()
        table = to_table([self._complete(im, keys[im["image_id"]]) for im in new])
        masks = pc.list_flatten(table["annotations"])
        # The rounds and stages the masks have: not the run's where an import keeps a file's
        # own; a --round pin (resolve_version) follows these.
        written = {k: sorted(pc.unique(pc.struct_field(masks, k)).to_pylist()) for k in ("round", "stage")}
        props = CommitProperties(
            custom_metadata=commit_metadata(self.lineage, table="annotations", chunk=chunk,
                                            images=table.num_rows, masks=len(masks),
                                            rounds=written["round"], stages=written["stage"]),
            app_transactions=[Transaction(self.app_id, chunk)] if chunk is not None else None,
        )
        self._fence()
        try:
            if self.mode in ("merge", "replace"):
                # merge_schema: a table written before a mask field was added takes it on.
                merge = self.images.merge(table, "t.image_id = s.image_id", source_alias="s", target_alias="t",
                                          merge_schema=True, writer_properties=IMAGES_WRITER_PROPERTIES,
                                          commit_properties=props)
                if self.mode == "replace":
                    merge = merge.when_matched_update_all()
                merge.when_not_matched_insert_all().execute()
            else:
                write_deltalake(self.images, table, mode="append", schema_mode="merge",
                                writer_properties=IMAGES_WRITER_PROPERTIES, commit_properties=props)
        except BaseException:
            self._keys = None  # the commit may or may not have landed: reload the keys next time
            raise
        self.images.update_incremental()
        self._keys = np.union1d(self._table_keys(), table["image_key"].to_numpy())
        return self.images.version()

    def commit_all(self, images: Iterable[dict | Skipped], chunk_images: int = 1000) -> list[int]:
        """Commit an image stream in chunks of chunk_images; returns the versions of the
        images table made. Chunks are numbered on from the run's last committed chunk, so
        nothing is skipped. Skipped items are appended to the quarantine table with each
        chunk."""
        last = self.images.transaction_version(self.app_id)
        versions, buf, skipped, chunk = [], [], [], (last + 1 if last is not None else 0)
        for image in images:
            if isinstance(image, Skipped):
                skipped.append({"uri": image.uri, "reason": image.reason, "run_id": self.lineage.run_id})
                continue
            buf.append(image)
            if len(buf) == chunk_images:
                versions.append(self.commit_images(buf, chunk=chunk))
                buf, chunk = [], chunk + 1
                skipped = self._quarantine(skipped)
        if buf:
            versions.append(self.commit_images(buf, chunk=chunk))
        self._quarantine(skipped)
        return [v for v in versions if v is not None]

    def _quarantine(self, rows: list[dict]) -> list[dict]:
        """Quarantine rows, less those the table holds already (same uri and reason, by any
        run): a rerun of an import records each bad input once, and writes nothing for it."""
        self.skipped += len(rows)
        rows = self._unrecorded_rows(rows) if rows else rows
        if rows:
            self._record_run()
            self.append("quarantine", rows)
        return []

    def _unrecorded_rows(self, rows: list[dict]) -> list[dict]:
        """rows whose (uri, reason) neither the quarantine table nor an earlier row holds; one read."""
        uri = table_uri(self.root, "quarantine")
        seen: set[tuple[str, str]] = set()
        if is_delta_table(uri, self.options):
            found = self._dataset(DeltaTable(uri, storage_options=self.options), "quarantine").to_table(
                columns=["uri", "reason"], filter=pc.field("uri").isin(sorted({r["uri"] for r in rows})))
            seen = set(zip(found["uri"].to_pylist(), found["reason"].to_pylist()))
        new = []
        for row in rows:
            if (row["uri"], row["reason"]) not in seen:
                seen.add((row["uri"], row["reason"]))
                new.append(row)
        return new

    def _complete(self, image: dict, key: int) -> dict:
        anns = []
        for i, ann in enumerate(image.get("annotations", ())):
            anns.append({"id": annotation_id(key, i), "stage": self.lineage.stage,
                         "round": self.lineage.round, **ann})
        return {"phash": None, **image, "image_key": key, "annotations": anns, "run_id": self.lineage.run_id}

    # -- which keys the table holds ------------------------------------------------------------
    def _table_keys(self) -> np.ndarray:
        if self._keys is None:
            col = self._dataset(self.images, "annotations").to_table(columns=["image_key"])["image_key"]
            self._keys = np.sort(col.to_numpy())
        return self._keys

    def _prefetch_owners(self, keys: list[int]) -> None:
        """Look up, in one read, the image_ids holding those of keys the table has."""
        index = self._table_keys()
        hits = [k for k in keys if _contains(index, k)]
        self._owners = {}
        if hits:
            found = self._dataset(self.images, "annotations").to_table(
                columns=["image_key", "image_id"], filter=pc.field("image_key").isin(hits))
            self._owners = dict(zip(found["image_key"].to_pylist(), found["image_id"].to_pylist()))

    def _owner(self, key: int) -> str | None:
        """image_id holding key in the table: from the in-memory index and the prefetched
        owners; a key outside both (a collision probe) reads the table."""
        if not _contains(self._table_keys(), key):
            return None
        if key not in self._owners:
            hit = self._dataset(self.images, "annotations").to_table(
                columns=["image_id"], filter=pc.field("image_key") == key)["image_id"]
            self._owners[key] = hit[0].as_py() if len(hit) else None
        return self._owners[key]

    def _held_by_other_runs(self, held: dict[int, str]) -> list[str]:
        """The image_ids of held (image_key -> image_id, rows the table has) whose rows another
        run wrote; one read, and only when some are held."""
        if not held:
            return []
        rows = self._dataset(self.images, "annotations").to_table(
            columns=["image_key", "run_id"], filter=pc.field("image_key").isin(sorted(held)))
        run_of = dict(zip(rows["image_key"].to_pylist(), rows["run_id"].to_pylist()))
        return sorted(i for k, i in held.items() if run_of.get(k) != self.lineage.run_id)

    def _fence(self) -> None:
        if self.fence is not None:
            self.fence()

    def _dataset(self, dt: DeltaTable, name: str):
        return arrow_dataset(dt, table_uri(self.root, name), self.options)

    def _run_recorded(self, name: str) -> bool:
        schema, _ = TABLES[name]
        dt = open_table(table_uri(self.root, name), schema, self.options)
        hit = self._dataset(dt, name).to_table(columns=["run_id"], filter=pc.field("run_id") == self.lineage.run_id)
        return hit.num_rows > 0


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    i = np.searchsorted(sorted_keys, key)
    return bool(i < len(sorted_keys) and sorted_keys[i] == key)


def committed_image_ids(root: str, *, endpoint_url: str | None = None,
                        options: dict[str, str] | None = None) -> set[str]:
    """image_ids in the latest version: what a resumed run skips."""
    options = options if options is not None else storage_options(root, endpoint_url)
    uri = table_uri(root, "annotations")
    if not is_delta_table(uri, options):
        return set()
    dt = DeltaTable(uri, storage_options=options)
    col = arrow_dataset(dt, uri, options).to_table(columns=["image_id"])
    return set(col["image_id"].to_pylist())
