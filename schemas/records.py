"""Pydantic models of every record the dataset stores.

These are the shapes at the boundaries (importers, tests, small tools). Bulk paths go
straight from plain dicts to Arrow (`schemas.arrow`) without building a model per mask;
`tests/test_dataset_schemas.py` keeps the two descriptions in step.

Field names of a mask follow SA-1B, so an SA-1B annotation dict is a valid
MaskAnnotation once `stage` and `round` are added.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Rounds are stored as int32 (schemas.arrow): a larger one could not be written.
ROUND_MAX = 2**31 - 1

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# How a mask came to be, in the order of the SAM data engine.
Stage = Literal["manual", "semi_auto", "auto", "imported"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rle(_Record):
    """Compressed COCO run-length encoding, counts as the ASCII string pycocotools writes."""
    size: tuple[int, int] = Field(description="[height, width] of the image")
    counts: str


class MaskAnnotation(_Record):
    id: int = Field(ge=0, description="unique in the table; see schemas.ids")
    segmentation: Rle
    area: int = Field(ge=0, description="number of mask pixels")
    bbox: tuple[int, int, int, int] = Field(description="XYWH, as pycocotools.mask.toBbox")
    predicted_iou: float | None = Field(None, description="model's IoU estimate; None for manual masks")
    point_coords: list[tuple[float, float]] = Field(default_factory=list, description="prompt points (x, y)")
    stability_score: float | None = None
    crop_box: tuple[int, int, int, int] = Field(description="XYWH of the crop the mask came from")
    stage: Stage
    round: int = Field(ge=0, le=ROUND_MAX, description="data-engine round whose checkpoint produced the mask")
    text_prompt: str | None = Field(None, description="the text that prompted the mask (jobs/auto_annotate.py --text)")


class ImageRecord(_Record):
    """One row of the annotations table: an image and all its masks."""
    image_id: str = Field(description="sha256 hex of the file bytes")
    image_key: int = Field(ge=0, description="integer id of the image in SA-1B / COCO exports; see schemas.ids")
    uri: str = Field(description="where the image was read from")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    phash: str | None = Field(None, description="perceptual hash (imagehash.phash) as hex")
    annotations: list[MaskAnnotation] = Field(default_factory=list)
    run_id: str | None = Field(None, description="the run that wrote this row (filled in by the writer)")

    @field_validator("image_id")
    @classmethod
    def _is_sha256(cls, v: str) -> str:
        if not SHA256_HEX.match(v):
            raise ValueError("image_id must be 64 lowercase hex digits (sha256 of the file)")
        return v


class QuarantineRecord(_Record):
    """An input that could not be read or decoded; the run goes on without it."""
    uri: str
    reason: str
    image_id: str | None = None
    run_id: str


class DuplicateRecord(_Record):
    """An input skipped because the same (exact) or a near-identical (phash) image is kept."""
    uri: str
    image_id: str
    duplicate_of: str = Field(description="image_id of the image that is kept")
    kind: Literal["exact", "near"]
    distance: int = Field(0, ge=0, description="phash Hamming distance; 0 for exact")
    run_id: str


class ListingEntry(_Record):
    """One input object of a run; the listing's hash goes into every commit of the run."""
    uri: str
    size: int | None = None
    etag: str | None = None
    listing_hash: str
    run_id: str


class LineageRecord(_Record):
    """What produced a run: one row of the lineage table, and (flattened to strings) the
    custom metadata of each of the run's Delta commits, so that any version names its
    run, round and stage without a second read."""
    run_id: str
    round: int = Field(ge=0, le=ROUND_MAX)
    stage: Stage
    checkpoint_hash: str = ""
    params_json: str = Field("{}", description="generator parameters, JSON with sorted keys")
    params_hash: str = ""
    code_version: str = ""
    listing_hash: str = ""
    created_at: str = Field("", description="ISO-8601 UTC time the run started")
