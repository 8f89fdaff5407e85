"""Jobs run by `ray job submit --working-dir .` run in Ray's temporary copy of the folder
(<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/): local paths that resolve
inside it are refused before anything starts. Simulated: the code copied under such a
folder, run from there as the job supervisor runs an entrypoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster import job_working_dir_copy, refuse_job_copy_paths
from pipeline.sources import InputError

ROOT = Path(__file__).resolve().parents[1]
CODE = ("amg", "dataset", "engine", "jobs", "model", "pipeline", "schemas", "training", "actors", "examples")


@pytest.fixture
def job_copy(tmp_path):
    """(copy folder, env): the code (no checkpoints) where Ray would unpack a working dir."""
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    for name in CODE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}})}
    env.pop("RAY_ADDRESS", None)
    return copy, env


def _run(copy: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=120)


def _refused(r: subprocess.CompletedProcess, flag: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), r.stderr
    assert "temporary copy" in lines[0] and "s3://" in lines[0]


def test_relative_output_and_input_are_refused(job_copy, tmp_path):
    copy, env = job_copy
    r = _run(copy, env, "jobs/auto_annotate.py", "--input", "examples/images", "--output", "out/submitted")
    _refused(r, "--output out/submitted")
    assert not (copy / "out").exists()
    r = _run(copy, env, "jobs/auto_annotate.py", "--input", "examples/images", "--output", str(tmp_path / "ds"))
    _refused(r, "--input examples/images")
    assert not (tmp_path / "ds").exists()


def test_default_output_is_refused(job_copy, tmp_path):
    copy, env = job_copy
    r = _run(copy, env, "jobs/auto_annotate.py", "--input", str(ROOT / "examples" / "images"))
    _refused(r, "the default --output")
    assert str(copy / "out" / "auto_annotate") in r.stderr


def test_default_input_is_read_from_the_copy_with_a_note(job_copy, tmp_path):
    copy, env = job_copy
    (tmp_path / "a_file").write_text("x")
    # Past the working-dir check; the output (a file) then stops it before Ray starts.
    r = _run(copy, env, "jobs/auto_annotate.py", "--output", str(tmp_path / "a_file"))
    assert r.returncode == 2
    assert "note: reading the bundled sample images from Ray's temporary copy" in r.stderr
    assert "is a file" in r.stderr


def test_rebuild_and_data_engine_refuse_paths_in_the_copy(job_copy, tmp_path):
    copy, env = job_copy
    r = _run(copy, env, "jobs/rebuild.py", "--output", str(tmp_path / "ds"))
    _refused(r, "the default --input")
    r = _run(copy, env, "jobs/rebuild.py", "--input", str(ROOT / "examples" / "images"), "--output", "ds")
    _refused(r, "--output ds")
    r = _run(copy, env, "jobs/data_engine.py", "--root", "out/engine", "--synthetic-inputs", "2")
    _refused(r, "--root out/engine")
    r = _run(copy, env, "jobs/data_engine.py", "--root", str(tmp_path / "engine"), "--rounds", "1",
             "--input", "examples/images")
    _refused(r, "--input examples/images")


def test_paths_outside_the_copy_pass(tmp_path, monkeypatch):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert job_working_dir_copy() == str(copy)
    refuse_job_copy_paths([("--output", str(tmp_path / "ds")), ("--input", "s3://b/images"),
                           ("--output", "s3://b/x y")], ROOT)
    with pytest.raises(InputError, match="--output file://out"):
        refuse_job_copy_paths([("--output", "file://out")], ROOT)
    monkeypatch.chdir(tmp_path)  # not a job's copy (nor is the code's folder): nothing is refused
    assert job_working_dir_copy() is None
    refuse_job_copy_paths([("--output", "out")], ROOT)


def test_the_other_writing_jobs_refuse_paths_in_the_copy(tmp_path, monkeypatch, capsys):
    """In-process, run from a copy: what each job writes (an export, a report, imported
    records, Label Studio tasks, accepted masks, training runs) must not go into it."""
    from jobs import annotate_service, export, import_, label_studio, report, train

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_2"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    ds, src = str(tmp_path / "ds"), str(tmp_path / "labels.json")
    for main, argv, flag in (
            (export.main, [ds, "--to", "coco", "--dest", "x.json"], "--dest x.json"),
            (report.main, [ds, "--out", "r.html"], "--out r.html"),
            (report.main, ["ds"], "the dataset root (where its report goes) ds"),
            (import_.main, ["ds", src, "--from", "coco"], "ROOT ds"),
            (label_studio.main, ["export", ds, "tasks"], "DEST tasks"),
            (label_studio.main, ["import", src, "ds", "--round", "0"], "ROOT ds"),
            (annotate_service.main, ["--images", str(tmp_path), "--output", "ds"], "--output ds"),
            (train.main, ["--steps", "1"], "--storage runs")):  # the default storage is relative
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} resolves to ") and "temporary copy" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(copy) == []


def test_the_maintainer_jobs_refuse_paths_in_the_copy(tmp_path, monkeypatch, capsys):
    """In-process, run from a copy: what the checkpoint-making jobs write (a text or crop
    checkpoint, an examples cache, a calibrated checkpoint) and the tables and files they
    read must not lie in it, nor may a dataset that validate checks or maintain rewrites.
    Each case's other arguments would keep it short were the path let through."""
    from jobs import calibrate_checkpoint, maintain, train_crop_embedder, train_text, validate

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_3"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    elsewhere, missing = str(tmp_path / "text.pt"), str(tmp_path / "missing.pt")
    for main, argv, flag in (
            (train_text.main, ["--output", "text.pt", "--embedder", "none"], "--output text.pt"),
            (train_text.main, ["--output", elsewhere, "--examples-cache", "cache.pt", "--embedder", "none"],
             "--examples-cache cache.pt"),
            (train_text.main, ["--output", elsewhere, "--dataset", str(tmp_path / "t"), "--dataset", "t",
                               "--embedder", "none"], "--dataset t"),
            (train_text.main, ["--output", elsewhere, "--captions", "c.json", "--embedder", "none"],
             "--captions c.json"),
            (train_crop_embedder.main, ["--output", "crops.pt", "--scenes", "1", "--steps", "1", "--eval-scenes", "1"], "--output crops.pt"),
            (calibrate_checkpoint.main, ["--checkpoint", "m.pt"], "--checkpoint (rewritten in place) m.pt"),
            (calibrate_checkpoint.main, ["--checkpoint", missing, "--output", "m.pt"], "--output m.pt"),
            (maintain.main, ["ds", "compact"], "ROOT ds"),
            (validate.main, ["ds"], "ROOT ds")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} resolves to ") and "temporary copy" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(copy) == []
    # Reading a checkpoint from the copy is fine when what is written goes elsewhere: past
    # the check, the missing file is what stops it.
    assert calibrate_checkpoint.main(["--checkpoint", "m.pt", "--output", missing]) == 2
    assert "temporary copy" not in capsys.readouterr().err


def test_maintainer_jobs_refuse_their_default_outputs_in_the_copy(job_copy):
    """Their default outputs lie under the code's checkpoints/ folder, so in the copy."""
    copy, env = job_copy
    r = _run(copy, env, "jobs/train_crop_embedder.py", "--scenes", "1", "--steps", "1", "--eval-scenes", "1")
    _refused(r, "the default --output")
    assert str(copy / "checkpoints" / "crop_embedder_minilm.pt") in r.stderr
    r = _run(copy, env, "jobs/train_text.py")
    _refused(r, "the default --output")
    assert str(copy / "checkpoints" / "samengine_tiny256_text.pt") in r.stderr
    assert not (copy / "checkpoints").exists()
