"""Single-file outputs given as URIs: checkpoints go to s3:// (written locally, then uploaded
whole) and read back with the pipeline's reader; outputs that can only be local refuse a
URI in one line, exit 2, instead of making a local folder named `s3:`. S3 is moto_server in
its own process."""
from __future__ import annotations

import json
import os

import pytest
import torch

from actors.annotator import local_checkpoint
from model import CheckpointError, Sam, get_config, load_checkpoint, save_checkpoint
from model.checkpoint import file_sha256
from pipeline.cluster import refuse_job_copy_paths
from pipeline.sources import InputError, s3_filesystem
from tests.s3server import moto_server


def test_save_checkpoint_uploads_to_s3_with_the_given_endpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Sam(get_config("vit_tiny256"))
    with moto_server("ckpt") as endpoint:
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the argument names the store
        digest = save_checkpoint(model, "s3://ckpt/models/tiny.pt", {"run": 1}, endpoint_url=endpoint)
        path = local_checkpoint("s3://ckpt/models/tiny.pt", endpoint)
        assert s3_filesystem(endpoint).ls("ckpt/models") == ["ckpt/models/tiny.pt"]  # no temporary object left
    assert digest == file_sha256(path)
    loaded, meta = load_checkpoint(path)
    assert meta == {"run": 1}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert os.listdir(tmp_path) == []  # no local folder named s3:


def test_other_schemes_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Sam(get_config("vit_tiny256"))
    for bad, words in (("gs://b/x.pt", "not a gs:// one"), ("s3://bucket-only", "names a bucket and a key")):
        with pytest.raises(CheckpointError, match=words):
            save_checkpoint(model, bad)
    assert os.listdir(tmp_path) == []


def test_train_crop_embedder_writes_its_weights_to_s3(tmp_path, monkeypatch, capsys):
    """End to end through the job (tiny run): the weights land in the bucket under --endpoint-url,
    the printed sha256 is the object's, and they load as the registered embedder does."""
    from jobs import train_crop_embedder
    from model.crop_embedder import MiniLMCropEmbedder

    monkeypatch.chdir(tmp_path)
    with moto_server("ckpt") as endpoint:
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        assert train_crop_embedder.main(["--output", "s3://ckpt/crops.pt", "--endpoint-url", endpoint,
                                         "--scenes", "3", "--steps", "2", "--eval-scenes", "2", "--batch", "4"]) == 0
        out = capsys.readouterr().out
        report = json.loads(out[out.rindex("{\n"):])
        path = local_checkpoint("s3://ckpt/crops.pt", endpoint)
    assert report["output"] == "s3://ckpt/crops.pt" and report["sha256"] == file_sha256(path)
    assert MiniLMCropEmbedder(path).meta["train_seed"] == train_crop_embedder.TRAIN_SEED
    assert os.listdir(tmp_path) == []


def test_jobs_refuse_a_checkpoint_scheme_they_cannot_write(tmp_path, monkeypatch, capsys):
    from jobs import calibrate_checkpoint, train, train_crop_embedder, train_text

    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "c.pt")
    for main, argv, shown in (
            (train.main, ["--steps", "1", "--storage", "gs://b/runs"], "gs://b/runs/run/final.pt"),
            (train.main, ["--steps", "1", "--output", "gs://b/final.pt"], "gs://b/final.pt"),
            (train_crop_embedder.main, ["--output", "gs://b/crops.pt"], "gs://b/crops.pt"),
            (train_text.main, ["--output", "gs://b/text.pt"], "gs://b/text.pt"),
            (calibrate_checkpoint.main, ["--checkpoint", ckpt, "--output", "gs://b/c.pt"], "gs://b/c.pt"),
            (calibrate_checkpoint.main, ["--checkpoint", "gs://b/c.pt"], "gs://b/c.pt")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {shown}: ") and "not a gs:// one" in err and "\n" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("job,argv,flag", [
    ("report", ["ds", "--out", "s3://b/r.html"], "--out"),
    ("label_studio", ["export", "ds", "s3://b/tasks"], "dest"),
    ("export", ["ds", "--to", "coco", "--dest", "s3://b/x.json"], "--dest"),
    ("export", ["ds", "--to", "sa1b", "--dest", "file:///tmp/x"], "--dest"),
])
def test_local_only_outputs_refuse_uris(job, argv, flag, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"jobs.{job}").main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be a local path" in err, err
    assert os.listdir(tmp_path) == []


def test_the_job_copy_refusal_suggests_s3_only_where_the_output_takes_it(tmp_path, monkeypatch):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_3"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for s3 in (True, False):
        with pytest.raises(InputError) as e:
            refuse_job_copy_paths([("--out", "r.html")], tmp_path, s3=s3)
        assert "temporary copy" in str(e.value) and ("s3://" in str(e.value)) == s3, e.value
