"""The bf16 twin of a model's prompt side (model.precision.decoding_model): what it holds,
that it follows the model's weights, and that the automatic generator's bf16 paths (that twin,
or the native kernels' bf16 matmuls where the CPU has them) give the official generator's
masks up to bf16 rounding, live, with trained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator

from amg import AmgParams, AutomaticMaskGenerator, decode_image, encode_image, postprocess
from amg.compare import match_records
from model import Sam, get_config, load_checkpoint, score_kernel
from model.precision import decoding_model
from schemas.annotate import DEFAULT_CHECKPOINT
from tests.official import build_official


@pytest.fixture(autouse=True)
def bf16_as_asked(monkeypatch):
    """These tests are about bf16's numbers: bf16 runs as asked even on a CPU that emulates it
    (where the generator would otherwise run fp32: model.predictor.resolve_precision)."""
    from model import predictor

    monkeypatch.setattr(predictor, "cpu_has_native_bf16", lambda: True)


def _tiny(seed: int) -> Sam:
    torch.manual_seed(seed)
    return Sam(get_config("vit_tiny256")).eval()


def test_fp32_and_fp16_decode_with_the_model_itself():
    model = _tiny(0)
    assert decoding_model(model, None) is model
    assert decoding_model(model, torch.float16) is model


def test_bf16_twin_holds_the_prompt_side_in_bf16_and_shares_the_rest():
    model = _tiny(0)
    twin = decoding_model(model, torch.bfloat16)
    assert twin is not model
    assert {p.dtype for p in twin.mask_decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in twin.prompt_encoder.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in twin.prompt_encoder.buffers()} == {torch.bfloat16}
    assert twin.image_encoder is model.image_encoder  # not copied
    assert twin.pixel_mean is model.pixel_mean and twin.config is model.config
    # The model itself is untouched and the twin is made once.
    assert {p.dtype for p in model.mask_decoder.parameters()} == {torch.float32}
    assert decoding_model(model, torch.bfloat16) is twin
    torch.testing.assert_close(twin.mask_decoder.iou_token.weight.float(), model.mask_decoder.iou_token.weight,
                               rtol=1e-2, atol=1e-3)


def test_bf16_twin_follows_new_weights():
    model = _tiny(0)
    first = decoding_model(model, torch.bfloat16)
    model.load_state_dict(_tiny(1).state_dict())  # in place, as a new checkpoint or round would
    second = decoding_model(model, torch.bfloat16)
    assert second is not first
    torch.testing.assert_close(second.mask_decoder.iou_token.weight.float(), model.mask_decoder.iou_token.weight,
                               rtol=1e-2, atol=1e-3)
    with torch.no_grad():  # an optimizer step writes in place too
        model.mask_decoder.mask_tokens.weight.add_(1.0)
    third = decoding_model(model, torch.bfloat16)
    assert third is not second
    torch.testing.assert_close(third.mask_decoder.mask_tokens.weight.float(),
                               model.mask_decoder.mask_tokens.weight, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("native", ["0", "1"])
def test_bf16_generator_gives_the_official_masks_up_to_rounding(native, monkeypatch):
    """bf16 (the twin; with native "1" the kernels' bf16 matmuls where they have them) against the official generator in fp32, with the bundled checkpoint. Its masks
    are soft (stability 0.1 admits masks whose area moves with every logit), so bf16 rounding
    moves many boundaries by a few pixels (benchmarks/amg.py counts them at full size);
    what must hold is the same masks: nearly the same count, every official mask found, and
    nearly all at IoU >= 0.9."""
    ours, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    official = build_official(ours.config)
    official.load_state_dict(ours.state_dict(), strict=True)
    photo = Image.open("examples/images/chelsea.jpg").convert("RGB")
    photo.thumbnail((320, 320))
    image = np.asarray(photo)
    kwargs = dict(points_per_side=16, pred_iou_thresh=0.1, stability_score_thresh=0.1, output_mode="coco_rle")
    theirs = SamAutomaticMaskGenerator(official.eval(), **kwargs).generate(image)
    monkeypatch.setenv("SAMENGINE_NATIVE", native)
    # the path taken: the native one wherever the kernels multiply in bf16
    assert ours.mask_decoder.native_bf16_for(ours.config.embedding_size ** 2) == (
        native == "1" and score_kernel.bf16_available())
    mine = AutomaticMaskGenerator(ours.eval(), precision="bf16", **kwargs).generate(image)
    assert len(theirs) >= 100, f"only {len(theirs)} official masks"
    assert abs(len(mine) - len(theirs)) <= 0.05 * len(theirs)
    result = match_records(mine, theirs)
    ious = np.array(result["ious"])
    assert result["matched"] >= 0.97 * len(theirs)
    assert (ious >= 0.9).sum() >= 0.85 * len(theirs)
    assert np.median(ious) >= 0.97


def test_the_encoder_runs_at_its_own_precision():
    """precision="bf16" decodes in bf16 and leaves the image encoder in fp32 (its embeddings
    exactly the fp32 ones) unless encoder_precision asks for bf16 too; the generator's masks
    are the stages composed at those precisions."""
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    image = np.asarray(Image.open("examples/images/chelsea.jpg").convert("RGB").resize((160, 120)))
    params = AmgParams(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.1, output_mode="coco_rle")
    fp32, bf16 = (encode_image(model, image, params, p) for p in ("fp32", "bf16"))
    assert fp32.embeddings.dtype == torch.float32 and bf16.embeddings.dtype == torch.bfloat16
    assert not torch.equal(fp32.embeddings, bf16.embeddings.float())
    records = {}
    for name, encoded in (("fp32", fp32), ("bf16", bf16)):
        records[name] = AutomaticMaskGenerator(model, params, precision="bf16", encoder_precision=name).generate(image)
        assert records[name] == postprocess(decode_image(model, encoded, params, "bf16"), encoded.orig_size, params)
    assert records["fp32"] == AutomaticMaskGenerator(model, params, precision="bf16").generate(image)
    assert len(records["fp32"]) >= 5 and records["fp32"] != records["bf16"]


def test_bf16_generator_inside_a_callers_autocast_runs():
    """A caller's own autocast region around the generator: its decode turns autocast off where
    it runs the native kernels (their bf16 or float32 products), so it runs and finds the masks."""
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    image = np.asarray(Image.open("examples/images/chelsea.jpg").convert("RGB").resize((160, 120)))
    kwargs = dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.1, output_mode="coco_rle")
    plain = AutomaticMaskGenerator(model.eval(), precision="bf16", **kwargs).generate(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = AutomaticMaskGenerator(model, precision="bf16", **kwargs).generate(image)
    assert len(plain) >= 5 and abs(len(inside) - len(plain)) <= 0.2 * len(plain)
