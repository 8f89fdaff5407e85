"""The image side of text prompts (the paper's recipe): object crops embedded into the text
embedder's space by the shipped minilm-crops embedder, and the grounding head trained on
unnamed mask crops, then prompted with words."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_checkpoint
from model.crop_embedder import BACKGROUND, CROP_SIZE, ImageTextEmbedder, mask_crop
from model.text import load_embedder
from training.crop_embedder import crop_accuracy, name_vocabulary, scene_crops
from training.text import TextTrainConfig, mask_items, prepare_examples, scene_stream, train_text

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 1_000_003  # the held-out stream of the training jobs


@pytest.fixture(scope="module")
def crops_embedder():
    return load_embedder("minilm-crops")


def test_mask_crop_keeps_the_object_greys_the_rest_and_keeps_its_shape():
    image = np.zeros((60, 100, 3), np.uint8)
    image[..., 0] = 200
    mask = np.zeros((60, 100), bool)
    mask[10:20, 20:60] = True  # a 10 x 40 bar
    crop = mask_crop(image, mask, margin=0)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    red = (crop == [200, 0, 0]).all(-1)
    assert red.any() and ((crop == BACKGROUND).all(-1) | red).mean() > 0.95
    rows, cols = np.nonzero(red.any(1))[0], np.nonzero(red.any(0))[0]
    assert len(cols) == CROP_SIZE and 6 <= len(rows) <= 10  # 4:1 aspect kept, padded grey above and below
    assert (mask_crop(image, np.zeros_like(mask)) == BACKGROUND).all()


def test_shipped_crop_embedder_names_held_out_objects(crops_embedder):
    """The image side lands crops near their own names' text vectors, far above chance."""
    assert isinstance(crops_embedder, ImageTextEmbedder) and not isinstance(load_embedder("minilm"), ImageTextEmbedder)
    assert crops_embedder.dim == 384
    vocabulary = name_vocabulary()
    vectors = crops_embedder.embed(vocabulary)
    crops, names = scene_crops(scene_stream(HELD_OUT, 30, 256))
    m = crop_accuracy(crops_embedder.embed_images, crops, names, vectors, vocabulary)
    assert m["crops"] > 200
    assert m["name"] > 20 * m["chance_name"], m
    assert m["colour"] > 0.8 and m["shape"] > 2 / 12 and m["texture"] > 1.3 / 5, m
    with pytest.raises(ValueError, match="32 x 32"):
        crops_embedder.embed_images([np.zeros((16, 16, 3), np.uint8)])


def test_image_side_training_uses_crops_not_names(crops_embedder):
    from jobs.train_text import with_text_input

    model, _ = load_checkpoint(ROOT / "checkpoints" / "samengine_tiny256.pt")
    model = with_text_input(model, "minilm-crops", crops_embedder.dim)
    data = prepare_examples(model, mask_items(scene_stream(0, 12, 256)), image_embedder=crops_embedder)
    assert data.queries is not None and data.queries.shape == (len(data.cells), 384)
    assert all(p == [] for p in data.phrases)  # no names were needed
    assert torch.allclose(data.queries.norm(dim=1), torch.ones(len(data.queries)), atol=1e-4)
    history = train_text(model, data, None, TextTrainConfig(steps=60, scenes=6, warmup=5))
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.85 * first, (first, last)


def test_image_side_job_needs_an_embedder_with_an_image_side(tmp_path):
    from jobs.train_text import main

    with pytest.raises(SystemExit, match="image side"):
        main(["--image-side", "--embedder", "minilm", "--scenes", "2", "--steps", "1", "--output",
              str(tmp_path / "x.pt")])
    out = tmp_path / "crops.pt"
    assert main(["--image-side", "--embedder", "minilm-crops", "--scenes", "4", "--steps", "3",
                 "--batch-scenes", "2", "--eval-scenes", "2", "--output", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert model.config.text_embedder == "minilm-crops" and meta["text_training"]["image_side"] is True
