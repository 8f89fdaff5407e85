"""Reading a dataset version: pinned by number, or the last version of a run or a round.

Every entry point takes the dataset root and one of `version=`, `run_id=`, `round=` (none:
the latest version) and hands back the images table of that version as a DeltaTable,
pyarrow, pandas, a Ray Dataset, plain Parquet files, or an iterator of images / masks.
DuckDB and Polars read the same table directly (`delta_scan(...)`, `pl.read_delta(...)`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from schemas import IMAGES, TABLES, conform

from .storage import arrow_dataset, root_name_problem, storage_options, store_error, table_uri
from .writer import METADATA_KEY


class DatasetNotFound(LookupError):
    """No such table under the root, or no such version of it."""


class DataFileMissing(FileNotFoundError):
    """A data file that a table's version names is gone from the store (deleted by hand, a
    lifecycle rule): what it held cannot be read."""


def missing_file_message(root: str, name: str, error: OSError) -> str:
    """What a reader says of a lost data file, and the fix."""
    return (f"{root}: the {name} table names a data file that is missing ({error}); "
            f"`python jobs/validate.py {root}` lists the faults, `python jobs/maintain.py {root} repair` "
            "drops the missing files from the table (their rows are lost)")


@contextmanager
def reading(root: str, name: str = "annotations"):
    """Turns pyarrow's FileNotFoundError for a lost data file into DataFileMissing."""
    try:
        yield
    except DataFileMissing:
        raise
    except FileNotFoundError as e:
        raise DataFileMissing(missing_file_message(root, name, e)) from e


def _options(root: str, options: dict[str, str] | None) -> dict[str, str]:
    return options if options is not None else storage_options(root)


def _open(root: str, name: str, options: dict[str, str], version: int | None = None) -> DeltaTable:
    """One of the dataset's tables, at a version; DatasetNotFound naming what is missing, or
    the characters of a root that delta-rs cannot read right (a copy of a dataset made at
    such a name reads with no history, so a --run-id or --round pin would find nothing)."""
    problem = root_name_problem(root)
    if problem:
        raise DatasetNotFound(problem)
    try:
        table = DeltaTable(table_uri(root, name), storage_options=options)
        if version is not None and version != table.version():
            # Checked first: delta-rs looks for a later version's log file by file, for ever
            # on a huge number, and takes the number as unsigned.
            if not 0 <= version <= table.version():
                raise DatasetNotFound(f"{root}: the {name} table has no version {version} (versions 0.."
                                      f"{table.version()})")
            table.load_as_version(version)
        return table
    except TableNotFoundError:
        raise DatasetNotFound(f"no dataset at {root}: it has no {name} table") from None
    except DeltaError as e:
        if version is None:
            raise
        raise DatasetNotFound(f"{root}: the {name} table has no version {version} ({e})") from e
    except OSError as e:  # the store itself: a missing bucket, an unreachable endpoint, no credentials
        raise DatasetNotFound(f"cannot read the dataset at {root}: {store_error(e)}") from e


def history(root: str, name: str = "annotations", options: dict[str, str] | None = None) -> list[dict]:
    """Commits of a table, oldest first: version, timestamp, operation and our metadata
    (run_id, round, stage, ...) flattened into each entry (empty for commits we did not tag,
    such as table creation or compaction)."""
    dt = _open(root, name, _options(root, options))
    out = []
    for c in dt.history():
        ours = c.get(METADATA_KEY) or {}
        out.append({"version": c["version"], "timestamp": c["timestamp"], "operation": c["operation"], **ours})
    return sorted(out, key=lambda c: c["version"])


