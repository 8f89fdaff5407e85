"""The Delta table: commits, retries, crashes, versions, lineage, side tables, upkeep."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataset import (
    DatasetWriter, committed_image_ids, export_parquet, history, iter_masks, read_images, read_pandas,
    read_table, resolve_version,
)
from dataset.lineage import listing_hash, new_lineage
from dataset.maintenance import compact, vacuum
from dataset.synthetic import image_records
from dataset.validation import validate
from schemas import IMAGES, annotation_id, split_annotation_id

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records():
    return image_records(10, 6)


def _ids(table):
    return sorted(table["image_id"].to_pylist())


@pytest.mark.parametrize("mode", ["merge", "append"])
def test_retried_chunk_does_not_duplicate(tmp_path, records, mode):
    w = DatasetWriter(str(tmp_path), new_lineage(round=0, stage="auto"), mode=mode)
    v1 = w.commit_images(records[:4], chunk=0)
    assert w.commit_images(records[:4], chunk=0) is None  # the same chunk again
    # A fresh writer (a restarted job) retrying an overlapping chunk adds only new images.
    w2 = DatasetWriter(str(tmp_path), w.lineage, mode=mode)
    v2 = w2.commit_images(records[2:6], chunk=1)
    assert v2 == v1 + 1
    table = read_images(str(tmp_path))
    assert _ids(table) == sorted(r["image_id"] for r in records[:6])
    assert committed_image_ids(str(tmp_path)) == set(_ids(table))
    assert validate(str(tmp_path)).ok
    if mode == "append":
        with pytest.raises(ValueError, match="chunk"):
            w.commit_images(records[6:])


@pytest.mark.parametrize("mode", ["merge", "append"])
def test_writer_names_the_images_another_run_had_committed(tmp_path, records, mode):
    """already_committed: the images of the last call whose rows another run wrote (nothing was
    written for them); those of a retried chunk of the same run are not among them."""
    other = DatasetWriter(str(tmp_path), new_lineage(round=0, stage="auto", run_id="other"), mode=mode)
    other.commit_images(records[:2], chunk=0)
    w = DatasetWriter(str(tmp_path), new_lineage(round=0, stage="auto", run_id="this"), mode=mode)
    assert w.commit_images(records[1:4], chunk=0) is not None
    assert w.already_committed == [records[1]["image_id"]]
    retry = DatasetWriter(str(tmp_path), w.lineage, mode=mode, app_id="another-writer-of-this-run")
    assert retry.commit_images(records[1:4], chunk=0) is None
    assert retry.already_committed == [records[1]["image_id"]]  # records 2, 3 are this run's own
    assert retry.commit_images(records[2:4], chunk=1) is None and retry.already_committed == []
    assert _ids(read_images(str(tmp_path))) == sorted(r["image_id"] for r in records[:4])


def test_writer_fills_ids_stage_round_and_commit_metadata(tmp_path, records):
    listing = [{"uri": r["uri"], "size": 100, "etag": "e", "listing_hash": "", "run_id": "run-a"} for r in records]
    lh = listing_hash(listing)
    for e in listing:
        e["listing_hash"] = lh
    lin = new_lineage(round=3, stage="semi_auto", params={"points_per_side": 8}, checkpoint_hash="c" * 64,
                      listing_hash=lh, run_id="run-a")
    w = DatasetWriter(str(tmp_path), lin)
    w.start_run(listing)
    w.start_run(listing)  # a resumed run records nothing twice
    v = w.commit_images(records[:3], chunk=7)
    image = read_images(str(tmp_path)).to_pylist()[0]
    for i, ann in enumerate(image["annotations"]):
        assert ann["id"] == annotation_id(image["image_key"], i)
        assert split_annotation_id(ann["id"]) == (image["image_key"], i)
        assert (ann["stage"], ann["round"]) == ("semi_auto", 3)
    commit = history(str(tmp_path))[-1]
    assert commit["version"] == v
    assert {k: commit[k] for k in ("run_id", "round", "stage", "chunk", "images", "masks", "listing_hash")} == {
        "run_id": "run-a", "round": 3, "stage": "semi_auto", "chunk": 7, "images": 3, "masks": 18,
        "listing_hash": lh}
    assert commit["params_json"] == '{"points_per_side":8}' and commit["checkpoint_hash"] == "c" * 64
    assert read_table(str(tmp_path), "lineage").num_rows == 1
    assert read_table(str(tmp_path), "listing").num_rows == len(records)


def test_a_deferred_run_is_recorded_with_its_first_write_only(tmp_path, records):
    """start_run(deferred=True) (the import job): a run that writes nothing leaves no lineage
    or listing row; one that commits or quarantines something records them, once."""
    from dataset.writer import Skipped

    root = str(tmp_path)
    DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0")).commit_images(records[:3])
    listing = [{"uri": r["uri"], "size": 1, "etag": "e", "listing_hash": "", "run_id": "idle"} for r in records[:3]]
    idle = DatasetWriter(root, new_lineage(round=0, stage="imported", run_id="idle"))
    idle.start_run(listing, deferred=True)
    assert idle.commit_all(records[:3]) == []  # every image already in
    assert read_table(root, "lineage").num_rows == 0 and read_table(root, "quarantine").num_rows == 0
    for run_id, stream in (("commits", records[3:5]), ("quarantines", [Skipped("gone.jpg", "missing: no file")])):
        w = DatasetWriter(root, new_lineage(round=0, stage="imported", run_id=run_id))
        w.start_run([dict(e, run_id=run_id) for e in listing], deferred=True)
        w.commit_all(stream)
        w.commit_all(stream)  # written again or not: recorded once
    assert sorted(read_table(root, "lineage")["run_id"].to_pylist()) == ["commits", "quarantines"]
    assert sorted(set(read_table(root, "listing")["run_id"].to_pylist())) == ["commits", "quarantines"]


def test_versions_side_by_side_and_pinned_by_run_or_round(tmp_path, records):
    root = str(tmp_path)
    r0 = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    r0.commit_images(records[:3], chunk=0)
    v0 = r0.commit_images(records[3:5], chunk=1)
    r1 = DatasetWriter(root, new_lineage(round=1, stage="auto", run_id="r1"))
    v1 = r1.commit_images(records[5:], chunk=0)
    r1.append("quarantine", [{"uri": "bad.jpg", "reason": "truncated JPEG", "run_id": "r1"}])
    assert resolve_version(root, run_id="r0") == resolve_version(root, round=0) == v0
    assert resolve_version(root, round=1) == resolve_version(root) == v1
    old, new = read_images(root, round=0), read_images(root, version=v1)
    assert old.num_rows == 5 and new.num_rows == 10
    assert set(_ids(old)) < set(_ids(new))
    assert read_pandas(root, run_id="r0").shape[0] == 5
    assert sum(1 for _ in iter_masks(root, version=v0)) == 5 * 6
    assert read_table(root, "quarantine").to_pylist()[0]["reason"] == "truncated JPEG"
    with pytest.raises(LookupError):
        resolve_version(root, run_id="nope")


_CRASH_CHILD = """
import os, signal, sys, uuid
sys.path.insert(0, {root!r})
import pyarrow.parquet as pq
from dataset import DatasetWriter
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
from schemas import to_table
w = DatasetWriter({table!r}, new_lineage(round=1, stage="auto"))
chunk = [w._complete(r, i) for i, r in enumerate(image_records(12, 6)[6:])]
# The state delta-rs leaves when killed after writing a chunk's data, before its commit:
# a complete Parquet file in the table folder that no log entry names.
pq.write_table(to_table(chunk), {table!r} + "/annotations/part-00000-" + uuid.uuid4().hex + "-c000.zstd.parquet")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_killed_before_commit_leaves_previous_version(tmp_path, records):
    root = str(tmp_path)
    v = DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(records[:6])
    child = subprocess.run([sys.executable, "-c", _CRASH_CHILD.format(root=str(ROOT), table=root)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(list((tmp_path / "annotations").glob("*.parquet"))) == 2  # the orphan is there
    assert resolve_version(root) == v
    assert _ids(read_images(root)) == sorted(r["image_id"] for r in records[:6])
    assert validate(root).ok
    # The rerun commits the chunk properly; vacuum removes the orphan.
    w = DatasetWriter(root, new_lineage(round=1, stage="auto"))
    assert w.commit_images(records[6:]) == v + 1
    assert read_images(root).num_rows == 10
    assert len(vacuum(root, retention_hours=0)) == 1
    assert validate(root).ok and read_images(root, version=v).num_rows == 6


_BIG_CHILD = """
import hashlib, sys
sys.path.insert(0, {root!r})
from dataset import DatasetWriter
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
base = image_records(4, 20)
chunk = [dict(base[i % 4], image_id=hashlib.sha256(str(i).encode()).hexdigest()) for i in range({n})]
w = DatasetWriter({table!r}, new_lineage(round=1, stage="auto"), mode="append")
print("ready", flush=True)
w.commit_images(chunk, chunk=0)
print("committed", flush=True)
"""


@pytest.mark.parametrize("delay", [0.1, 0.4])
def test_writer_killed_at_any_moment_is_all_or_nothing(tmp_path, records, delay):
    root = str(tmp_path)
    v = DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(records[:2])
    code = _BIG_CHILD.format(root=str(ROOT), table=root, n=4000)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)  # somewhere inside building, writing or committing the chunk (~0.6 s)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    now = resolve_version(root)
    print("killed child left version", now, "of", (v, v + 1))
    assert now in (v, v + 1)
    assert read_images(root).num_rows == (2 if now == v else 4002)
    assert read_images(root, version=v).num_rows == 2


def test_compaction_keeps_rows_and_old_versions(tmp_path, records):
    root = str(tmp_path)
    w = DatasetWriter(root, new_lineage(round=0, stage="auto"))
    for i in range(0, 10, 2):
        last = w.commit_images(records[i:i + 2])
    before = read_images(root)
    metrics = compact(root)
    assert metrics["numFilesRemoved"] == 5 and metrics["numFilesAdded"] == 1
    assert _ids(read_images(root)) == _ids(before)
    assert read_images(root, version=last).equals(before)
    assert resolve_version(root, round=0) == last  # compaction commits are not a round's
    vacuum(root, retention_hours=0)
    assert len(list((tmp_path / "annotations").glob("*.parquet"))) == 1
    assert validate(root).ok


def test_parquet_export_and_zstd_data_files(tmp_path, records):
    root = str(tmp_path / "ds")
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(records)
    data_file = next((tmp_path / "ds" / "annotations").glob("*.parquet"))
    assert pq.ParquetFile(data_file).metadata.row_group(0).column(0).compression == "ZSTD"
    files = export_parquet(root, str(tmp_path / "plain"), max_rows_per_file=4)
    assert len(files) == 3
    table = pq.read_table(tmp_path / "plain")
    assert sorted(table["image_id"].to_pylist()) == _ids(read_images(root))
    assert table.cast(IMAGES).schema.names == IMAGES.names


def test_ray_dataset_reads_a_pinned_version(tmp_path, records):
    ray = pytest.importorskip("ray")
    from dataset import read_ray

    root = str(tmp_path)
    w = DatasetWriter(root, new_lineage(round=0, stage="auto"))
    v = w.commit_images(records[:4])
    w.commit_images(records[4:])
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = read_ray(root, version=v).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["image_id"] for r in rows) == sorted(r["image_id"] for r in records[:4])
    assert sum(len(r["annotations"]) for r in rows) == 24


