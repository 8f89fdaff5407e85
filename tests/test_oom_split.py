"""GPU out-of-memory in a model stage: the batch is split and retried, and the image gets
the same masks as without the error (simulated: a decoder that fails on big batches)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.annotator import _ModelStage, split_on_oom
from schemas.annotate import DEFAULT_CHECKPOINT
from training.synthetic import make_scene

AMG = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="coco_rle")


def test_split_on_oom_halves_until_it_fits():
    seen = []

    def fn(b):
        seen.append(b)
        if b > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return b

    assert split_on_oom(fn, 16) == 2 and seen == [16, 8, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("always")), 4)


def test_decoder_oom_costs_a_retry_not_the_image():
    stage = _ModelStage(DEFAULT_CHECKPOINT, None, "cpu", "fp32", AMG)
    image = make_scene(seed=5, size=(120, 160)).image
    expected = stage._candidates(stage._encode(image))

    score = stage.model.mask_decoder.score  # the decoder's pass over every prompt of a batch
    batches = []

    def small_memory(image_embeddings, image_pe, sparse, dense, **options):
        batches.append(len(sparse))
        if len(sparse) > 9:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return score(image_embeddings, image_pe, sparse, dense, **options)

    stage.model.mask_decoder.score = small_memory
    got = stage._candidates(stage._encode(image))
    assert max(batches) > 9 and batches[-1] <= 9  # it failed, split, and went on
    assert sum(len(c.rle_counts) for c in got) == sum(len(c.rle_counts) for c in expected) > 0
    for g, e in zip(got, expected):
        assert all(np.array_equal(a, b) for a, b in zip(g.rle_counts, e.rle_counts))
        assert torch.allclose(g.iou_preds, e.iou_preds, atol=1e-5)
