"""What a dataset already holds, so that a rerun picks up where the last one stopped.

Done inputs (by URI) are those in the annotations or duplicates tables, and those
quarantined for a lasting reason; an input quarantined for a transient storage error
("read_error") is tried again. Images are also known by content: the (image_id, phash) of
every committed image seeds the deduplicator, so the same bytes under a new name are a
duplicate, never a second row.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from dataset.reader import missing_file_message
from dataset.storage import arrow_dataset, is_delta_table, table_uri

from .sources import InputError

RETRIED_REASON = "read_error"


def _read(root: str, name: str, columns: list[str], options: dict[str, str], run_id: str | None) -> pa.Table | None:
    uri = table_uri(root, name)
    if not is_delta_table(uri, options):
        return None
    where = pc.field("run_id") == run_id if run_id is not None else None
    try:
        return arrow_dataset(DeltaTable(uri, storage_options=options), uri, options).to_table(columns=columns,
                                                                                              filter=where)
    except FileNotFoundError as e:  # a data file the log names is gone: what it held is unknown
        raise InputError(f"output {missing_file_message(root, name, e)}, so that the next run annotates "
                         "those inputs again") from e


def committed_state(root: str, options: dict[str, str], run_id: str | None = None
                    ) -> tuple[pa.Array, list[tuple[str, str | None]]]:
    """(URIs already done, [(image_id, phash)] of committed images) of the latest versions;
    with run_id, only what that run wrote (a full rebuild redoes everything else)."""
    done = []
    images = _read(root, "annotations", ["uri", "image_id", "phash"], options, run_id)
    if images is not None:
        done.append(images["uri"])
    dups = _read(root, "duplicates", ["uri"], options, run_id)
    if dups is not None:
        done.append(dups["uri"])
    bad = _read(root, "quarantine", ["uri", "reason"], options, run_id)
    if bad is not None:
        done.append(bad.filter(pc.invert(pc.starts_with(bad["reason"], RETRIED_REASON)))["uri"])
    uris = pa.chunked_array([c.cast(pa.string()) for col in done for c in col.chunks], type=pa.string()).combine_chunks() \
        if done else pa.array([], pa.string())
    committed = [] if images is None else list(zip(images["image_id"].to_pylist(), images["phash"].to_pylist()))
    return pc.unique(uris), committed