def resolve_version(root: str, *, version: int | None = None, run_id: str | None = None,
                    round: int | None = None, options: dict[str, str] | None = None) -> int:
    """The annotations version to read: `version` itself, the last commit of `run_id` or of
    `round` (one that wrote masks of that round; a commit without masks, or older than
    that record, counts as its run's round), or (none given) the latest."""
    if sum(x is not None for x in (version, run_id, round)) > 1:
        raise ValueError("give at most one of version, run_id, round")
    if version is not None:
        _open(root, "annotations", _options(root, options), version)  # DatasetNotFound when it has none
        return version
    if run_id is None and round is None:
        return _open(root, "annotations", _options(root, options)).version()
    for c in reversed(history(root, options=options)):
        if c.get("table") != "annotations":
            continue
        if (run_id is not None and c.get("run_id") == run_id) or \
                (round is not None and round in (c.get("rounds") or [c.get("round")])):
            return c["version"]
    raise DatasetNotFound(f"no commit of run_id={run_id!r} round={round!r} in {root}")


def open_version(root: str, *, version: int | None = None, run_id: str | None = None,
                 round: int | None = None, options: dict[str, str] | None = None) -> DeltaTable:
    """The annotations table pinned at the resolved version."""
    options = _options(root, options)
    if version is not None and run_id is None and round is None:
        return _open(root, "annotations", options, version)  # checks it, as resolve_version would
    v = resolve_version(root, version=version, run_id=run_id, round=round, options=options)
    return _open(root, "annotations", options, v)


def open_dataset(root: str, *, options: dict[str, str] | None = None, **pin: Any) -> pads.Dataset:
    """The pyarrow dataset of the resolved version (lazy: nothing is read yet)."""
    options = _options(root, options)
    return arrow_dataset(open_version(root, options=options, **pin), table_uri(root, "annotations"), options)


def read_images(root: str, *, columns: list[str] | None = None, filter: Any = None, **pin: Any) -> pa.Table:
    """A version's images as a pyarrow table in our schema (all columns unless `columns`)."""
    with reading(root):
        table = open_dataset(root, **pin).to_table(columns=columns, filter=filter)
    if columns is None:
        return conform(table)
    return table.cast(pa.schema([IMAGES.field(c) for c in columns]))


def read_pandas(root: str, **kwargs: Any):
    """A version's images as a pandas DataFrame (annotations as lists of dicts)."""
    return read_images(root, **kwargs).to_pandas()


def iter_images(root: str, *, batch_rows: int = 256, columns: list[str] | None = None, **pin: Any
                ) -> Iterator[dict]:
    """Image rows of a version as dicts (all columns unless `columns`), streamed a batch of
    rows at a time. Name the columns where the masks are not needed: they are most of a row."""
    ds = open_dataset(root, **pin)
    schema = None if columns is None else pa.schema([IMAGES.field(c) for c in columns])
    with reading(root):
        for batch in ds.to_batches(batch_size=batch_rows, columns=columns):
            table = pa.Table.from_batches([batch])
            yield from (conform(table) if schema is None else table.cast(schema)).to_pylist()


def iter_masks(root: str, **kwargs: Any) -> Iterator[tuple[dict, dict]]:
    """(image without its annotations, mask) pairs of a version."""
    for image in iter_images(root, **kwargs):
        masks = image.pop("annotations")
        for mask in masks:
            yield image, mask


def read_ray(root: str, *, options: dict[str, str] | None = None, **pin: Any):
    """A version's images as a Ray Dataset (ray.data.read_delta at the pinned version)."""
    import ray.data  # Ray is heavy to import; only this reader needs it.

    options = _options(root, options)
    v = resolve_version(root, options=options, **pin)
    return ray.data.read_delta(table_uri(root, "annotations"), version=v, storage_options=options)


def read_table(root: str, name: str, *, version: int | None = None,
               options: dict[str, str] | None = None) -> pa.Table:
    """A side table (quarantine, duplicates, listing, lineage) in our schema."""
    schema, _ = TABLES[name]
    options = _options(root, options)
    dt = _open(root, name, options, version)
    uri = table_uri(root, name)
    with reading(root, name):
        return conform(arrow_dataset(dt, uri, options).to_table(), schema)
