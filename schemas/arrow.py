"""Arrow schemas of the dataset's tables, and records <-> Arrow conversion.

The annotations table has one row per image; its masks are a list<struct> column, so an
image and its masks are written, committed and read together. Types are the narrowest
that hold the values (int32 pixel coordinates, float64 scores so that JSON values survive
a round trip exactly). Readers cast what Delta hands back to these schemas
(`conform`), because Delta may return wider types (large_string, large_list).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import pyarrow as pa

from .records import (
    DuplicateRecord, ImageRecord, LineageRecord, ListingEntry, MaskAnnotation, QuarantineRecord,
)

RLE = pa.struct([
    pa.field("size", pa.list_(pa.int32()), nullable=False),  # [height, width]
    pa.field("counts", pa.string(), nullable=False),
])

MASK = pa.struct([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("segmentation", RLE, nullable=False),
    pa.field("area", pa.int64(), nullable=False),
    pa.field("bbox", pa.list_(pa.int32()), nullable=False),  # XYWH
    pa.field("predicted_iou", pa.float64()),
    pa.field("point_coords", pa.list_(pa.list_(pa.float64())), nullable=False),  # [[x, y], ...]
    pa.field("stability_score", pa.float64()),
    pa.field("crop_box", pa.list_(pa.int32()), nullable=False),  # XYWH
    pa.field("stage", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("text_prompt", pa.string()),  # the words that prompted the mask, if text did
])

IMAGES = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_key", pa.int64(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("phash", pa.string()),
    pa.field("annotations", pa.list_(pa.field("element", MASK, nullable=False)), nullable=False),
    pa.field("run_id", pa.string()),  # the run that wrote this row (a full rebuild replaces rows)
])

QUARANTINE = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("image_id", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
])

DUPLICATES = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("duplicate_of", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("distance", pa.int32(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])

LISTING = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("listing_hash", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])

LINEAGE = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("checkpoint_hash", pa.string(), nullable=False),
    pa.field("params_json", pa.string(), nullable=False),
    pa.field("params_hash", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
    pa.field("listing_hash", pa.string(), nullable=False),
    pa.field("created_at", pa.string(), nullable=False),
])

# Each side table with the model of its rows.
TABLES: dict[str, tuple[pa.Schema, type]] = {
    "annotations": (IMAGES, ImageRecord),
    "quarantine": (QUARANTINE, QuarantineRecord),
    "duplicates": (DUPLICATES, DuplicateRecord),
    "listing": (LISTING, ListingEntry),
    "lineage": (LINEAGE, LineageRecord),
}
MASK_MODEL = MaskAnnotation


def to_table(records: Iterable[Any], schema: pa.Schema = IMAGES) -> pa.Table:
    """Records (pydantic models or plain dicts of the same shape) -> an Arrow table.

    Dicts are taken as they are, without a model per row: the writer's bulk path. A wrong
    type raises in Arrow; a missing required field raises here (Arrow would store a null).
    """
    rows = [r.model_dump() if hasattr(r, "model_dump") else r for r in records]
    table = pa.Table.from_pylist(rows, schema=schema)
    for f in schema:
        _require_values(table[f.name], f, f.name)
    return table


def _require_values(array: pa.ChunkedArray | pa.Array, f: pa.Field, path: str) -> None:
    """Raise ValueError naming the first non-nullable field (at any depth) that holds a null."""
    if not f.nullable and array.null_count:
        raise ValueError(f"required field {path} is missing or null")
    if isinstance(array, pa.ChunkedArray):
        for chunk in array.chunks:
            _require_values(chunk, f, path)
        return
    if pa.types.is_struct(f.type):
        for child in f.type:
            _require_values(array.field(child.name), child, f"{path}.{child.name}")
    elif pa.types.is_list(f.type):
        _require_values(array.flatten(), f.type.value_field, f"{path}[]")


def conform(table: pa.Table, schema: pa.Schema = IMAGES) -> pa.Table:
    """Cast a table read back from Delta to our schema (same columns, our types)."""
    return table.select(schema.names).cast(schema)


def iter_rows(table: pa.Table, batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of a table as plain dicts, a batch at a time (no model per mask)."""
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield from batch.to_pylist()


def to_records(table: pa.Table, model: type = ImageRecord) -> list[Any]:
    """An Arrow table -> validated pydantic records (for small tables and tests)."""
    return [model.model_validate(row) for row in iter_rows(table)]
