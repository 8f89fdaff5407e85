"""Single-file outputs given as URIs: checkpoints go to s3:// (written locally, then uploaded
whole) and read back with the pipeline's reader; outputs that can only be local refuse a
URI in one line, exit 2, instead of making a local folder named `s3:`. Starting checkpoints
may be s3:// too, reached through --endpoint-url alone. S3 is moto_server in its own process."""
from __future__ import annotations

import json
import os

import pytest
import torch

from model import CheckpointError, Sam, get_config, load_checkpoint, save_checkpoint
from model.checkpoint import file_sha256, local_checkpoint
from pipeline.cluster import refuse_job_copy_paths
from pipeline.sources import InputError, s3_filesystem
from tests.s3server import moto_server


def test_save_checkpoint_uploads_to_s3_with_the_given_endpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Sam(get_config("vit_tiny256"))
    with moto_server("ckpt") as endpoint, monkeypatch.context() as env:
        env.delenv("AWS_ENDPOINT_URL")  # only the argument names the store (restored before the server's own)
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
    with moto_server("ckpt") as endpoint, monkeypatch.context() as env:
        env.delenv("AWS_ENDPOINT_URL")
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


# ---- s3:// starting checkpoints, with --endpoint-url the only way to the store ----------------


def test_train_job_refuses_an_unusable_s3_init_checkpoint_before_starting_ray(tmp_path, monkeypatch, capsys):
    """As a bad local file is: one line naming the URI, exit 2, no run started."""
    import ray

    from jobs import train

    monkeypatch.chdir(tmp_path)
    with moto_server("ckpt") as endpoint, monkeypatch.context() as env:
        env.delenv("AWS_ENDPOINT_URL")
        s3_filesystem(endpoint).pipe_file("ckpt/notes.pt", b"not a checkpoint")
        for uri, words in (("s3://ckpt/none.pt", "checkpoint file not found"),
                           ("s3://nobucket/x.pt", "checkpoint file not found (The specified bucket does not exist)"),
                           ("s3://ckpt/notes.pt", "not a PyTorch checkpoint")):
            assert train.main(["--init-checkpoint", uri, "--endpoint-url", endpoint, "--steps", "1",
                               "--storage", "runs"]) == 2, uri
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {uri}: ") and words in err and "\n" not in err, err
    assert not ray.is_initialized() and os.listdir(tmp_path) == []


def test_train_job_fine_tunes_an_s3_checkpoint_through_endpoint_url(tmp_path, monkeypatch, capsys):
    """A tiny real Ray Train run with AWS_ENDPOINT_URL unset (in this process and in the
    cluster's workers): --endpoint-url alone brings the starting weights to the workers,
    and takes the run's Ray Train checkpoints and the final file to the bucket."""
    import ray

    from jobs import train

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(7)
    start = Sam(get_config("vit_tiny256"))
    with moto_server("ckpt") as endpoint, monkeypatch.context() as env:
        env.delenv("AWS_ENDPOINT_URL")
        save_checkpoint(start, "s3://ckpt/start.pt", {"command": "earlier", "steps": 7, "train_seconds": 3.0},
                        endpoint_url=endpoint)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # no endpoint there either
        try:
            assert train.main([
                "--init-checkpoint", "s3://ckpt/start.pt", "--endpoint-url", endpoint, "--storage", "s3://ckpt/runs",
                "--name", "tune", "--steps", "2", "--images-per-step", "1", "--masks-per-image", "2",
                "--prompt-iterations", "2", "--synthetic-size", "64", "--lr", "1e-4", "--warmup-steps", "1",
                "--log-every", "1", "--checkpoint-every", "2", "--torch-threads", "1", "--eval-images", "1"]) == 0
        finally:
            ray.shutdown()
        out = capsys.readouterr().out
        report = json.loads(out[0 if out.startswith("{\n") else out.rindex("\n{\n") + 1:])  # the job's last output
        fs = s3_filesystem(endpoint)
        ray_checkpoints = fs.glob("ckpt/runs/tune/checkpoint_*/model.pt")
        path = local_checkpoint("s3://ckpt/runs/tune/final.pt", endpoint)
    assert report["checkpoint"] == "s3://ckpt/runs/tune/final.pt" and ray_checkpoints
    tuned, meta = load_checkpoint(path)
    assert meta["init_checkpoint"]["path"] == "s3://ckpt/start.pt" and meta["init_checkpoint"]["steps"] == 7
    assert meta["train_seconds_total"] == pytest.approx(meta["train_seconds"] + 3.0)
    # Two small steps from the starting weights, not a run from scratch (sin-cos position embedding).
    for name, before in start.state_dict().items():
        assert (tuned.state_dict()[name] - before).abs().max() < 0.01, name
    assert os.listdir(tmp_path) == []  # nothing local, no folder named s3:


def test_train_text_starts_from_an_s3_checkpoint_through_endpoint_url(tmp_path, monkeypatch, capsys):
    from jobs import train_text

    bundled = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "samengine_tiny256.pt")
    with moto_server("ckpt") as endpoint, monkeypatch.context() as env:
        env.delenv("AWS_ENDPOINT_URL")
        s3_filesystem(endpoint).put_file(bundled, "ckpt/base.pt")
        assert train_text.main(["--init-checkpoint", "s3://ckpt/none.pt", "--endpoint-url", endpoint]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: s3://ckpt/none.pt: checkpoint file not found", err
        try:
            assert train_text.main(["--init-checkpoint", "s3://ckpt/base.pt", "--endpoint-url", endpoint,
                                    "--scenes", "2", "--steps", "1", "--batch-scenes", "2", "--eval-scenes", "1",
                                    "--output", str(tmp_path / "text.pt")]) == 0
        finally:
            torch.set_flush_denormal(False)  # the job turns it on for its process: not for later tests
    _, meta = load_checkpoint(tmp_path / "text.pt")
    assert meta["init_checkpoint_sha256"] == file_sha256(bundled)
    assert meta["text_training"]["init_checkpoint"] == "s3://ckpt/base.pt"
