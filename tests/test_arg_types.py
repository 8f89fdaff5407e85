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
            (validate.main, [root, "--version", "x"], "argument --version: expected a whole number >= 0, got 'x'")):
        _usage_error(capsys, main, argv, expected)
    assert not (tmp_path / "x.json").exists()


def test_a_negative_gpu_price_is_refused(capsys):
    assert plan.main(["--images", "10", "--hours", "1", "--gpu-price", "H100=-2"]) == 2
    assert "--gpu-price wants TYPE=USD with USD >= 0, got 'H100=-2'" in capsys.readouterr().err


def test_resolve_version_refuses_a_negative_version(root):
    with pytest.raises(DatasetNotFound, match="has no version -1"):
        resolve_version(root, version=-1)
    assert resolve_version(root, version=0) == 0
