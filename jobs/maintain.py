"""Upkeep of a dataset's Delta tables: compaction of small files, vacuum of unneeded ones.

    python jobs/maintain.py ROOT compact                        # every table, ~256 MB files
    python jobs/maintain.py ROOT compact --table annotations --dry-run
    python jobs/maintain.py ROOT vacuum --retention-hours 168 --dry-run   # list, delete nothing
    python jobs/maintain.py s3://bucket/ds vacuum --table all --retention-hours 24
    python jobs/maintain.py ROOT repair --dry-run                # data files the tables lack

compact rewrites the small files of many chunk commits into files of about --target-size
bytes as one new version with the same rows (older versions stay readable until vacuumed);
--dry-run prints the files it would merge. vacuum deletes the files that no version younger
than --retention-hours needs: files removed by compactions and MERGE rewrites longer ago than
that, and files no version names (a writer killed before its commit) last modified longer ago
than that, so a writer still writing its chunk is safe whenever the retention is longer than
one chunk's write. After it, time travel reaches back only that many hours. repair commits
a version without the table's references to data files that no longer exist (deleted by
hand, lost by the store): their rows are lost, and rerunning the job that wrote them
annotates those inputs again; --dry-run lists them.

Prints what it did (or would do) per table; exit status 1 when a named table is absent, 2
(with a one-line error) when the root holds none of the dataset's tables.
Operations in dataset/maintenance.py; S3 settings as in dataset/storage.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
from deltalake import DeltaTable  # noqa: E402

from dataset.maintenance import (DEFAULT_RETENTION_HOURS, TARGET_FILE_SIZE, compact, missing_files,  # noqa: E402
                                 repair, vacuum)
from dataset.storage import (  # noqa: E402
    TABLE_NAMES, is_delta_table, root_name_problem, storage_options, store_error, table_uri,
)
from jobs.arg_types import hours, positive  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402


def _files(dt: DeltaTable) -> pa.Table:
    """path, size_bytes and num_records of the files of the table's loaded version."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    return actions.select([c for c in ("path", "size_bytes", "num_records") if c in actions.column_names])


def _summary(dt: DeltaTable) -> str:
    files = _files(dt)
    rows = sum(v or 0 for v in files["num_records"].to_pylist()) if "num_records" in files.column_names else "?"
    return f"version {dt.version()}: {files.num_rows} files, {sum(files['size_bytes'].to_pylist())} bytes, {rows} rows"


def _compact(root: str, name: str, dt: DeltaTable, args, options) -> None:
    before = _summary(dt)
    if args.dry_run:
        files = _files(dt)
        small = [(p, s) for p, s in zip(files["path"].to_pylist(), files["size_bytes"].to_pylist())
                 if s < args.target_size]
        if len(small) < 2:
            print(f"{name}: {before}; nothing to compact ({len(small)} file below {args.target_size} bytes)")
            return
        total = sum(s for _, s in small)
        print(f"{name}: {before}; would merge {len(small)} files ({total} bytes) "
              f"into about {max(1, -(-total // args.target_size))}:")
        for p, s in small:
            print(f"  {p}  {s}")
        return
    metrics = compact(root, name, target_size=args.target_size, options=options)
    dt.update_incremental()
    print(f"{name}: before {before}; removed {metrics['numFilesRemoved']} files, "
          f"added {metrics['numFilesAdded']}; now {_summary(dt)}")


def _vacuum(root: str, name: str, dt: DeltaTable, args, options) -> None:
    deleted = vacuum(root, name, retention_hours=args.retention_hours, dry_run=args.dry_run, options=options)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{name}: {_summary(dt)}; {verb} {len(deleted)} files "
          f"unneeded by versions of the last {args.retention_hours} h" + (":" if deleted else ""))
    for path in sorted(deleted):
        print(f"  {path}")


def _repair(root: str, name: str, dt: DeltaTable, args, options) -> None:
    lost = (missing_files if args.dry_run else repair)(root, name, options=options)
    verb = "would drop" if args.dry_run else "dropped"
    print(f"{name}: {verb} {len(lost)} missing data files" + (":" if lost else ""))
    for path in lost:
        print(f"  {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset root: a folder or an s3:// prefix")
    ap.add_argument("action", choices=["compact", "vacuum", "repair"])
    ap.add_argument("--table", default="all", choices=[*TABLE_NAMES, "all"], help="default: all")
    ap.add_argument("--retention-hours", type=hours, default=DEFAULT_RETENTION_HOURS,
                    help=f"vacuum: keep what versions of the last H hours need (default {DEFAULT_RETENTION_HOURS})")
    ap.add_argument("--target-size", type=positive, default=TARGET_FILE_SIZE, help="compact: bytes per file")
    ap.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    ap.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    try:  # ray job submit --working-dir: a relative root names a dataset in Ray's temporary copy
        refuse_job_copy_paths([("ROOT", args.root)], ROOT)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = root_name_problem(args.root)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    options = storage_options(args.root, args.endpoint_url)
    try:
        present = {name for name in TABLE_NAMES if is_delta_table(table_uri(args.root, name), options)}
    except OSError as e:  # the store itself: a missing bucket, an unreachable endpoint
        print(f"error: cannot reach the dataset at {args.root}: {store_error(e)}", file=sys.stderr)
        return 2
    if not present:  # a mistyped root is not five absent tables
        print(f"error: no dataset at {args.root}: none of its tables ({', '.join(TABLE_NAMES)}) is there",
              file=sys.stderr)
        return 2
    names = TABLE_NAMES if args.table == "all" else (args.table,)
    status = 0
    for name in names:
        uri = table_uri(args.root, name)
        if name not in present:
            print(f"{name}: no table at {uri}")
            status = status if args.table == "all" else 1
            continue
        dt = DeltaTable(uri, storage_options=options)
        try:
            {"compact": _compact, "vacuum": _vacuum, "repair": _repair}[args.action](args.root, name, dt, args, options)
        except ValueError as e:  # vacuum refusing a table folder that holds files of someone else's
            print(f"error: {name}: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