@pytest.mark.parametrize("mode", ["merge", "append"])
def test_table_of_an_older_schema_takes_the_text_prompt_field(tmp_path, records, mode):
    """A table written before masks had text_prompt: new commits add the field (schema
    merge), old rows read back with it null, nothing already written changes."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from dataset.storage import table_uri
    from schemas import MASK

    old_mask = pa.struct([f for f in MASK if f.name != "text_prompt"])
    old_schema = pa.schema([pa.field(f.name, pa.list_(pa.field("element", old_mask, nullable=False)), nullable=False)
                            if f.name == "annotations" else f for f in IMAGES])
    uri = table_uri(str(tmp_path), "annotations")
    first = DatasetWriter(str(tmp_path / "scratch"), new_lineage(round=0, stage="auto"), mode="merge")
    table = pa.Table.from_pylist([first._complete(r, 100 + i) for i, r in enumerate(records[:2])], schema=IMAGES)
    old = table.drop_columns(["annotations"]).append_column(
        pa.field("annotations", old_schema.field("annotations").type, nullable=False),
        pa.array([[{k: v for k, v in a.items() if k != "text_prompt"} for a in row]
                  for row in table["annotations"].to_pylist()], old_schema.field("annotations").type))
    DeltaTable.create(uri, old_schema)
    write_deltalake(uri, old.select(old_schema.names), mode="append")

    w = DatasetWriter(str(tmp_path), new_lineage(round=0, stage="auto"), mode=mode)
    new = dict(records[2], annotations=[dict(a, text_prompt="red ellipse") for a in records[2]["annotations"]])
    assert w.commit_images([new], chunk=0) is not None
    rows = {r["image_id"]: r for r in read_images(str(tmp_path)).to_pylist()}
    assert len(rows) == 3
    assert [a["text_prompt"] for a in rows[records[2]["image_id"]]["annotations"]] == ["red ellipse"] * 6
    for r in records[:2]:
        assert [a["text_prompt"] for a in rows[r["image_id"]]["annotations"]] == [None] * 6
        assert [a["segmentation"] for a in rows[r["image_id"]]["annotations"]] == \
            [a["segmentation"] for a in r["annotations"]]


def test_iter_images_reads_only_the_columns_named(tmp_path):
    """Readers that do not need the masks (the COCO export's images list) name the columns
    they need: the masks, most of a row, are neither read nor made into Python objects."""
    from dataset import iter_images

    root = str(tmp_path / "ds")
    w = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    w.start_run()
    w.commit_images(image_records(5, 3), chunk=0)
    full = {r["image_key"]: r for r in iter_images(root)}
    columns = ["image_key", "uri", "width", "phash"]
    rows = list(iter_images(root, columns=columns, batch_rows=2))
    assert len(rows) == 5 and all(list(r) == columns for r in rows)
    assert all(r[c] == full[r["image_key"]][c] for r in rows for c in columns)
