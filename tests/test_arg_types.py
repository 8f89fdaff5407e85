"""Negative counts, versions, sizes and prices are one usage line and exit 2 (argparse,
jobs/arg_types.py), not an OverflowError traceback, an error per table or a silent run."""
from __future__ import annotations

import pytest

from dataset import DatasetWriter
from dataset.lineage import new_lineage
from dataset.reader import DatasetNotFound, resolve_version
from dataset.synthetic import image_records
from jobs import export, maintain, plan, report, validate


@pytest.fixture
def root(tmp_path):
    root = str(tmp_path / "ds")
    writer = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    writer.start_run()
    writer.commit_images(image_records(1, 2))
    return root


def _usage_error(capsys, main, argv, expected: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(expected), err
    assert "Traceback" not in err


def test_negative_numbers_are_usage_errors(root, tmp_path, capsys):
    for main, argv, expected in (
            (validate.main, [root, "--version", "-1"], "argument --version: must be >= 0, got -1"),
            (validate.main, [root, "--round", "-2"], "argument --round: must be >= 0, got -2"),
            (export.main, [root, "--to", "coco", "--dest", str(tmp_path / "x.json"), "--version", "-1"],
             "argument --version: must be >= 0, got -1"),
            (report.main, [root, "--version", "-1"], "argument --version: must be >= 0, got -1"),
            (report.main, [root, "--sample-images", "-5"], "argument --sample-images: must be >= 0, got -5"),
            (report.main, [root, "--gallery", "-1"], "argument --gallery: must be >= 0, got -1"),
            (report.main, [root, "--concavity-masks", "-1"], "argument --concavity-masks: must be >= 0, got -1"),
            (maintain.main, [root, "compact", "--target-size", "-1"], "argument --target-size: must be > 0, got -1"),
            (maintain.main, [root, "compact", "--target-size", "0"], "argument --target-size: must be > 0, got 0"),
            (maintain.main, [root, "vacuum", "--retention-hours", "-1"],
             "argument --retention-hours: must be >= 0, got -1"),
            (plan.main, ["--images", "10", "--hours", "1", "--cpu-price", "-1"],
             "argument --cpu-price: must be a number >= 0, got -1"),
            (plan.main, ["--images", "10", "--hours", "1", "--cpu-price", "nan"],
             "argument --cpu-price: must be a number >= 0, got nan"),
            (validate.main, [root, "--version", "x"], "argument --version: expected a whole number >= 0, got 'x'"),
            # float() takes nan and inf: refused here, not an OverflowError from math.ceil later.
            (plan.main, ["--rate", "inf"], "argument --rate: must be a finite number > 0, got inf"),
            (plan.main, ["--rate", "nan"], "argument --rate: must be a finite number > 0, got nan"),
            (plan.main, ["--rate", "0"], "argument --rate: must be a finite number > 0, got 0"),
            (plan.main, ["--images=-inf", "--hours", "1"], "argument --images: must be a finite number > 0, got -inf"),
            (plan.main, ["--images", "5", "--hours", "nan"], "argument --hours: must be a finite number > 0, got nan"),
            (plan.main, ["--images", "5", "--hours", "1e999"], "argument --hours: must be a finite number > 0, got 1e999"),
            # int() refuses them already: the whole-number options give a usage line too.
            (validate.main, [root, "--version", "inf"], "argument --version: expected a whole number >= 0, got 'inf'"),
            (maintain.main, [root, "compact", "--target-size", "nan"],
             "argument --target-size: expected a whole number > 0, got 'nan'")):
        _usage_error(capsys, main, argv, expected)
    assert not (tmp_path / "x.json").exists()


def test_a_negative_gpu_price_is_refused(capsys):
    assert plan.main(["--images", "10", "--hours", "1", "--gpu-price", "H100=-2"]) == 2
    assert "--gpu-price wants TYPE=USD with USD >= 0, got 'H100=-2'" in capsys.readouterr().err


def test_resolve_version_refuses_a_negative_version(root):
    with pytest.raises(DatasetNotFound, match="has no version -1"):
        resolve_version(root, version=-1)
    assert resolve_version(root, version=0) == 0


def test_numbers_too_large_for_the_store_are_usage_errors(root, capsys):
    """Whole numbers past what delta-rs, the int32 round column or a vacuum's duration take
    were OverflowError tracebacks, a delta-rs panic, or (a huge version) a search without end."""
    for main, argv, expected in (
            (validate.main, [root, "--version", str(2**64)], f"argument --version: must be <= {2**63 - 1}, got {2**64}"),
            (validate.main, [root, "--round", str(2**31)], f"argument --round: must be <= {2**31 - 1}, got {2**31}"),
            (report.main, [root, "--round", str(2**31)], f"argument --round: must be <= {2**31 - 1}, got {2**31}"),
            (maintain.main, [root, "vacuum", "--retention-hours", str(2**63 - 1)],
             f"argument --retention-hours: must be <= 1000000, got {2**63 - 1}"),
            (maintain.main, [root, "compact", "--target-size", str(2**64)],
             f"argument --target-size: must be <= {2**63 - 1}, got {2**64}")):
        _usage_error(capsys, main, argv, expected)


def test_a_version_past_the_latest_is_refused_at_once(root, capsys):
    for version in (2, 2**63 - 1):  # the latest is 1 (creation, one commit)
        with pytest.raises(DatasetNotFound, match=f"has no version {version} \\(versions 0..1\\)"):
            resolve_version(root, version=version)
    assert validate.main([root, "--version", str(2**63 - 1)]) == 2
    assert f"has no version {2**63 - 1}" in capsys.readouterr().err


def test_a_round_past_the_int32_column_is_a_settings_error():
    from pydantic import ValidationError

    from jobs.auto_annotate import load_config

    with pytest.raises(ValidationError, match="round"):
        load_config(["--round", str(2**31)])
    assert load_config(["--round", str(2**31 - 1)]).round == 2**31 - 1


def test_the_maintainer_training_jobs_check_their_numbers(capsys):
    """train_text, train_crop_embedder and calibrate_checkpoint took any int or float for
    counts, sizes and the learning rate (negative counts, --lr nan): usage lines now."""
    from jobs import calibrate_checkpoint, train_crop_embedder, train_text

    for main, argv, expected in (
            (train_text.main, ["--steps", "0"], "argument --steps: must be > 0, got 0"),
            (train_text.main, ["--scenes", "-1"], "argument --scenes: must be >= 0, got -1"),
            (train_text.main, ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
            (train_text.main, ["--eval-scenes", "0"], "argument --eval-scenes: must be > 0, got 0"),
            (train_crop_embedder.main, ["--batch", "-4"], "argument --batch: must be > 0, got -4"),
            (train_crop_embedder.main, ["--width", "0"], "argument --width: must be > 0, got 0"),
            (calibrate_checkpoint.main, ["--checkpoint", "c.pt", "--scenes", "0"], "argument --scenes: must be > 0, got 0"),
            (calibrate_checkpoint.main, ["--checkpoint", "c.pt", "--iou-head-steps", "-3"],
             "argument --iou-head-steps: must be > 0, got -3")):
        _usage_error(capsys, main, argv, expected)
