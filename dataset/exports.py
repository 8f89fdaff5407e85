"""The Parquet export, and what the exports (COCO, SA-1B, Parquet) share: the file name each
image is exported under, the annotation ids written to JSON, and a destination folder
replaced whole by a finished export."""
from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote_to_bytes

import pyarrow.parquet as pq

from .reader import open_dataset, reading


@contextmanager
def replacing_folder(dest: str | Path, is_export: Callable[[Path], bool]) -> Iterator[Path]:
    """An empty folder beside dest to write an export into, which replaces dest when the
    export is complete and is removed when it fails: dest then holds exactly one export,
    never the leftover files of an earlier, larger one, nor half of a new one.

    Replacing deletes what dest held, so dest must be absent, empty, or hold only files that
    `is_export` accepts (an earlier export); anything else is refused before any work, with
    FileExistsError (NotADirectoryError when dest is a file). Missing parent folders are made.
    """
    dest = Path(dest)
    _refuse_foreign_files(dest, is_export)
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.partial"
    new.mkdir()  # not mkdtemp: the export keeps this folder's permissions, and mkdtemp's are private
    try:
        yield new
        _refuse_foreign_files(dest, is_export)  # again: files may have come during a long export
        _swap_in(new, dest)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def _refuse_foreign_files(dest: Path, is_export: Callable[[Path], bool]) -> None:
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError("a file, not a folder")
    foreign = sorted(p.name for p in dest.iterdir() if not is_export(p)) if dest.exists() else []
    if foreign:
        raise FileExistsError(f"the folder holds {len(foreign)} files that are not an earlier export "
                              f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                              "export to a new or empty folder, or move them away")


def _swap_in(new: Path, dest: Path) -> None:
    """Rename new to dest. A folder cannot be renamed over a non-empty one, so an existing dest
    is first moved aside (and put back if the second rename fails), then deleted."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old)


EXPORT_ID_FIELD = "samengine_id"  # beside each exported annotation: its stored id, as a string


def export_annotation_ids() -> Iterator[int]:
    """The annotation ids that a JSON export (COCO, SA-1B) writes, in the order it writes the
    masks: 1, 2, 3, ...

    Stored ids (`schemas.ids.annotation_id`) are int64, mostly above 2**53, the largest
    integer a double holds exactly: JSON readers that parse numbers as doubles (JavaScript,
    jq, CVAT, the FiftyOne App) round them, and distinct masks share an id. So an export
    numbers its masks instead, unique in the export and below 2**53. Exports read
    a version's rows, and each image's masks, in the order they are stored, so the same
    version exported again gets the same ids, and its COCO and SA-1B exports agree. Each
    annotation keeps its stored id as the string field `EXPORT_ID_FIELD`; re-imports derive
    ids from the image key and the mask's position, which gives the stored ids back. Image
    ids are image keys (48 bits), safe as they are.
    """
    return itertools.count(1)


def export_file_names(root: str, **pin: Any) -> Callable[[str], str]:
    """The `file_name` that COCO and SA-1B exports give each image of a version, by its uri.

    Loaders open images dir / file_name, so the name is the image's path relative to the
    deepest folder that holds every image of the version (for s3:// URIs, the longest common
    prefix that ends at a "/"): a/img.png and b/img.png keep apart, and the images of one
    flat folder are named by their base names. A local name that is not UTF-8 is stored as a
    percent-encoded file:// URI (no Arrow string holds its bytes); it is compared by those
    bytes, and its relative name stays percent-encoded, as JSON holds only text
    (`urllib.parse.unquote_to_bytes` gives the bytes back). Other names are not encoded,
    so a "%" in them is literal.

    Reads the uri column once, a batch at a time.
    """
    folder = None
    with reading(root):
        for batch in open_dataset(root, **pin).to_batches(columns=["uri"]):
            for uri in batch.column(0).to_pylist():
                folder = _common_folder(folder, _name_bytes(uri))
    return functools.partial(_relative_name, folder=folder or b"")


def _name_bytes(uri: str) -> bytes:
    """A uri as the bytes that name its file: a file:// URI percent-decoded, any other as UTF-8."""
    return unquote_to_bytes(uri.removeprefix("file://")) if uri.startswith("file://") else uri.encode()


def _common_folder(folder: bytes | None, name: bytes) -> bytes:
    """The deepest folder (ending in "/", or empty) holding both folder and name."""
    parent = name[:name.rfind(b"/") + 1]
    if folder is None:
        return parent
    common = os.path.commonprefix([folder, parent])
    return common[:common.rfind(b"/") + 1]


def _relative_name(uri: str, folder: bytes) -> str:
    name = _name_bytes(uri)[len(folder):]
    try:
        return name.decode()
    except UnicodeDecodeError:
        return quote(name, safe="/")


# Image rows per Parquet row group of an export. Rows are images holding all their masks
# (tens of KB to MBs each), so groups are counted in few rows.
EXPORT_ROW_GROUP_ROWS = 256
# The scanner's read-ahead, kept to a few batches: its defaults (16 batches of 4 files at
# once) hold about a third of a 4M-mask table in memory when the writer is slower.
BOUNDED_READAHEAD = dict(batch_readahead=2, fragment_readahead=1)


def export_parquet(root: str, dest: str, *, max_rows_per_file: int = 50_000, **pin: Any) -> list[str]:
    """Write a version as plain Parquet files under dest (for Hugging Face `datasets`, or any
    tool without Delta support); returns the files written. dest is a local folder, replaced
    whole (`replacing_folder`): a re-export into it holds that version's rows and no others.
    Replaced rather than refused, as exporting each round into the folder a training job reads
    is the common use. A version without rows is one zero-row file, which carries the schema.

    Streams a batch of rows at a time into one file after another (memory flat in the table's
    size). pyarrow's write_dataset was not: its backpressure counts queued rows (millions),
    and our rows are whole images, so it held ever more of the table while zstd kept up
    (1.7 GB resident exporting 4M masks, growing linearly)."""
    written: list[str] = []
    ds = open_dataset(root, **pin)
    with replacing_folder(dest, _is_parquet_export) as new, reading(root):
        writer, rows_in_file = None, 0
        try:
            for batch in ds.to_batches(batch_size=EXPORT_ROW_GROUP_ROWS, **BOUNDED_READAHEAD):
                offset = 0
                while offset < batch.num_rows:
                    if writer is None or rows_in_file == max_rows_per_file:
                        if writer is not None:
                            writer.close()
                        name = f"part-{len(written)}.parquet"
                        writer = pq.ParquetWriter(new / name, ds.schema, compression="zstd")
                        written.append(os.path.join(dest, name))
                        rows_in_file = 0
                    take = min(batch.num_rows - offset, max_rows_per_file - rows_in_file)
                    writer.write_batch(batch.slice(offset, take))
                    offset, rows_in_file = offset + take, rows_in_file + take
        finally:
            if writer is not None:
                writer.close()
        if not written:  # no rows, no file: readers of an empty folder find no columns
            pq.write_table(ds.schema.empty_table(), new / "part-0.parquet", compression="zstd")
            written.append(os.path.join(dest, "part-0.parquet"))
    return sorted(written)


def _is_parquet_export(path: Path) -> bool:
    """Whether path is one of the files export_parquet writes (its basename_template)."""
    return path.is_file() and re.fullmatch(r"part-\d+\.parquet", path.name) is not None
