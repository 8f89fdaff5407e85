"""Refitting the IoU head for automatic mode (training.iou_head, jobs/calibrate_checkpoint.py
--iou-head-scenes): the targets are the real best IoUs of the generator's grid candidates,
the fit ranks held-back candidates better, and nothing but the head changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from amg import AmgParams
from amg.params import CHECKPOINT_DEFAULTS
from jobs import calibrate_checkpoint
from model import load_checkpoint
from model.transforms import scale_coords
from schemas.annotate import DEFAULT_CHECKPOINT
from training.automatic_eval import held_out_scenes
from training.iou_head import fit_iou_head, grid_targets, ranking_quality, split_scenes


@pytest.fixture(scope="module")
def model():
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    return model.eval()


def test_targets_are_the_candidates_best_iou_with_the_ground_truth(model):
    scenes = list(held_out_scenes(5, 2, 256))
    data = grid_targets(model, scenes, points_per_side=4)
    assert data.tokens.shape == (2 * 16, 128) and data.best.shape == (2 * 16, 4)
    assert data.scene.tolist() == [0] * 16 + [1] * 16
    # The captured tokens are what the head scores: the head on them gives the decoder's IoUs.
    scene = scenes[1]
    h, w = scene.image.shape[:2]
    points = scale_coords(AmgParams(points_per_side=4).grids()[0] * np.array([w, h]), (h, w), 256)
    coords = torch.as_tensor(points, dtype=torch.float32)[:, None]
    with torch.no_grad():
        embedding = model.encode(torch.as_tensor(scene.image).permute(2, 0, 1)[None].float())
        low_res, iou = model.decode(embedding, coords, torch.ones(16, 1, dtype=torch.int64), multimask_output=True)
        assert torch.allclose(model.mask_decoder.iou_prediction_head(data.tokens[16:])[:, 1:], iou, atol=1e-5)
        masks = model.postprocess_masks(low_res, (h, w), (h, w)) > 0
    # Each target is the best mask IoU with any instance, as pycocotools computes it.
    truth = coco_mask.encode(np.asfortranarray(np.moveaxis(scene.masks, 0, -1).astype(np.uint8)))
    for prompt in (0, 5, 10, 15):
        for token in range(3):
            mine = coco_mask.encode(np.asfortranarray(masks[prompt, token].numpy().astype(np.uint8)))
            expected = np.asarray(coco_mask.iou([mine], truth, [0] * len(truth))).max()
            assert data.best[16 + prompt, 1 + token].item() == pytest.approx(expected, abs=1e-5)
    assert 0.0 <= data.best.min() and data.best.max() <= 1.0 and data.best.max() > 0.3


def test_the_fit_ranks_held_back_scenes_better(model):
    # Enough prompts that a 33k-parameter head generalizes: 24 scenes to fit, 6 held back.
    data = grid_targets(model, held_out_scenes(11, 30, 256), points_per_side=16)
    fit, back = split_scenes(data, held_back=0.2)
    assert set(back.scene.tolist()) == set(range(24, 30)) and not set(fit.scene.tolist()) & set(range(24, 30))
    head = load_checkpoint(DEFAULT_CHECKPOINT)[0].mask_decoder.iou_prediction_head
    before = ranking_quality(head, back)
    losses = fit_iou_head(head, fit, steps=400)
    after = ranking_quality(head, back)
    assert losses[-1] < losses[0]
    assert after["mse"] < 0.95 * before["mse"], (before, after)
    assert after["spearman"] > before["spearman"] + 0.03, (before, after)


def test_the_calibration_job_refits_only_the_head_and_records_it(tmp_path):
    out = tmp_path / "refit.pt"
    assert calibrate_checkpoint.main(["--checkpoint", DEFAULT_CHECKPOINT, "--output", str(out), "--scenes", "2",
                                      "--iou-head-scenes", "3", "--iou-head-steps", "60", "--seed", "78",
                                      "--eval-scenes", "2"]) == 0
    before, old_meta = load_checkpoint(DEFAULT_CHECKPOINT)
    after, meta = load_checkpoint(out)
    changed = {name for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items())
               if not torch.equal(a, b)}
    assert changed and all(name.startswith("mask_decoder.iou_prediction_head.") for name in changed)
    fit = meta["iou_head_fit"]
    assert (fit["scenes"], fit["seed"], fit["steps"], fit["prompts"]) == (3, 3000003, 60, 3 * 1024)
    assert set(fit["held_back_after"]) == {"mse", "spearman"}
    # The held-out metrics describe the new head; the old ones are kept beside the fit.
    assert fit["before"]["eval_single_point"] == old_meta["eval_single_point"]
    assert meta["eval_single_point"]["images"] == 2 and meta["eval_automatic"]["images"] == 2
    ceiling = meta["eval_candidate_ceiling"]
    assert ceiling["images"] == 2 and ceiling["instances"] > 0 and ceiling["candidates_per_image"] == 3 * 1024
    assert meta["eval_automatic_recommended"]["AR1000"] <= ceiling["ceiling"] <= 1.0
    assert meta[CHECKPOINT_DEFAULTS]["calibration"]["seed"] == 78
    with pytest.raises(SystemExit):  # the held-out scenes may not train the head
        calibrate_checkpoint.main(["--checkpoint", DEFAULT_CHECKPOINT, "--iou-head-scenes", "2",
                                   "--iou-head-seed", "1000003"])
