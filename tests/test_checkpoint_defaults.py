"""Generator settings a checkpoint recommends for itself (amg.CHECKPOINT_DEFAULTS): chosen by
jobs/calibrate_checkpoint.py on synthetic scenes with ground truth, used by the annotation
job for every threshold the user does not give."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from amg import AmgParams, checkpoint_defaults
from amg.params import CHECKPOINT_DEFAULTS
from jobs import calibrate_checkpoint
from jobs.auto_annotate import load_config
from model import Sam, get_config, load_checkpoint, read_checkpoint_meta, save_checkpoint
from pipeline.graph import with_checkpoint_defaults
from pipeline.sources import InputError
from schemas.annotate import DEFAULT_CHECKPOINT


def test_given_settings_stay_and_the_others_take_the_recommendation():
    given = AmgParams(pred_iou_thresh=0.7, output_mode="coco_rle")
    merged = given.over({"pred_iou_thresh": 0.2, "stability_score_thresh": 0.4})
    assert (merged.pred_iou_thresh, merged.stability_score_thresh, merged.output_mode) == (0.7, 0.4, "coco_rle")
    assert merged.points_per_side == 32  # neither given nor recommended: the official default
    with pytest.raises(ValidationError, match="stability_score_thresh"):
        AmgParams().over({"stability_score_thresh": 1.5})


def _with_recommendation(tmp_path, params: dict) -> str:
    model, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    path = str(tmp_path / "recommending.pt")
    save_checkpoint(model, path, meta | {CHECKPOINT_DEFAULTS: {"params": params}})
    return path


def test_the_job_uses_the_checkpoints_thresholds_unless_given(tmp_path):
    path = _with_recommendation(tmp_path, {"pred_iou_thresh": 0.25, "stability_score_thresh": 0.45})
    logged = []
    config = with_checkpoint_defaults(load_config(["--checkpoint", path]), logged.append)
    assert (config.amg.pred_iou_thresh, config.amg.stability_score_thresh) == (0.25, 0.45)
    assert config.amg.output_mode == "coco_rle" and "pred_iou_thresh=0.25" in logged[0]
    # A flag wins over the checkpoint; so does the settings file.
    config = with_checkpoint_defaults(load_config(["--checkpoint", path, "--pred-iou-thresh", "0.88"]), logged.append)
    assert (config.amg.pred_iou_thresh, config.amg.stability_score_thresh) == (0.88, 0.45)
    settings = tmp_path / "run.yaml"
    settings.write_text("amg:\n  stability_score_thresh: 0.95\n")
    config = with_checkpoint_defaults(load_config(["--checkpoint", path, "--config", str(settings)]), logged.append)
    assert (config.amg.pred_iou_thresh, config.amg.stability_score_thresh) == (0.25, 0.95)


def test_official_checkpoints_keep_the_official_defaults(tmp_path):
    bare = tmp_path / "sam_vit_tiny256.pth"
    torch.save(Sam(get_config("vit_tiny256")).state_dict(), bare)  # an official-style file: a bare state dict, no metadata
    config = with_checkpoint_defaults(load_config(["--checkpoint", str(bare), "--model-type", "vit_tiny256"]))
    assert (config.amg.pred_iou_thresh, config.amg.stability_score_thresh) == (0.88, 0.95)
    with pytest.raises(InputError, match="missing.pt"):
        with_checkpoint_defaults(load_config(["--checkpoint", str(tmp_path / "missing.pt")]))


def test_the_bundled_checkpoint_recommends_calibrated_thresholds():
    meta = read_checkpoint_meta(DEFAULT_CHECKPOINT)
    recommended = checkpoint_defaults(meta)
    assert set(recommended) == {"pred_iou_thresh", "stability_score_thresh"}
    assert recommended != {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
    calibration = meta[CHECKPOINT_DEFAULTS]["calibration"]
    assert calibration["reached"] and calibration["precision"] >= calibration["target_precision"]
    assert calibration["seed"] != meta["eval_automatic"]["seed"]  # chosen on scenes the evaluation never sees
    config = with_checkpoint_defaults(load_config([]))
    assert config.amg.pred_iou_thresh == recommended["pred_iou_thresh"]


def test_calibration_job_records_thresholds_and_leaves_the_weights(tmp_path):
    out = tmp_path / "calibrated.pt"
    assert calibrate_checkpoint.main(["--checkpoint", DEFAULT_CHECKPOINT, "--output", str(out), "--scenes", "3",
                                      "--target-precision", "0.3", "--seed", "77"]) == 0
    before, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    after, meta = load_checkpoint(out)
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name
    recorded = meta[CHECKPOINT_DEFAULTS]
    chosen = recorded["calibration"]
    assert recorded["params"] == {k: chosen[k] for k in ("pred_iou_thresh", "stability_score_thresh")}
    assert (chosen["seed"], chosen["scenes"], chosen["target_precision"]) == (77, 3, 0.3)
    assert chosen["human_masks"] > 0 and 0.0 <= chosen["precision"] <= 1.0
    with pytest.raises(SystemExit):  # the held-out scenes may not choose the settings
        calibrate_checkpoint.main(["--checkpoint", DEFAULT_CHECKPOINT, "--seed", "1000003"])


def test_a_checkpoint_that_does_not_fit_is_named_once():
    """A --model-type the checkpoint does not hold: one line naming the file once."""
    path = str(DEFAULT_CHECKPOINT)
    with pytest.raises(InputError) as refused:
        with_checkpoint_defaults(load_config(["--checkpoint", path, "--model-type", "vit_b"]))
    message = str(refused.value)
    assert message.count(path) == 1 and "holds a 'vit_tiny256' model, not 'vit_b'" in message, message
    missing = "/nonexistent/ckpt.pt"
    with pytest.raises(InputError) as refused:
        with_checkpoint_defaults(load_config(["--checkpoint", missing]))
    assert str(refused.value).count(missing) == 1 and "\n" not in str(refused.value), str(refused.value)
