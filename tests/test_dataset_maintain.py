"""jobs/maintain.py end to end: compaction keeps every row in fewer files, vacuum lists then
deletes a killed writer's orphan file, versions within the retention stay readable, and
repair drops a lost data file so that the job annotates its inputs again."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from dataset import (DataFileMissing, DatasetWriter, export_parquet, iter_images, read_images, read_table,
                     resolve_version, storage_options, table_uri)
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
from dataset.validation import validate
from jobs.export import main as export_main
from jobs.maintain import main as maintain_main
from jobs.report import main as report_main
from tests.s3server import moto_server

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "maintain.py")]

# A writer killed after writing its chunk's Parquet file, before the commit that would name it.
_KILLED_WRITER = """
import os, signal, sys, uuid
sys.path.insert(0, {repo!r})
import pyarrow.parquet as pq
from dataset import DatasetWriter
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
from schemas import to_table
w = DatasetWriter({root!r}, new_lineage(round=1, stage="auto"))
chunk = [w._complete(r, 1000 + i) for i, r in enumerate(image_records(14, 2)[12:])]
pq.write_table(to_table(chunk), {root!r} + "/annotations/part-00000-" + uuid.uuid4().hex + "-c000.zstd.parquet")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run(*args, check=0):
    out = subprocess.run(JOB + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert out.returncode == check, out.stdout + out.stderr
    return out.stdout


def _live_files(root, name="annotations"):
    return len(DeltaTable(table_uri(root, name)).file_uris())


def _on_disk(root):
    return sorted(p.name for p in (Path(root) / "annotations").glob("*.parquet"))


def test_compact_and_vacuum_a_local_dataset(tmp_path):
    root = str(tmp_path / "ds")
    records = image_records(10, 3)
    w = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    w.start_run()
    for i in range(0, 10, 2):
        last = w.commit_images(records[i:i + 2], chunk=i // 2)
    for uri in ("a.jpg", "b.jpg"):
        w.append("quarantine", [{"uri": uri, "reason": "truncated JPEG", "run_id": "r0"}])
    before = read_images(root)
    assert _live_files(root) == 5 and _live_files(root, "quarantine") == 2

    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(repo=str(ROOT), root=root)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = {Path(u).name for u in DeltaTable(table_uri(root, "annotations")).file_uris()}
    orphans = [f for f in _on_disk(root) if f not in committed]
    assert len(orphans) == 1
    hours_ago = time.time() - 3 * 3600  # the writer died three hours ago
    os.utime(Path(root) / "annotations" / orphans[0], (hours_ago, hours_ago))

    # compact --dry-run: lists the five chunk files, changes nothing.
    out = _run(root, "compact", "--table", "annotations", "--dry-run")
    assert "would merge 5 files" in out, out
    assert len(re.findall(r"^  part-.*\.parquet  \d+$", out, re.M)) == 5, out
    assert resolve_version(root) == last and _live_files(root) == 5

    # compact (all tables): one file per table, every row kept, the old version untouched.
    out = _run(root, "compact")
    assert re.search(r"^annotations: .*removed 5 files, added 1; now version \d+: 1 files, \d+ bytes, 10 rows$",
                     out, re.M), out
    assert re.search(r"^quarantine: .*removed 2 files, added 1;", out, re.M), out
    assert re.search(r"^lineage: .*removed 0 files, added 0;", out, re.M), out  # a single file: left alone
    assert resolve_version(root) == last + 1 and _live_files(root) == 1 and _live_files(root, "quarantine") == 1
    assert sorted(read_images(root)["image_id"].to_pylist()) == sorted(before["image_id"].to_pylist())
    assert read_images(root, version=last).equals(before)
    assert read_table(root, "quarantine").num_rows == 2
    assert resolve_version(root, round=0) == last  # a compaction is no round's commit

    # vacuum --dry-run, retention 1 h: only the orphan (older than 1 h) is listed; nothing is deleted.
    on_disk = _on_disk(root)
    out = _run(root, "vacuum", "--retention-hours", "1", "--dry-run")
    assert re.search(r"^annotations: .*would delete 1 files .*:\n  " + re.escape(orphans[0]) + "$", out, re.M), out
    assert re.search(r"^quarantine: .*would delete 0 files", out, re.M), out
    assert _on_disk(root) == on_disk

    # vacuum, retention 1 h: the orphan goes; the files compaction replaced a moment ago stay,
    # so the pre-compaction version is still readable.
    out = _run(root, "vacuum", "--retention-hours", "1")
    assert re.search(r"^annotations: .*deleted 1 files", out, re.M), out
    assert _on_disk(root) == [f for f in on_disk if f != orphans[0]]
    assert read_images(root, version=last).equals(before)
    assert validate(root).ok and validate(root, version=last).ok

    # vacuum, retention 0: the replaced files go too; the latest version is whole, time
    # travel to before the compaction is gone.
    out = _run(root, "vacuum", "--table", "annotations", "--retention-hours", "0")
    assert re.search(r"^annotations: .*deleted 5 files", out, re.M), out
    assert len(_on_disk(root)) == 1
    assert read_images(root).num_rows == 10 and validate(root).ok
    with pytest.raises(Exception):
        read_images(root, version=last)


def test_absent_table_and_bad_arguments(tmp_path, capsys):
    root = str(tmp_path)
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(image_records(2, 1))
    out = _run(root, "vacuum", "--table", "listing", "--dry-run", check=1)
    assert out.startswith("listing: no table at")
    assert maintain_main([root, "compact", "--dry-run"]) == 0  # all tables: absent ones are only reported
    out = capsys.readouterr().out
    assert "annotations: version 1: 1 files" in out and "nothing to compact" in out
    assert "duplicates: no table at" in out
    for bad in (["vacuum", "--retention-hours", "-1"], ["shrink"], ["vacuum", "--table", "images"]):
        with pytest.raises(SystemExit) as exit_:
            maintain_main([root, *bad])
        assert exit_.value.code == 2


def test_a_root_without_tables_is_an_error_for_every_action(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a dataset")
    actions = (["compact"], ["vacuum"], ["vacuum", "--dry-run"], ["repair"], ["repair", "--table", "lineage"])
    for root in (tmp_path / "nonexistent", empty):
        for args in actions:
            assert maintain_main([str(root), *args]) == 2, args
            captured = capsys.readouterr()
            assert captured.out == "" and captured.err == f"error: no dataset at {root}: none of its tables " \
                "(annotations, quarantine, duplicates, listing, lineage) is there\n", args
    out = subprocess.run(JOB + [str(tmp_path / "nonexistent"), "vacuum"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stdout + out.stderr
    assert not (tmp_path / "nonexistent").exists() and [p.name for p in empty.iterdir()] == ["notes.txt"]


def test_compact_on_s3():
    with moto_server("maint") as endpoint:
        root = "s3://maint/ds"
        records = image_records(6, 2)
        w = DatasetWriter(root, new_lineage(round=0, stage="auto"))
        for i in range(0, 6, 2):
            last = w.commit_images(records[i:i + 2])
        before = read_images(root)
        out = _run(root, "compact", "--table", "annotations", "--endpoint-url", endpoint)
        assert "removed 3 files, added 1" in out, out
        opts = storage_options(root)
        assert len(DeltaTable(table_uri(root, "annotations"), storage_options=opts).file_uris()) == 1
        assert read_images(root).sort_by("image_id").equals(before.sort_by("image_id"))
        assert read_images(root, version=last).equals(before)
        out = _run(root, "vacuum", "--table", "annotations", "--retention-hours", "0", "--dry-run")
        assert "would delete 3 files" in out, out


def test_repair_drops_a_lost_file_and_the_next_run_redoes_its_inputs(tmp_path, capsys):
    from pipeline.progress import committed_state
    from pipeline.sources import InputError

    root = str(tmp_path / "ds")
    records = image_records(4, 2)
    w = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    w.start_run()
    w.commit_images(records[:2], chunk=0)
    w.commit_images(records[2:], chunk=1)
    first = {r["uri"] for r in read_images(root, columns=["uri"]).to_pylist()}
    assert len(first) == 4
    lost = sorted((Path(root) / "annotations").glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)[0]
    lost.unlink()
    # The resume read says what happened and what to do, instead of a pyarrow traceback.
    with pytest.raises(InputError, match=r"annotations table names a data file that is missing.*maintain.py .* repair"):
        committed_state(root, {})
    # So do the readers and the jobs that read a version, instead of pyarrow's FileNotFoundError.
    fix = r"data file that is missing.*" + re.escape(lost.name) + r".*maintain.py .* repair"
    for read in (lambda: read_images(root), lambda: list(iter_images(root)),
                 lambda: export_parquet(root, str(tmp_path / "parquet"))):
        with pytest.raises(DataFileMissing, match=fix):
            read()
    for job, args in ((export_main, ["--to", "coco", "--dest", str(tmp_path / "coco.json")]),
                      (export_main, ["--to", "parquet", "--dest", str(tmp_path / "parquet")]),
                      (report_main, ["--out", str(tmp_path / "report.html"), "--gallery", "0"])):
        assert job([root, *args]) == 2
        assert re.search(fix, capsys.readouterr().err)
    assert not any(tmp_path.glob("coco.json*")) and not (tmp_path / "report.html").exists()
    assert validate(root).faults["missing_file"]
    assert _run(root, "repair", "--dry-run").splitlines()[0] == "annotations: would drop 1 missing data files:"
    assert not validate(root).ok  # a dry run changes nothing
    out = _run(root, "repair")
    assert f"annotations: dropped 1 missing data files:\n  {lost.name}" in out and "lineage: dropped 0" in out
    assert validate(root).ok
    kept = {r["uri"] for r in read_images(root, columns=["uri"]).to_pylist()}
    assert len(kept) == 2 and kept < first
    done, _ = committed_state(root, {})
    assert set(done.to_pylist()) == kept  # the lost file's inputs count as not done: a rerun redoes them
    assert "dropped 0 missing" in _run(root, "repair", "--table", "annotations")  # nothing more to drop


def _row_groups(path) -> tuple[list[int], set[str]]:
    """Rows of each row group of a Parquet file, and its columns' compression codecs."""
    meta = pq.ParquetFile(path).metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    return [g.num_rows for g in groups], {g.column(c).compression for g in groups for c in range(g.num_columns)}


def test_images_files_keep_small_row_groups_through_compaction_rebuild_deletes_and_exports(tmp_path):
    """Images rows hold all their masks, so readers that load a row group at a time (the
    report's sample, exports) need row groups of few rows: delta-rs' default made a compacted
    file of 20,000 images one row group. Rebuild deletes rewrite files zstd-compressed, as the
    writer does (they fell back to delta-rs' default codec)."""
    from dataset.writer import IMAGE_ROWS_PER_GROUP
    from pipeline.rebuild import delete_records

    root = str(tmp_path / "ds")
    n = IMAGE_ROWS_PER_GROUP * 2 + 88
    records = image_records(n, 1, 24, 32)
    w = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    w.start_run()
    w.commit_images(records[: n // 2], chunk=0)
    w.commit_images(records[n // 2:], chunk=1)
    _run(root, "compact", "--table", "annotations")
    (path,) = DeltaTable(table_uri(root, "annotations")).file_uris()
    groups, codecs = _row_groups(path)
    assert sum(groups) == n and max(groups) <= IMAGE_ROWS_PER_GROUP and codecs == {"ZSTD"}, (groups, codecs)

    gone = [r["uri"] for r in records[:5]]
    assert delete_records(root, gone, {}, "test") == 5
    for path in DeltaTable(table_uri(root, "annotations")).file_uris():
        groups, codecs = _row_groups(path)
        assert max(groups) <= IMAGE_ROWS_PER_GROUP and codecs == {"ZSTD"}, (path, groups, codecs)

    files = export_parquet(root, str(tmp_path / "plain"), max_rows_per_file=300)
    sizes = [_row_groups(f)[0] for f in files]
    assert [sum(s) for s in sizes] == [300, n - 5 - 300] and max(map(max, sizes)) <= IMAGE_ROWS_PER_GROUP, sizes
    exported = pq.read_table(str(tmp_path / "plain"))
    assert sorted(exported["image_id"].to_pylist()) == sorted(r["image_id"] for r in records[5:])
