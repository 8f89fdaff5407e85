"""Upkeep of the dataset's tables: thin wrappers over delta-rs optimize, vacuum and repair.

Compaction rewrites the small files of many chunk commits into files of about target_size
(a new version with the same rows; old versions stay readable until vacuumed). Vacuum
deletes files no version within the retention window needs, including the orphan Parquet
files of writers killed before their commit. After a vacuum with retention R, time travel
reaches back only R hours: pin the versions a training round reads for less than that.
Repair drops the table's references to data files that no longer exist (deleted by hand,
lost by the store): their rows are gone, and a rerun of the job that wrote them annotates
those inputs again, since they no longer count as done.
"""
from __future__ import annotations

import functools
from typing import Any

from deltalake import CommitProperties, DeltaTable

from .storage import is_delta_table, storage_options, table_uri
from .writer import METADATA_KEY, writer_properties

TARGET_FILE_SIZE = 256 * 1024 * 1024
DEFAULT_RETENTION_HOURS = 7 * 24


def _table(root: str, name: str, options: dict[str, str] | None) -> DeltaTable:
    return DeltaTable(table_uri(root, name), storage_options=options if options is not None else storage_options(root))


def compact(root: str, name: str = "annotations", *, target_size: int = TARGET_FILE_SIZE,
            options: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge small files into files of about target_size bytes; returns delta-rs' metrics."""
    return _table(root, name, options).optimize.compact(
        target_size=target_size, writer_properties=writer_properties(name),
        commit_properties=CommitProperties(custom_metadata={METADATA_KEY: {"maintenance": "compact"}}))


def vacuum(root: str, name: str = "annotations", *, retention_hours: int = DEFAULT_RETENTION_HOURS,
           dry_run: bool = False, options: dict[str, str] | None = None) -> list[str]:
    """Delete files unneeded by versions younger than retention_hours; returns their paths.
    A retention below the table's minimum (7 days by default) is allowed on purpose.

    A full vacuum deletes every file of the table's folder that no version names, so it
    deletes nothing, and raises ValueError, where that folder is not a Delta table or holds
    files that are not Parquet: files of someone else's (an output folder that held them
    before the tables were written there), not orphans of a killed writer."""
    uri = table_uri(root, name)
    options = options if options is not None else storage_options(root)
    if not is_delta_table(uri, options):
        raise ValueError(f"{uri} is not a Delta table: vacuum deletes nothing there")
    run = functools.partial(_table(root, name, options).vacuum, retention_hours=retention_hours,
                            enforce_retention_duration=False, full=True)
    unneeded = run(dry_run=True)
    foreign = sorted(path for path in unneeded if not path.endswith(".parquet"))
    if foreign:
        raise ValueError(f"{uri} holds files that no writer of the table makes ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}): move them out of it; vacuum deleted nothing")
    return unneeded if dry_run else run(dry_run=False)


def missing_files(root: str, name: str = "annotations", *, options: dict[str, str] | None = None) -> list[str]:
    """Data files the table's current version names that its store no longer has (one
    listing of the table's folder; changes nothing)."""
    return sorted(_table(root, name, options).repair(dry_run=True)["files_removed"])


def repair(root: str, name: str = "annotations", *, options: dict[str, str] | None = None) -> list[str]:
    """Commit a version without the missing data files (their rows are lost); returns their
    paths. Nothing is committed when none is missing."""
    table = _table(root, name, options)
    if not table.repair(dry_run=True)["files_removed"]:
        return []
    return sorted(table.repair(commit_properties=CommitProperties(
        custom_metadata={METADATA_KEY: {"maintenance": "repair"}}))["files_removed"])
