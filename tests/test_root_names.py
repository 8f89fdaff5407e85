"""Dataset roots whose path holds a character delta-rs misreads (% # ? [ ] | ^ \\ or a control
character) are refused up front, by writers and readers alike, with one line and exit 2:
delta-rs would put the tables under another name than runs/, lose their history, or fail
with a traceback after making half a table. Input images with such names still work."""
from __future__ import annotations

import os
import shutil

import pytest

from dataset import DatasetWriter, read_images, table_uri
from dataset.lineage import new_lineage
from dataset.storage import ROOT_NAME_CHARS, root_name_problem
from dataset.synthetic import image_records
from jobs import auto_annotate, export, maintain, report, validate
from pipeline.sources import InputError, check_output, list_inputs, read_bytes
from tests.s3server import moto_server

BAD_NAMES = ("dsq%41", "h2 #x", "q?x", "br[x]", "pipe|x", "hat^x", "back\\s", "tab\tx")


def _dataset(root: str) -> None:
    writer = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    writer.start_run()
    writer.commit_images(image_records(1, 2))


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "delta-rs" in err and all(n in err for n in names), err
    return err


def test_the_characters_are_found_in_the_whole_local_path(tmp_path, monkeypatch):
    assert set("%#?[]|^\\") <= set(ROOT_NAME_CHARS)
    for name in BAD_NAMES:
        assert root_name_problem(str(tmp_path / name)), name
        assert root_name_problem(f"s3://bucket/{name}"), name
        with pytest.raises(ValueError, match="delta-rs"):
            table_uri(name, "annotations")
    for good in ("plain", "with space", "a&b+c=d", "ü", "x{y}<z>"):
        assert root_name_problem(str(tmp_path / good)) is None, good
        assert root_name_problem(f"s3://bucket/{good}") is None, good
    (tmp_path / "p#1").mkdir()
    monkeypatch.chdir(tmp_path / "p#1")  # a relative root inside such a folder
    assert "#" in root_name_problem("out")


def test_writers_refuse_such_a_root_locally(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in BAD_NAMES:
        with pytest.raises(InputError, match="misreads"):
            check_output(name)
    images = str(tmp_path / "in")
    os.makedirs(images)
    assert auto_annotate.main(["--input", images, "--output", "dsq%41"]) == 2
    err = _one_line_error(capsys, "dsq%41", "%")
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["in"]  # nothing made: no dsqA/, no dsq%41/


def test_writers_refuse_such_a_root_on_s3(capsys):
    import boto3

    with moto_server("data") as endpoint:
        for name in ("p2%41", "h2 #x", "q?x"):
            with pytest.raises(InputError, match="misreads"):
                check_output(f"s3://data/{name}", endpoint)
        assert auto_annotate.main(["--output", "s3://data/h2 #x"]) == 2
        _one_line_error(capsys, "s3://data/h2 #x", "#")
        listed = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_objects_v2(Bucket="data")
        assert listed["KeyCount"] == 0


def test_readers_refuse_a_copy_of_a_dataset_at_such_a_name(tmp_path, capsys):
    """A copy at such a name would read with no history (a --run-id or --round pin finds
    nothing) or its tables under another folder: each reading job says why, in one line."""
    _dataset(str(tmp_path / "ds"))
    copy = str(tmp_path / "copy%41")
    shutil.copytree(tmp_path / "ds", copy)
    for main, argv in ((validate.main, [copy]), (validate.main, [copy, "--run-id", "r0"]),
                       (export.main, [copy, "--to", "coco", "--dest", str(tmp_path / "x.json")]),
                       (report.main, [copy, "--out", str(tmp_path / "x.html")]),
                       (maintain.main, [copy, "compact"])):
        assert main(argv) == 2, argv
        _one_line_error(capsys, copy, "%")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.html").exists()
    assert read_images(str(tmp_path / "ds"), run_id="r0").num_rows == 1  # the original reads


def test_input_images_with_such_names_still_list_and_read(tmp_path):
    folder = tmp_path / "in%41 #x"
    folder.mkdir()
    for name in ("a%41.png", "b#1.jpg", "c?d.png", "e[1].png"):
        (folder / name).write_bytes(b"image bytes " + name.encode())
    listing = list_inputs(str(folder))
    assert [os.path.basename(u) for u in listing["uri"].to_pylist()] == ["a%41.png", "b#1.jpg", "c?d.png", "e[1].png"]
    for uri in listing["uri"].to_pylist():
        assert read_bytes(uri, max_bytes=1000).startswith(b"image bytes ")
