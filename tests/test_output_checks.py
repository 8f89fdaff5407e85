"""The output the job writes into: a new or empty folder or an existing dataset, never a
folder of the user's own files (a vacuum clears every file of a table's folder that the
table does not name), never an empty name; refused before any work with exit code 2 and a
one-line reason. And vacuum itself deletes nothing that is not a table's own."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from dataset import DatasetWriter, table_uri
from dataset.lineage import new_lineage
from dataset.maintenance import vacuum
from dataset.synthetic import image_records
from jobs.auto_annotate import load_config
from pipeline.sources import InputError, check_output
from tests.s3server import moto_server

ROOT = Path(__file__).resolve().parents[1]
MONTH_AGO = time.time() - 30 * 24 * 3600  # older than any retention a vacuum is given here


def _dataset(root: str) -> None:
    """A dataset as the job leaves it: its tables, one image committed."""
    writer = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    writer.start_run()
    writer.commit_images(image_records(1, 2))


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/auto_annotate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def test_a_new_or_empty_folder_and_a_dataset_are_accepted(tmp_path):
    check_output(str(tmp_path / "new" / "dataset"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"finder")  # hidden names do not count
    check_output(str(tmp_path / "empty"))
    _dataset(str(tmp_path / "ds"))
    (tmp_path / "ds" / "NOTES.md").write_text("what this dataset is for")  # beside the tables: harmless
    check_output(str(tmp_path / "ds"))
    check_output(f"file://{tmp_path / 'ds'}")
    # A data engine's root before its first commit: checkpoint 0, the round's inputs, its records.
    engine = tmp_path / "engine"
    (engine / "checkpoints").mkdir(parents=True)
    (engine / "checkpoints" / "round_0.pt").write_bytes(b"weights")
    (engine / "inputs" / "round_0").mkdir(parents=True)
    (engine / "rounds").mkdir()
    check_output(str(engine))
    # Table folders a crash left behind while creating them: empty, or an empty log.
    (tmp_path / "crashed" / "annotations" / "_delta_log").mkdir(parents=True)
    (tmp_path / "crashed" / "quarantine").mkdir()
    check_output(str(tmp_path / "crashed"))


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path):
    notds = tmp_path / "notds"
    (notds / "annotations").mkdir(parents=True)
    (notds / "annotations" / "labels.json").write_text("{}")
    with pytest.raises(InputError, match=f"output {notds}: {notds / 'annotations'} holds files but no _delta_log"):
        check_output(str(notds))
    home = tmp_path / "home"
    home.mkdir()
    (home / "holiday.jpg").write_bytes(b"a photo")
    for root in (str(home), f"file://{home}"):
        with pytest.raises(InputError, match=f"{home} is not empty and holds none of the dataset's tables"):
            check_output(root)
    (home / "checkpoints").mkdir()  # a name the engine writes does not make it a dataset
    with pytest.raises(InputError, match="holds none of the dataset's tables"):
        check_output(str(home))
    _dataset(str(tmp_path / "ds"))
    (tmp_path / "ds" / "listing").write_text("a file where a table's folder goes")
    with pytest.raises(InputError, match="listing holds files but no _delta_log"):
        check_output(str(tmp_path / "ds"))


def test_the_job_refuses_a_folder_of_the_users_files_and_leaves_it_alone(tmp_path):
    """The audit's case: an annotations/ folder of the user's beside which the job used to
    write its tables, after which a vacuum deleted labels.json."""
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(tmp_path / "in" / "one.png")
    notds = tmp_path / "notds"
    (notds / "annotations").mkdir(parents=True)
    (notds / "annotations" / "labels.json").write_text("{}")
    r = _job("--input", str(tmp_path / "in"), "--output", str(notds), "--points-per-side", "8")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"error: output {notds}: {notds / 'annotations'} holds files but no _delta_log, so it is not a table "
        "of a dataset; name a new or empty folder, or an existing dataset"]
    assert sorted(p.relative_to(notds).as_posix() for p in notds.rglob("*")) == ["annotations",
                                                                                 "annotations/labels.json"]


def test_vacuum_deletes_nothing_in_a_folder_holding_files_that_are_not_the_tables(tmp_path):
    root = tmp_path / "notds"  # a dataset written beside the user's file before outputs were checked
    (root / "annotations").mkdir(parents=True)
    labels = root / "annotations" / "labels.json"
    labels.write_text("{}")
    _dataset(str(root))
    os.utime(labels, (MONTH_AGO, MONTH_AGO))
    with pytest.raises(ValueError, match=r"holds files that no writer of the table makes \(labels.json\)"):
        vacuum(str(root), retention_hours=0)
    assert labels.read_text() == "{}"
    mine = root / "listing" / "mine.csv"  # a table's folder that is no table at all
    mine.parent.mkdir()
    mine.write_text("a,b\n")
    os.utime(mine, (MONTH_AGO, MONTH_AGO))
    with pytest.raises(ValueError, match="listing is not a Delta table: vacuum deletes nothing there"):
        vacuum(str(root), "listing", retention_hours=0, dry_run=True)
    assert mine.read_text() == "a,b\n"
    r = subprocess.run([sys.executable, "jobs/maintain.py", str(root), "vacuum", "--table", "annotations",
                        "--retention-hours", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds files that no writer of the table makes" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and labels.read_text() == "{}"
    labels.rename(tmp_path / "labels.json")  # moved out: the table's own upkeep goes on
    orphan = root / "annotations" / "part-00000-orphan-c000.zstd.parquet"  # a killed writer's
    pq.write_table(pa.table({"image_id": ["x"]}), orphan)
    os.utime(orphan, (MONTH_AGO, MONTH_AGO))
    assert vacuum(str(root), retention_hours=0) == [orphan.name] and not orphan.exists()


def test_an_empty_output_is_refused_naming_the_field(tmp_path):
    """--output "$OUT" with OUT unset: the tables would go to /annotations, /quarantine, ..."""
    for value in ("", "  "):
        with pytest.raises(ValidationError) as e:
            load_config(["--output", value])
        assert e.value.errors()[0]["loc"] == ("output",) and "the output is empty" in str(e.value)
    with pytest.raises(ValueError, match="the dataset root is empty"):
        table_uri("", "annotations")
    with pytest.raises(InputError, match="output is empty"):
        check_output(" ")
    r = _job("--input", str(tmp_path), "--output", "")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: invalid settings: output: the output is empty"), r.stderr


def test_an_s3_prefix_that_is_not_a_dataset_is_refused():
    import boto3

    with moto_server("data") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        check_output("s3://data")  # an empty bucket
        s3.put_object(Bucket="data", Key="photos/holiday.jpg", Body=b"a photo")
        for root in ("s3://data/photos", "s3://data/photos/", "s3://data"):
            with pytest.raises(InputError, match=f"output {root}: {root} is not empty and holds none of the"):
                check_output(root)
        s3.put_object(Bucket="data", Key="notds/annotations/labels.json", Body=b"{}")
        with pytest.raises(InputError, match="s3://data/notds/annotations holds files but no _delta_log"):
            check_output("s3://data/notds")
        check_output("s3://data/new/dataset")
        check_output("s3://data/photo")  # a prefix of a name is not a folder: nothing under photo/
        _dataset("s3://data/ds")
        s3.put_object(Bucket="data", Key="ds/NOTES.md", Body=b"what this dataset is for")
        check_output("s3://data/ds")
