"""The dataset on disk or S3: Delta tables of images and masks (`writer`, `reader`),
SA-1B / COCO interchange (`sa1b`, `coco`), the Parquet export and what exports share
(`exports`), checks (`validation`) and upkeep (`maintenance`).
Record shapes live in `schemas`."""
from .exports import export_parquet
from .reader import (
    DataFileMissing, DatasetNotFound, history, iter_images, iter_masks, open_dataset, open_version,
    read_images, read_pandas, read_ray, read_table, resolve_version,
)
from .storage import TABLE_NAMES, storage_options, table_uri
from .writer import DatasetWriter, committed_image_ids, open_table

__all__ = [
    "DataFileMissing", "DatasetNotFound", "DatasetWriter", "TABLE_NAMES", "committed_image_ids", "export_parquet",
    "history", "iter_images",
    "iter_masks", "open_dataset", "open_table", "open_version", "read_images", "read_pandas", "read_ray", "read_table",
    "resolve_version", "storage_options", "table_uri",
]
