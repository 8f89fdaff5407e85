"""jobs/auto_annotate.py settings: official amg.py flags, a settings file under flags, and
errors that name the bad field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.auto_annotate import load_config
from schemas.annotate import DEFAULT_CHECKPOINT, DEFAULT_INPUT, DEFAULT_OUTPUT

ROOT = Path(__file__).resolve().parents[1]

OFFICIAL = ["--input", "in", "--output", "out", "--model-type", "vit_b", "--checkpoint", "sam_vit_b_01ec64.pth",
            "--device", "cpu", "--convert-to-rle", "--points-per-side", "16", "--points-per-batch", "32",
            "--pred-iou-thresh", "0.8", "--stability-score-thresh", "0.9", "--stability-score-offset", "0.5",
            "--box-nms-thresh", "0.6", "--crop-n-layers", "1", "--crop-nms-thresh", "0.5",
            "--crop-overlap-ratio", "0.25", "--crop-n-points-downscale-factor", "2", "--min-mask-region-area", "50"]


def test_defaults_are_the_bundled_sample_run():
    c = load_config([])
    assert (c.input, c.output, c.checkpoint) == (DEFAULT_INPUT, DEFAULT_OUTPUT, DEFAULT_CHECKPOINT)
    assert Path(c.checkpoint).is_file() and any(Path(c.input).iterdir())
    assert c.amg.points_per_side == 32 and c.amg.pred_iou_thresh == 0.88 and c.amg.output_mode == "coco_rle"


def test_every_official_amg_flag_is_accepted_with_its_meaning():
    c = load_config(OFFICIAL)
    assert (c.input, c.output, c.model_type, c.checkpoint, c.device) == ("in", "out", "vit_b", "sam_vit_b_01ec64.pth", "cpu")
    a = c.amg
    assert (a.points_per_side, a.points_per_batch, a.pred_iou_thresh, a.stability_score_thresh) == (16, 32, 0.8, 0.9)
    assert (a.stability_score_offset, a.box_nms_thresh, a.crop_n_layers, a.crop_nms_thresh) == (0.5, 0.6, 1, 0.5)
    assert (a.crop_overlap_ratio, a.crop_n_points_downscale_factor, a.min_mask_region_area) == (0.25, 2, 50)


def test_decoder_and_encoder_precision_are_separate_settings():
    """bf16 decoding leaves the image encoder in fp32 unless that is asked for too."""
    c = load_config(["--precision", "bf16"])
    assert (c.precision, c.encoder_precision) == ("bf16", "fp32")
    c = load_config(["--precision", "bf16", "--encoder-precision", "bf16"])
    assert (c.precision, c.encoder_precision) == ("bf16", "bf16")


def test_settings_file_then_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("input: s3://bucket/images\noutput: s3://bucket/ds\namg:\n  points_per_side: 8\n"
                 "  pred_iou_thresh: 0.5\nencoder: {min: 1, max: 4, num_gpus: 0.5}\nchunk_images: 500\n")
    c = load_config(["--config", str(f), "--pred-iou-thresh", "0.7", "--decoder-actors", "2,6"])
    assert (c.input, c.output, c.chunk_images) == ("s3://bucket/images", "s3://bucket/ds", 500)
    assert (c.amg.points_per_side, c.amg.pred_iou_thresh) == (8, 0.7)  # the flag wins
    assert (c.encoder.min, c.encoder.max, c.encoder.num_gpus) == (1, 4, 0.5)
    assert (c.decoder.min, c.decoder.max) == (2, 6)


@pytest.mark.parametrize("argv, field", [
    (["--pred-iou-thresh", "high"], "amg.pred_iou_thresh"),
    (["--points-per-side", "0"], "amg.points_per_side"),
    (["--crop-overlap-ratio", "1.5"], "amg.crop_overlap_ratio"),
    (["--device", "tpu"], "device"),
    (["--encoder-precision", "int8"], "encoder_precision"),
    (["--chunk-images", "0"], "chunk_images"),
    (["--encoder-actors", "4,2"], "encoder"),
    (["--run-id", "../../etc/cron.d/x"], "run_id"),  # a run id names files under the output only
    (["--pred-iou-thresh", "2"], "amg.pred_iou_thresh"),  # a predicted IoU lies in [0, 1]: nothing passes 2
    (["--pred-iou-thresh", "-0.1"], "amg.pred_iou_thresh"),
    (["--stability-score-thresh", "-0.5"], "amg.stability_score_thresh"),
    (["--model-type", "vit_x"], "model_type"),
])
def test_a_bad_value_names_its_field(argv, field):
    with pytest.raises(ValidationError) as e:
        load_config(argv)
    assert str(e.value).splitlines()[1] == field  # pydantic's first error line is the field's path


def test_a_bad_value_exits_with_a_message_naming_the_field():
    r = subprocess.run([sys.executable, "jobs/auto_annotate.py", "--box-nms-thresh", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "box_nms_thresh" in r.stderr and "Traceback" not in r.stderr


def test_an_output_that_is_a_file_exits_with_a_message_before_any_work(tmp_path):
    taken = tmp_path / "dataset"
    taken.write_bytes(b"not a folder")
    r = subprocess.run([sys.executable, "jobs/auto_annotate.py", "--output", str(taken)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a file; the output is a dataset folder" in r.stderr
    assert "Traceback" not in r.stderr and "Ray" not in r.stdout + r.stderr  # failed before starting Ray
    assert taken.read_bytes() == b"not a folder"


def test_the_thresholds_take_their_whole_range():
    c = load_config(["--pred-iou-thresh", "0", "--stability-score-thresh", "1"])
    assert (c.amg.pred_iou_thresh, c.amg.stability_score_thresh) == (0.0, 1.0)
    assert load_config(["--pred-iou-thresh", "1", "--stability-score-thresh", "0"]).amg.pred_iou_thresh == 1.0


def test_an_unknown_model_type_is_named_with_the_known_ones():
    with pytest.raises(ValidationError) as e:
        load_config(["--model-type", "vit_x"])
    assert "unknown model type 'vit_x'; choose one of ['vit_b', 'vit_h', 'vit_l'" in str(e.value)
    assert load_config(["--model-type", "vit_h"]).model_type == "vit_h"
    assert load_config(["--model-type", "vit_tiny256-p8"]).model_type == "vit_tiny256-p8"  # model.resample's name
    with pytest.raises(ValidationError, match="unknown model type 'vit_x-p8'"):
        load_config(["--model-type", "vit_x-p8"])


def test_help_names_one_address_option_and_readable_defaults(capsys):
    with pytest.raises(SystemExit):
        load_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--ray-address RAY_ADDRESS, --address RAY_ADDRESS Ray cluster address (default: RAY_ADDRESS, " in out
    assert out.count("Ray cluster address") == 1
    assert "(default: 512/1500, about 0.341)" in out and "0.3413333" not in out
    assert load_config(["--address", "10.0.0.1:6379"]).ray_address == "10.0.0.1:6379"
    assert load_config(["--ray-address", "10.0.0.2:6379"]).ray_address == "10.0.0.2:6379"


def test_a_bad_actor_pool_names_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--encoder-actors", "a,b"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip().splitlines()[-1].endswith(
        "error: argument --encoder-actors: expected N, MIN,MAX, auto or MIN,auto (whole numbers), got 'a,b'")
    assert "_pool" not in err


def test_the_run_log_says_how_to_use_an_idle_cluster():
    """Pools sized by the user: where they, at their largest, leave at least half of the
    cluster idle, the run log names the flags that scale them out. "auto" pools (the
    default) are sized to the cluster (pipeline.pools): no line."""
    from pipeline.pools import scaling_hint

    assert scaling_hint(load_config([]), "cpu", {"CPU": 16}) is None
    fused = load_config(["--encoder-actors", "1"])
    assert scaling_hint(fused, "cpu", {"CPU": 2}) is None  # a laptop's 2 cores: 1 for the model, 1 for I/O
    assert scaling_hint(fused, "cpu", {"CPU": 16}) == (
        "note: the model stage uses at most 1 of the cluster's 15 CPUs left after reading and writing: "
        "--encoder-actors 1,15 runs up to 15 actors (each holds its own copy of the model)")
    assert "--encoder-actors 1,7 " in scaling_hint(load_config(["--encoder-actors", "1", "--cpus-per-actor", "2"]),
                                                   "cpu", {"CPU": 16})
    assert scaling_hint(load_config(["--encoder-actors", "2,8"]), "cpu", {"CPU": 16}) is None
    split = load_config(["--encoder-actors", "1", "--decoder-actors", "1"])
    assert "at most 2 of the cluster's 8 GPUs" in scaling_hint(split, "cuda", {"CPU": 64, "GPU": 8})  # split on GPUs
    assert "--decoder-actors MIN,MAX" in scaling_hint(split, "cuda", {"CPU": 64, "GPU": 8})
    assert scaling_hint(split, "cuda", {"CPU": 64, "GPU": 3}) is None
