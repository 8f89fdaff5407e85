"""Every record shape of the dataset, in one place: pydantic models (`records`), their
Arrow schemas and conversions (`arrow`), and the integer id scheme (`ids`)."""
from .arrow import (
    DUPLICATES, IMAGES, LINEAGE, LISTING, MASK, QUARANTINE, RLE, TABLES, conform, iter_rows,
    to_records, to_table,
)
from .ids import annotation_id, assign_image_keys, natural_image_key, split_annotation_id
from .records import (
    DuplicateRecord, ImageRecord, LineageRecord, ListingEntry, MaskAnnotation, QuarantineRecord,
    Rle, Stage,
)

__all__ = [
    "DUPLICATES", "IMAGES", "LINEAGE", "LISTING", "MASK", "QUARANTINE", "RLE", "TABLES",
    "DuplicateRecord", "ImageRecord", "LineageRecord", "ListingEntry", "MaskAnnotation",
    "QuarantineRecord", "Rle", "Stage", "annotation_id", "assign_image_keys", "conform",
    "iter_rows", "natural_image_key", "split_annotation_id", "to_records", "to_table",
]
