"""The predictor's handling of bad inputs: each raises a ValueError that says what is wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Sam, SamPredictor, get_config


@pytest.fixture(scope="module")
def predictor(photo):
    torch.manual_seed(0)
    p = SamPredictor(Sam(get_config("vit_tiny256")))
    p.set_image(photo)
    return p


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((32, 32, 3), np.float32), "uint8"),
        (np.zeros((32, 32), np.uint8), "H x W x 3"),
        (np.zeros((32, 32, 4), np.uint8), "H x W x 3"),
        (np.zeros((32, 32, 3, 1), np.uint8), "H x W x 3"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        (np.zeros((32, 0, 3), np.uint8), "empty"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images(image, message):
    p = SamPredictor(Sam(get_config("vit_tiny256")))
    with pytest.raises(ValueError, match=message):
        p.set_image(image)


def test_bad_image_format(photo):
    p = SamPredictor(Sam(get_config("vit_tiny256")))
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(photo, image_format="HSV")


def test_bgr_equals_flipped_rgb(photo):
    torch.manual_seed(0)
    model = Sam(get_config("vit_tiny256"))
    a, b = SamPredictor(model), SamPredictor(model)
    a.set_image(photo)
    b.set_image(np.ascontiguousarray(photo[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(a.features, b.features)


def test_predict_before_set_image():
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(Sam(get_config("vit_tiny256"))).predict(box=np.array([0, 0, 5, 5]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "at least one prompt"),
        (dict(point_coords=np.array([[1.0, 2.0]])), "together"),
        (dict(point_labels=np.array([1])), "together"),
        (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), "point_coords"),
        (dict(point_coords=np.array([[1.0, 2.0, 3.0]]), point_labels=np.array([1])), r"\(N, 2\)"),
        (dict(point_coords=np.zeros((1, 1, 1, 2)), point_labels=np.array([[1]])), "point_coords"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1, 1])), "does not match"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([5])), "foreground"),
        (dict(point_coords=np.array([[np.nan, 2.0]]), point_labels=np.array([1])), "NaN"),
        (dict(point_coords=np.array([["a", "b"]]), point_labels=np.array([1])), "numeric"),
        (dict(box=np.array([1.0, 2.0, 3.0])), r"\(4,\)"),
        (dict(box=np.array([10.0, 2.0, 3.0, 8.0])), "x1 <= x2"),
        (dict(box=np.zeros((2, 4)), point_coords=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1))),
         "batch size"),
        (dict(box=np.zeros((2, 4)), point_coords=np.zeros((1, 2)), point_labels=np.ones(1)), "batched"),
        (dict(mask_input=np.zeros((1, 10, 10))), "mask_input"),
        (dict(mask_input=np.zeros((64, 64))), "mask_input"),
        (dict(text_embedding=np.zeros(8)), "no text prompt"),
    ],
)
def test_bad_prompts(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        SamPredictor(Sam(get_config("vit_tiny256")), precision="int3")


def test_bf16_close_to_fp32(photo, monkeypatch):
    from model import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "cpu_has_native_bf16", lambda: True)  # bf16 as asked, emulated or not
    torch.manual_seed(0)
    model = Sam(get_config("vit_tiny256"))
    fp32, bf16 = SamPredictor(model), SamPredictor(model, precision="bf16")
    fp32.set_image(photo)
    bf16.set_image(photo)
    box = np.array([40.0, 30.0, 250.0, 200.0])
    a_logits, a_iou, _ = fp32.predict(box=box, return_logits=True)
    b_logits, b_iou, _ = bf16.predict(box=box, return_logits=True)
    scale = np.abs(a_logits).max()
    assert np.abs(a_logits - b_logits).max() <= 0.05 * scale
    np.testing.assert_allclose(b_iou, a_iou, atol=0.05 * np.abs(a_iou).max() + 1e-3)
    agree = ((a_logits > 0) == (b_logits > 0)).mean()
    assert agree > 0.98


def test_text_prompt_is_the_click_its_grounding_points_at(photo):
    torch.manual_seed(0)
    config = get_config("vit_tiny256").model_copy(update={"text_embed_dim": 16})
    p = SamPredictor(Sam(config))
    p.set_image(photo)
    rng = np.random.default_rng(0)
    text = rng.normal(size=16).astype(np.float32)
    a = p.predict(text_embedding=text, return_logits=True)[0]
    assert a.shape == (3, *photo.shape[:2])
    # The same masks as a click at the centre of the heatmap's hottest cell.
    model = p.model
    with torch.inference_mode():
        heat = model.text_grounding(p.features, torch.as_tensor(text)[None])
    click = model.text_grounding.peak_points(heat, model.image_size, p.input_size)[0].numpy()
    e = model.config.embedding_size
    assert heat.shape == (1, e, e)
    # The hottest cell on the image: 240 x 320 is 192 x 256 in the frame, rows 0-11 of 16.
    assert p.input_size == (192, 256)
    row, col = np.unravel_index(int(heat[0, :12].flatten().argmax()), (12, e))
    assert np.allclose(click, [(col + 0.5) * 16, (row + 0.5) * 16])
    scale = max(photo.shape[:2]) / model.image_size
    clicked = p.predict(point_coords=(click * scale)[None], point_labels=np.array([1]), return_logits=True)[0]
    np.testing.assert_allclose(a, clicked, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(16,\)"):
        p.predict(text_embedding=np.zeros(8))
    # A heatmap whose hottest cells lie in the padding still clicks on the image.
    padded_heat = torch.zeros(1, e, e)
    padded_heat[0, 12:, :] = 5.0
    padded_heat[0, 3, 7] = 1.0
    assert model.text_grounding.peak_points(padded_heat, 256, (192, 256))[0].tolist() == [7.5 * 16, 3.5 * 16]
    edge = torch.zeros(1, e, e)
    edge[0, 0, 12] = 1.0  # the cell over the edge of a 200-px-wide image: the click stays inside
    assert model.text_grounding.peak_points(edge, 256, (256, 200))[0].tolist() == [199.5, 8.0]


def test_bf16_on_a_cpu_without_native_bf16_runs_fp32(monkeypatch):
    """Emulated bf16 is many times slower than fp32: asked on such a CPU, fp32 runs, with a
    warning; where the CPU has bf16 it runs as asked, silently."""
    import warnings

    from amg import AutomaticMaskGenerator
    from model import predictor as predictor_module

    model = Sam(get_config("vit_tiny256"))
    monkeypatch.setattr(predictor_module, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated.*runs in fp32"):
        generator = AutomaticMaskGenerator(model, precision="bf16", encoder_precision="bf16")
    assert (generator.precision, generator.encoder_precision) == ("fp32", "fp32")
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert SamPredictor(model, precision="bf16").precision == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutomaticMaskGenerator(model, precision="fp32")  # fp32: nothing to say
        monkeypatch.setattr(predictor_module, "cpu_has_native_bf16", lambda: True)
        generator = AutomaticMaskGenerator(model, precision="bf16", encoder_precision="bf16")
        assert (generator.precision, generator.encoder_precision) == ("bf16", "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        AutomaticMaskGenerator(model, precision="int8")
    with pytest.raises(ValueError, match="^encoder_precision must be one of"):
        AutomaticMaskGenerator(model, encoder_precision="int8")
