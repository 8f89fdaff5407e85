"""Our SAM against the official segment-anything package, live, with identical weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as OfficialPredictor
from segment_anything import sam_model_registry

from model import Sam, SamPredictor, get_config
from model.checkpoint import load_weights
from tests.official import build_official, randomize

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["vit_tiny256", "vit_b"])
def pair(request, photo):
    """(official predictor, our predictor) with the same random weights and image set."""
    config = get_config(request.param)
    torch.manual_seed(0)
    official = build_official(config)
    randomize(official, seed=1)
    ours = Sam(config).eval()
    load_weights(ours, official.state_dict())
    theirs_p, ours_p = OfficialPredictor(official), SamPredictor(ours)
    with torch.no_grad():
        theirs_p.set_image(photo)
    ours_p.set_image(photo)
    return theirs_p, ours_p


def assert_masks_match(ours_logits, theirs_logits, threshold=0.0):
    np.testing.assert_allclose(ours_logits, theirs_logits, **TOL)
    differ = (ours_logits > threshold) != (theirs_logits > threshold)
    assert np.all(np.abs(theirs_logits[differ] - threshold) <= 1e-4)


def test_image_embeddings_match(pair):
    theirs, ours = pair
    assert ours.input_size == theirs.input_size and ours.original_size == theirs.original_size
    torch.testing.assert_close(ours.features, theirs.features, **TOL)


PROMPTS = {
    "point": dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1])),
    "points": dict(point_coords=np.array([[120.0, 90.0], [30.5, 200.0], [300, 10]]),
                   point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([40.0, 30.0, 250.0, 200.0])),
    "box+points": dict(box=np.array([40.0, 30.0, 250.0, 200.0]),
                       point_coords=np.array([[100.0, 100.0]]), point_labels=np.array([0])),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_single_prompt_matches(pair, prompt, multimask):
    theirs, ours = pair
    kwargs = PROMPTS[prompt]
    with torch.no_grad():
        t_masks, t_iou, t_low = theirs.predict(**kwargs, multimask_output=multimask, return_logits=True)
    o_logits, o_iou, o_low = ours.predict(**kwargs, multimask_output=multimask, return_logits=True)
    o_masks, _, _ = ours.predict(**kwargs, multimask_output=multimask)
    assert o_masks.dtype == bool and o_masks.shape == t_masks.shape
    assert o_masks.shape[0] == (3 if multimask else 1)
    np.testing.assert_allclose(o_low, t_low, **TOL)
    np.testing.assert_allclose(o_iou, t_iou, **TOL)
    assert_masks_match(o_logits, t_masks)
    differ = o_masks != (t_masks > 0)
    assert np.all(np.abs(t_masks[differ]) <= 1e-4)


def test_mask_input_prompt_matches(pair):
    theirs, ours = pair
    first = PROMPTS["point"]
    _, _, low = ours.predict(**first, multimask_output=True)
    mask_input = low[:1]  # 1 x 4e x 4e
    kwargs = dict(point_coords=np.array([[120.0, 90.0], [60, 60]]), point_labels=np.array([1, 1]))
    with torch.no_grad():
        t_logits, t_iou, t_low = theirs.predict(**kwargs, mask_input=mask_input, multimask_output=False,
                                                return_logits=True)
    o_logits, o_iou, o_low = ours.predict(**kwargs, mask_input=mask_input, multimask_output=False,
                                          return_logits=True)
    np.testing.assert_allclose(o_low, t_low, **TOL)
    np.testing.assert_allclose(o_iou, t_iou, **TOL)
    assert_masks_match(o_logits, t_logits)
    # mask prompt alone
    with torch.no_grad():
        t_logits, t_iou, _ = theirs.predict(mask_input=mask_input, return_logits=True)
    o_logits, o_iou, _ = ours.predict(mask_input=mask_input, return_logits=True)
    np.testing.assert_allclose(o_iou, t_iou, **TOL)
    assert_masks_match(o_logits, t_logits)


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_prompts_match(pair, multimask):
    theirs, ours = pair
    rng = np.random.default_rng(3)
    b = 5
    coords = rng.uniform(0, 240, size=(b, 2, 2))
    labels = rng.integers(0, 2, size=(b, 2))
    boxes = np.sort(rng.uniform(0, 240, size=(b, 2, 2)), axis=1).reshape(b, 4)
    t = theirs.transform
    with torch.no_grad():
        t_logits, t_iou, t_low = theirs.predict_torch(
            torch.as_tensor(t.apply_coords(coords, theirs.original_size), dtype=torch.float),
            torch.as_tensor(labels),
            torch.as_tensor(t.apply_boxes(boxes, theirs.original_size), dtype=torch.float),
            multimask_output=multimask, return_logits=True,
        )
    o_logits, o_iou, o_low = ours.predict(coords, labels, boxes, multimask_output=multimask, return_logits=True)
    assert o_logits.shape == (b, 3 if multimask else 1, *theirs.original_size)
    np.testing.assert_allclose(o_low, t_low.numpy(), **TOL)
    np.testing.assert_allclose(o_iou, t_iou.numpy(), **TOL)
    assert_masks_match(o_logits, t_logits.numpy())
    # a batch gives the same answer as its prompts one at a time
    one_logits, one_iou, _ = ours.predict(coords[2], labels[2], boxes[2], multimask_output=multimask,
                                          return_logits=True)
    np.testing.assert_allclose(one_iou, o_iou[2], **TOL)
    np.testing.assert_allclose(one_logits, o_logits[2], **TOL)


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_registry_state_dict_loads_strictly(model_type):
    official = sam_model_registry[model_type](checkpoint=None)
    state = official.state_dict()
    del official
    ours = Sam(get_config(model_type))
    load_weights(ours, state)
    ours_state = ours.state_dict()
    assert set(ours_state) == set(state)
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(ours_state[key], state[key])


def test_scored_decoding_matches_the_official_decoder(pair):
    """MaskDecoder.score (the automatic generator's pass over every prompt: the IoU token's
    final attention from the keys before their last LayerNorm) and finish (mask tokens and
    image features of the prompts kept) against the official decoder on the same prompts."""
    theirs, ours = pair
    rng = np.random.default_rng(5)
    coords = torch.as_tensor(rng.uniform(0, ours.model.image_size, size=(12, 1, 2)), dtype=torch.float)
    labels = torch.ones(12, 1, dtype=torch.int64)
    with torch.no_grad():
        sparse, dense = theirs.model.prompt_encoder((coords, labels), None, None)
        t_low, t_iou = theirs.model.mask_decoder(theirs.features, theirs.model.prompt_encoder.get_dense_pe(),
                                                 sparse, dense, multimask_output=True)
    decoder = ours.model.mask_decoder
    with torch.inference_mode():
        sparse, dense = ours.model.prompt_encoder((coords, labels), None, None)
        iou, scored = decoder.score(ours.features, ours.model.prompt_encoder.get_dense_pe(), sparse, dense)
        multimask = torch.arange(1, decoder.num_mask_tokens)
        rows = torch.tensor([0, 4, 7, 11])
        low = decoder.masks_from(*decoder.finish(scored, rows, multimask), multimask)
        every = torch.arange(12)  # all prompts kept: finish reads the keys without a copy
        low_every = decoder.masks_from(*decoder.finish(scored, every))[:, 1:]  # all mask tokens
    np.testing.assert_allclose(iou[:, 1:].numpy(), t_iou.numpy(), **TOL)
    np.testing.assert_allclose(low.numpy(), t_low[rows].numpy(), **TOL)
    np.testing.assert_allclose(low_every.numpy(), t_low.numpy(), **TOL)


def test_folded_attention_drops_only_denormal_weights():
    """The inference paths' softmax zeroes weights below the smallest normal float (they
    made the pooling matmul ~10x slower on CPU) and leaves every other weight's bits."""
    from model.transformer import _softmax

    tiny = torch.finfo(torch.float32).tiny
    # A job run in this process (train_text) may have turned flushing on, which would also
    # read the denormals compared below as zero.
    flushing = bool(torch.tensor(tiny) / 2 == 0)
    torch.set_flush_denormal(False)
    try:
        x = torch.tensor([[0.0, -95.0, -30.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
        plain = torch.softmax(x, dim=-1)
        denormal = (plain > 0) & (plain < tiny)
        assert denormal.sum() == 1  # e^-100: representable only as a denormal
        ours = _softmax(x, dim=-1)
        assert (ours[denormal] == 0).all()
        assert torch.equal(ours[~denormal], plain[~denormal])
    finally:
        torch.set_flush_denormal(flushing)
