"""jobs/plan.py: capacity and cost arithmetic on hand-made results, the CLI end to end,
clear errors for bad input, and benchmarks/amg.py writing the results format."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.plan import main, resolve_rate
from schemas.throughput import STAGES, ResultsFileError, load_results

ROOT = Path(__file__).resolve().parents[1]

GPU_FILE = {
    "format": "samengine-throughput/1", "name": "gpux", "device": "X100", "source": "measured",
    "config": {"model_type": "vit_h", "points_per_side": 32},
    "stages": [
        {"stage": "encode", "items_per_s": 10, "resources": {"CPU": 2, "GPU": 1}},
        {"stage": "decode_prompts", "items_per_s": 4, "resources": {"CPU": 1, "GPU": 0.5}, "source": "estimate"},
    ],
}
CPU_FILE = {
    "format": "samengine-throughput/1", "name": "cpus", "device": "cpu", "source": "measured",
    "config": {"model_type": "vit_tiny256", "points_per_side": 32},
    "stages": [
        {"stage": "read", "items_per_s": 25, "resources": {"CPU": 1}},
        {"stage": "encode", "items_per_s": 0.5, "resources": {"CPU": 4}},
        {"stage": "postprocess", "items_per_s": 3, "resources": {"CPU": 2}},
        {"stage": "write", "items_per_s": 50, "resources": {"CPU": 1}},
    ],
}


@pytest.fixture
def files(tmp_path) -> list[str]:
    paths = []
    for data in (GPU_FILE, CPU_FILE):
        path = tmp_path / f"{data['name']}.json"
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return paths


def run_json(capsys, *argv) -> dict:
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_arithmetic(files, capsys):
    # 864,000 images in 20 h -> 12 images/s. Expected values worked out by hand:
    #   read        ceil(12/25)=1 actor  1 CPU                 load 0.48  $0.05/h
    #   encode      ceil(12/10)=2        4 CPU 2 GPU           load 0.60  2 x $2 = $4/h
    #   decode      ceil(12/4)=3         3 CPU 1.5 GPU         load 1.00  1.5 x $2 = $3/h
    #   postprocess ceil(12/3)=4         8 CPU                 load 1.00  8 x $0.05 = $0.40/h
    #   write       ceil(12/50)=1        1 CPU                 load 0.24  $0.05/h
    out = run_json(capsys, "--results", *files, "--images", "864000", "--hours", "20",
                   "--gpu-price", "x100=2", "--cpu-price", "0.05")
    assert out["assumptions"]["cpu_usd_per_hour"] == 0.05 and out["assumptions"]["gpu_usd_per_hour"]["X100"] == 2
    gpu, cpu = out["plans"]
    assert gpu["scenario"] == "gpux" and gpu["rate"] == pytest.approx(12)
    rows = {r["stage"]: r for r in gpu["stages"]}
    assert list(rows) == list(STAGES)
    assert {s: rows[s]["origin"] for s in STAGES} == {
        "read": "cpus", "encode": "gpux", "decode_prompts": "gpux", "postprocess": "cpus", "write": "cpus"}
    assert {s: rows[s]["actors"] for s in STAGES} == {
        "read": 1, "encode": 2, "decode_prompts": 3, "postprocess": 4, "write": 1}
    assert [rows[s]["load"] for s in STAGES] == pytest.approx([0.48, 0.6, 1.0, 1.0, 0.24])
    assert [rows[s]["usd_per_hour"] for s in STAGES] == pytest.approx([0.05, 4.0, 3.0, 0.4, 0.05])
    assert gpu["gpus"] == pytest.approx(3.5) and gpu["cpus"] == pytest.approx(17)
    assert gpu["usd_per_hour"] == pytest.approx(7.5) and gpu["usd_total"] == pytest.approx(150)
    assert gpu["bottleneck"] == "encode" and gpu["estimate"] is True and gpu["missing"] == []
    assert rows["decode_prompts"]["source"] == "estimate" and rows["encode"]["source"] == "measured"
    assert any("read from cpus" in n and "model_type" in n for n in gpu["notes"])

    # CPU scenario: its own encode (24 actors x 4 CPUs); no CPU-only decode anywhere.
    rows = {r["stage"]: r for r in cpu["stages"]}
    assert cpu["missing"] == ["decode_prompts"] and rows["encode"]["actors"] == 24
    assert cpu["gpus"] == 0 and cpu["cpus"] == pytest.approx(1 + 96 + 8 + 1)
    assert cpu["usd_per_hour"] == pytest.approx(106 * 0.05) and cpu["usd_total"] == pytest.approx(106)
    assert cpu["bottleneck"] == "encode" and cpu["estimate"] is False


def test_rate_images_hours():
    assert resolve_rate(10, None, None) == (10, None, None)
    assert resolve_rate(10, 36000, None) == (10, 36000, pytest.approx(1.0))
    assert resolve_rate(10, None, 2) == (10, 72000, 2)
    assert resolve_rate(None, 11e6, 100) == (pytest.approx(11e6 / 360000), 11e6, 100)
    for bad in [(None, None, None), (None, 1e6, None), (1, 2, 3), (-1, None, None)]:
        with pytest.raises(ValueError):
            resolve_rate(*bad)


def test_cli_table_on_the_shipped_results():
    # Default results are benchmarks/results/*.json: a measured CPU run and GPU estimates.
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "plan.py"), "--images", "11e6", "--hours", "72"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "assumed prices" in out
    assert "== cpu-2core (cpu)\n" in out
    assert "== H100-estimate (H100) [ESTIMATE" in out
    assert "11,000,000 images in 72.0 h" in out
    h100 = out.split("== H100-estimate")[1].split("\n== ")[0]
    assert "bottleneck (largest cost share): " in h100
    assert "config: model_type=vit_h, points_per_side=32" in h100
    assert "estimate" in h100.split("\n")[4]  # the encode row, from the FLOP-based file


def test_shipped_results_files_are_labelled():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        r = load_results(path)
        if r.device != "cpu":
            assert r.source == "estimate" and all(s.source == "estimate" for s in r.stages), path
            assert "ESTIMATE" in r.notes
        else:
            assert r.source == "measured" and {s.stage for s in r.stages} == set(STAGES)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    (json.dumps({**CPU_FILE, "stages": []}), "stages"),
    (json.dumps({**CPU_FILE, "format": "other/2"}), "format"),
    (json.dumps({**CPU_FILE, "stages": [{"stage": "encode", "items_per_s": -1, "resources": {"CPU": 1}}]}),
     "stages.0.items_per_s"),
    (json.dumps({**CPU_FILE, "stages": [{"stage": "paint", "items_per_s": 1, "resources": {"CPU": 1}}]}),
     "stages.0.stage"),
    (json.dumps({**CPU_FILE, "stages": [{"stage": "read", "items_per_s": 1, "resources": {}}]}),
     "CPU or GPU"),
    (json.dumps({**CPU_FILE, "source": "guess"}), "source"),
])
def test_bad_results_file_gives_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ResultsFileError, match=message):
        load_results(path)
    assert main(["--results", str(path), "--rate", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plan: error: ") and str(path) in err and message in err


def test_cli_errors(files, tmp_path, capsys):
    assert main(["--results", str(tmp_path / "missing.json"), "--rate", "1"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["--results", *files, "--images", "1000"]) == 2
    assert "--hours" in capsys.readouterr().err
    # A GPU type without a price is refused rather than costed at zero.
    assert main(["--results", files[0], "--rate", "1"]) == 2
    assert "--gpu-price X100=USD" in capsys.readouterr().err
    assert main(["--results", *files, "--rate", "1", "--gpu-price", "X100"]) == 2
    assert "TYPE=USD" in capsys.readouterr().err


def test_overflowing_plans_are_clear_errors(files, capsys):
    """Finite options whose ratio or cost overflows a float: one line, exit 2, no traceback."""
    for argv, message in (
            (["--images", "1e308", "--hours", "1e-10"], "give rate = inf, out of the range a float can hold"),
            (["--rate", "1e308", "--hours", "1e10"], "give images = inf"),
            (["--rate", "1e300", "--images", "1e-300"], "give hours = 0"),
            # 1e308 images/s over cpus' encode at 0.5 images/s per actor: 2e308 actors.
            (["--rate", "1e308", "--gpu-price", "X100=2"], "1e+308 images/s is too many to plan for (encode would need more than"),
            # A countable plan whose GPU cost is not.
            (["--rate", "1e300", "--gpu-price", "X100=1e10"], "has a cost or CPU/GPU count beyond what a float can hold")):
        assert main(["--results", *files, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("plan: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_tiny_rate_still_needs_one_actor(files, capsys):
    out = run_json(capsys, "--results", *files, "--rate", "1e-12", "--gpu-price", "X100=2")
    assert all(r["actors"] == 1 for p in out["plans"] for r in p["stages"])


def test_amg_benchmark_writes_results(tmp_path):
    path = tmp_path / "amg.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "amg.py"), "--skip-official", "--precision", "fp32",
           "--threads", "1", "--points-per-side", "4", "--size", "128x160", "--images", "2",
           "--repeat", "2", "--results-json", str(path), "--results-name", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = load_results(path)
    assert r.name == "tiny" and r.device == "cpu" and r.source == "measured"
    assert [s.stage for s in r.stages] == list(STAGES)
    assert all(s.items_per_s > 0 and s.resources.cpus == 1 and s.resources.gpus == 0 for s in r.stages)
    assert r.config["points_per_side"] == 4 and r.config["images"] == 2 and r.config["image_size"] == "128x160"
    # Without threshold flags it measures what the job runs: the checkpoint's recommendation.
    from amg.params import checkpoint_defaults
    from model import read_checkpoint_meta
    from schemas.annotate import DEFAULT_CHECKPOINT

    recommended = checkpoint_defaults(read_checkpoint_meta(DEFAULT_CHECKPOINT))
    assert recommended["pred_iou_thresh"] != 0.88
    assert r.config["pred_iou_thresh"] == recommended["pred_iou_thresh"]
    assert r.config["stability_score_thresh"] == recommended["stability_score_thresh"]
    assert f"wrote {path}" in proc.stdout
    assert proc.stdout.count("(best of 2, median") == 2  # one line per image
    from model import score_kernel

    assert ("decoder: fp32: native kernels" if score_kernel.available() else "decoder: fp32: torch") in proc.stdout


def test_amg_write_stage_serialises_real_records(photo):
    # The bundled checkpoint keeps almost no masks, so exercise the write timing on records
    # of a random model with the filters off.
    import importlib.util

    import torch

    from amg import AutomaticMaskGenerator
    from model import Sam, get_config

    spec = importlib.util.spec_from_file_location("amg_bench", ROOT / "benchmarks" / "amg.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    records = AutomaticMaskGenerator(Sam(get_config("vit_tiny256")).eval(), points_per_side=4, pred_iou_thresh=0,
                                     stability_score_thresh=0, output_mode="coco_rle").generate(photo)
    assert len(records) > 0
    assert bench.write_seconds(records) > 0
    assert bench.read_seconds(photo) > 0
