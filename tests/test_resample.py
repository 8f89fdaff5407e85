"""Carrying a model's weights over to another patch size (model.resample)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from model import Sam, get_config, load_checkpoint
from model.resample import with_patch_size
from tests.official import build_official, randomize
from training.evaluate import single_point_miou
from training.synthetic import make_scenes

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "samengine_tiny256.pt"


@pytest.fixture(scope="module")
def random_model():
    model = Sam(get_config("vit_tiny256")).eval()
    randomize(model, seed=5)
    return model


def test_finer_patches_see_the_image_as_the_old_model_saw_it_upsampled(random_model):
    fine = with_patch_size(random_model, 8)
    assert fine.config.patch_size == 8 and fine.config.embedding_size == 32
    assert fine.config.name == "vit_tiny256-p8"
    assert fine.config.window_size == 2 * random_model.config.window_size  # same extent in pixels
    assert not fine.training
    x = torch.randn(1, 3, 256, 256)
    upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
    with torch.no_grad():
        np.testing.assert_allclose(fine.image_encoder.patch_embed(x), random_model.image_encoder.patch_embed(upsampled),
                                   rtol=1e-4, atol=1e-4)
    # The position embedding is resampled onto the finer grid: its mean is kept, and every
    # 2 x 2 block of the new grid stays close to the old cell it came from.
    old_pos, new_pos = random_model.image_encoder.pos_embed, fine.image_encoder.pos_embed
    assert new_pos.shape == (1, 32, 32, old_pos.shape[-1])
    pooled = F.avg_pool2d(new_pos.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert (pooled - old_pos).abs().mean() < 0.5 * old_pos.abs().mean()
    # Relative-position tables: offset 0 keeps its embedding; tables span the new grids.
    for old_block, new_block in zip(random_model.image_encoder.blocks, fine.image_encoder.blocks):
        old_table, new_table = old_block.attn.rel_pos_h, new_block.attn.rel_pos_h
        assert new_table.shape[0] == 2 * old_table.shape[0] + 1
        torch.testing.assert_close(new_table[new_table.shape[0] // 2], old_table[old_table.shape[0] // 2])
    # Everything else is the same tensor values.
    old_state, new_state = random_model.state_dict(), fine.state_dict()
    same = [k for k in old_state if "image_encoder.patch_embed" not in k and "pos" not in k]
    assert all(torch.equal(old_state[k], new_state[k]) for k in same)


def test_coarser_then_finer_returns_the_same_kernel(random_model):
    fine = with_patch_size(random_model, 8)
    back = with_patch_size(with_patch_size(fine, 16), 8)
    torch.testing.assert_close(back.image_encoder.patch_embed.proj.weight, fine.image_encoder.patch_embed.proj.weight)
    assert with_patch_size(random_model, 16) is random_model


@pytest.mark.parametrize("patch, message", [(5, "divide"), (256, "window_size")])
def test_sizes_that_do_not_divide_are_refused(random_model, patch, message):
    with pytest.raises(ValueError, match=message):
        with_patch_size(random_model, patch)


def test_a_resampled_model_loads_into_the_official_classes_and_matches_them(random_model, photo):
    """8-px patches with 16-token windows are an architecture the official code builds."""
    from segment_anything import SamPredictor as OfficialPredictor

    from model import SamPredictor

    fine = with_patch_size(random_model, 8)
    official = build_official(fine.config)
    official.load_state_dict(fine.state_dict(), strict=True)
    ours, theirs = SamPredictor(fine), OfficialPredictor(official)
    image = photo
    with torch.no_grad():
        theirs.set_image(image)
    ours.set_image(image)
    point = np.array([[150.0, 120.0]])
    kwargs = dict(point_coords=point, point_labels=np.array([1]), multimask_output=True, return_logits=True)
    with torch.no_grad():
        their_masks, their_iou, their_low = theirs.predict(**kwargs)
    our_masks, our_iou, our_low = ours.predict(**kwargs)
    assert our_low.shape[-1] == 128  # 4 x the 32 x 32 embedding
    np.testing.assert_allclose(our_low, their_low, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(our_iou, their_iou, rtol=1e-4, atol=1e-4)


def test_the_bundled_model_keeps_what_it_learned_at_another_patch_size():
    model, _ = load_checkpoint(BUNDLED)
    patch = model.config.patch_size
    other = with_patch_size(model, patch // 2 if patch >= 16 else patch * 2)
    untrained = Sam(other.config).eval()
    scenes = list(make_scenes(1_000_003, 6, 256))
    trained, carried, scratch = (single_point_miou(m, scenes)["oracle_miou"] for m in (model, other, untrained))
    assert trained > 0.35 and scratch < 0.2
    assert carried > 0.7 * trained


def test_training_starts_at_the_asked_patch_size(tmp_path, monkeypatch):
    """From scratch the config's patch size is replaced; from a checkpoint its weights are
    resampled. jobs/train.py passes the checkpoint's absolute path (workers run elsewhere)."""
    import sys

    from model import save_checkpoint
    from training.loop import TrainConfig, initial_model

    sys.path.insert(0, str(BUNDLED.parents[1] / "jobs"))
    import train as train_job

    scratch = initial_model(TrainConfig(patch_size=8))
    assert scratch.training and scratch.config.name == "vit_tiny256-p8"
    assert (scratch.config.patch_size, scratch.config.window_size) == (8, 16)
    with pytest.raises(ValueError, match="divide"):
        initial_model(TrainConfig(patch_size=24))

    coarse = Sam(get_config("vit_tiny256"))
    randomize(coarse, seed=2)
    save_checkpoint(coarse, tmp_path / "coarse.pt", {
        "command": "python jobs/train.py --steps 5", "steps": 5, "train_seconds": 12.5, "metrics": {"loss": 1.0},
        "init_checkpoint": {"path": "/older.pt", "train_seconds": 3.0},
    })
    monkeypatch.chdir(tmp_path)
    cfg = train_job.build_config(train_job.parse_args(["--init-checkpoint", "coarse.pt", "--patch-size", "8"]))
    assert cfg.init_checkpoint == str(tmp_path / "coarse.pt") and cfg.patch_size == 8
    monkeypatch.chdir(BUNDLED.parents[1])
    fine = initial_model(cfg)
    expected = with_patch_size(coarse, 8)
    assert fine.config == expected.config and fine.training
    assert all(torch.equal(a, b) for a, b in zip(fine.state_dict().values(), expected.state_dict().values()))

    # The fine-tuned file will say where its start came from and what the chain cost.
    lineage = train_job.init_lineage(cfg.init_checkpoint)
    assert lineage == {"path": str(tmp_path / "coarse.pt"), "command": "python jobs/train.py --steps 5", "steps": 5,
                       "train_seconds": 12.5, "init_checkpoint": {"path": "/older.pt", "train_seconds": 3.0}}
