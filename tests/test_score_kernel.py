"""The native decoder kernels (model/score_kernel.py): the same score pass and mask logits as
the torch path, on decoder shapes with and without vector tails, and the same generator
records; without a C compiler the torch path runs instead."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from amg import AutomaticMaskGenerator
from model import Sam, SamConfig, get_config, load_checkpoint, score_kernel
from model import native as native_build
from model.transforms import scale_coords
from schemas.annotate import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(not score_kernel.available(), reason="no C compiler: the torch path runs")


def _random_model(config: SamConfig, seed: int) -> Sam:
    torch.manual_seed(seed)
    model = Sam(config).eval()
    with torch.no_grad():  # trained-like scales: LayerNorm gains and biases away from 1 and 0
        for name, p in model.mask_decoder.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


CONFIGS = {
    "bundled layout": get_config("vit_tiny256"),
    # 14 x 14 = 196 image tokens (not a multiple of 16: the kernels' vector tails), 8 heads,
    # decoder width 256 as the official ViT-B/L/H decoders
    "official width, 14x14": SamConfig(name="t", image_size=224, patch_size=16, encoder_embed_dim=64,
                                       encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                                       window_size=7, prompt_embed_dim=256, decoder_mlp_dim=2048,
                                       decoder_num_heads=8, iou_head_hidden_dim=256),
    # 6 heads (not a multiple of the IoU pooling's blocks of 4), width 96 (12 upscaled
    # channels, under a vector), 10 x 10 image tokens
    "6 heads, width 96, 10x10": SamConfig(name="t6", image_size=160, patch_size=16, encoder_embed_dim=48,
                                          encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                                          window_size=5, prompt_embed_dim=96, decoder_mlp_dim=192,
                                          decoder_num_heads=6, iou_head_hidden_dim=64),
    # 3 heads and 9 x 9 image tokens: odd sums (7 tokens x 3 heads, 81 pixels) for the bf16
    # products' pairs
    "3 heads, 9x9": SamConfig(name="t3", image_size=144, patch_size=16, encoder_embed_dim=48, encoder_depth=2,
                              encoder_num_heads=2, encoder_global_attn_indexes=(1,), window_size=3,
                              prompt_embed_dim=96, decoder_mlp_dim=160, decoder_num_heads=3, iou_head_hidden_dim=64),
}


def _prompts(model: Sam, n: int, seed: int):
    rng = np.random.default_rng(seed)
    e = model.config.embedding_size
    embedding = torch.randn(1, model.config.prompt_embed_dim, e, e, generator=torch.Generator().manual_seed(seed))
    points = rng.uniform(0, 1, size=(n, 2)) * [320, 240]
    coords = torch.as_tensor(scale_coords(points, (240, 320), model.image_size))
    sparse, dense = model.prompt_encoder((coords[:, None, :], torch.ones(n, 1, dtype=torch.int64)), None, None)
    return embedding, model.prompt_encoder.get_dense_pe(), sparse, dense


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernels_compute_the_torch_decoder(name, monkeypatch):
    _check_against_torch(name, monkeypatch)


def _avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return platform.machine() == "x86_64" and {"avx2", "fma", "bmi2", "movbe"} <= set(flags)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_kernels_built_without_avx512_compute_the_torch_decoder(march, tmp_path, monkeypatch):
    """The builds for CPUs without AVX-512 take other paths: no bf16 products, register
    blocks for 16 vector registers, vectors of 8 lanes and the GELU's polynomials on [0, 6)
    by 8-lane permutes (x86-64-v3: AVX2 and FMA) or 4 lanes and the erf-based GELU (x86-64:
    SSE2, as NEON). Same function."""
    if (march == "x86-64-v3" and not _avx2()) or platform.machine() != "x86_64":
        pytest.skip(f"an x86-64 CPU{' with AVX2' if march == 'x86-64-v3' else ''} runs the {march} build")
    monkeypatch.setenv("SAMENGINE_CACHE", str(tmp_path))
    _fresh_library(monkeypatch, [f"-march={march}" if f == "-march=native" else f for f in native_build.FLAGS])
    assert score_kernel.available() and not score_kernel.bf16_available()
    lanes = {"x86-64-v3": 8, "x86-64": 4}[march]
    assert score_kernel.build_summary() == f"{lanes}-float vectors, OpenMP"  # kernel_lanes()
    _check_gelu()
    for name in ("3 heads, 9x9", "6 heads, width 96, 10x10"):
        _check_against_torch(name, monkeypatch)


def _fresh_library(monkeypatch, flags: list[str] | None = None) -> None:
    """The decoder kernels built and loaded afresh (with these flags) for this test."""
    old = score_kernel.LIBRARY
    monkeypatch.setattr(score_kernel, "LIBRARY", native_build.Library(old.source, old.bind, old.what, old.logger,
                                                                      flags=flags))


def test_the_kernels_gelu_is_exact_gelu_to_float_error():
    _check_gelu()


def _check_gelu():
    """The loaded build's GELU (its own form: polynomials by 16- or 8-lane permutes, or the
    erf-based one) against float64 GELU on a dense grid, both tails, every interval edge and
    a tail of fewer values than a vector."""
    import math

    x = np.concatenate([np.linspace(-12, 12, 20001), np.arange(-6, 6.01, 0.75), [0.0, -0.0, 1e-30, -1e-30]])
    x = np.concatenate([x, x[:5] + 0.1]).astype(np.float32)  # 20022 values: a ragged tail
    got = torch.from_numpy(x.copy())
    score_kernel._load().kernel_gelu(len(got), got.data_ptr())
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(got.numpy() - exact).max() < 5e-7


def test_kernels_split_prompts_over_threads_without_changing_a_bit():
    """Built with OpenMP, the kernels split a batch's prompts over torch's threads (its team);
    each prompt is computed the same way on any thread, so one thread gives the same bits."""
    assert score_kernel._load().kernel_openmp()
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):  # 3: more threads than this machine may have cores, uneven shares of 11
            torch.set_num_threads(n)
            assert score_kernel._threads(11) == n
            out.append(_native_outputs("3 heads, 9x9"))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_kernels_built_without_openmp_run_on_one_thread(tmp_path, monkeypatch, caplog):
    """A compiler without OpenMP (Apple's clang): the kernels are built without it, with a
    warning, and run every prompt on the calling thread. Same function."""
    compiler = os.environ.get("CC") or "cc"
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {compiler} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SAMENGINE_CACHE", str(tmp_path / "cache"))
    _fresh_library(monkeypatch)
    with caplog.at_level("WARNING", logger=score_kernel.log.name):
        assert score_kernel.available()
    assert "without OpenMP" in caplog.text
    assert not score_kernel._load().kernel_openmp() and score_kernel._threads(11) == 1
    assert "one thread" in score_kernel.build_summary()
    _check_against_torch("3 heads, 9x9", monkeypatch)


def _native_outputs(name: str) -> list[torch.Tensor]:
    model = _random_model(CONFIGS[name], seed=3)
    embedding, pe, sparse, dense = _prompts(model, 11, seed=4)
    with torch.inference_mode():
        iou, scored = model.mask_decoder.score(embedding, pe, sparse, dense)
        return [iou, scored.queries, scored.raw_keys, model.mask_decoder.mask_logits(scored, ROWS, TOKENS)]


ROWS, TOKENS = torch.tensor([0, 3, 4, 10]), torch.tensor([1, 2, 3])


def _torch_and_native(name, monkeypatch, native_bf16=False):
    """The decoder of CONFIGS[name] (random weights) and, for 11 prompts (uneven splits over
    threads), the torch path's then the kernels' (iou, scored, mask logits of ROWS, TOKENS)."""
    model = _random_model(CONFIGS[name], seed=3)
    decoder = model.mask_decoder
    assert score_kernel.supports(decoder, model.config.embedding_size ** 2)
    assert not native_bf16 or decoder.native_bf16_for(model.config.embedding_size ** 2)
    embedding, pe, sparse, dense = _prompts(model, 11, seed=4)
    out = []
    with torch.inference_mode():
        for native in ("0", "1"):
            monkeypatch.setenv("SAMENGINE_NATIVE", native)
            iou, scored = decoder.score(embedding, pe, sparse, dense, native_bf16=native_bf16 and native == "1")
            out.append((iou, scored, decoder.mask_logits(scored, ROWS, TOKENS)))
    return decoder, out


def _check_against_torch(name, monkeypatch):
    decoder, ((iou, scored, masks), (native_iou, native, native_masks)) = _torch_and_native(name, monkeypatch)
    with torch.inference_mode():  # the native masks from the torch pass's state too (any raw-key layout)
        crossed = decoder.mask_logits(scored, ROWS, TOKENS)
    assert native.raw_keys.shape == scored.raw_keys.shape and native_masks.shape == masks.shape
    torch.testing.assert_close(native_iou, iou, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(native.queries, scored.queries, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native.raw_keys, scored.raw_keys, rtol=1e-4, atol=1e-4)
    scale = masks.abs().max()
    assert scale > 0.01  # not all zero
    torch.testing.assert_close(native_masks, masks, rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(crossed, masks, rtol=0, atol=2e-5 * scale)


@pytest.mark.skipif(not score_kernel.bf16_available(), reason="kernels built for a CPU without AVX512-BF16")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_kernels_stay_within_bf16_rounding_of_the_torch_decoder(name, monkeypatch):
    """native_bf16: the matmuls take bf16 operands (8 significant bits, float32 sums), so
    results move by a fraction of a percent of their scale, no more; and they do move (the
    float32 kernels agree with torch to ~1e-6)."""
    _, ((iou, scored, masks), (bf16_iou, bf16, bf16_masks)) = _torch_and_native(name, monkeypatch, native_bf16=True)
    assert bf16.native_bf16
    torch.testing.assert_close(bf16_iou, iou, rtol=0, atol=0.005)
    keys_scale = scored.raw_keys.abs().max()
    assert (bf16.raw_keys - scored.raw_keys).abs().max() <= 0.01 * keys_scale
    scale = masks.abs().max()
    error = (bf16_masks - masks).abs()
    assert error.max() <= 0.02 * scale and error.mean() <= 0.003 * scale
    assert error.max() >= 1e-4 * scale  # bf16 products did run


def test_image_side_kept_between_batches_follows_the_image(monkeypatch):
    """The shared image side is reused across an image's batches, never for another image."""
    model = _random_model(CONFIGS["bundled layout"], seed=5)
    decoder = model.mask_decoder
    first, pe, sparse, dense = _prompts(model, 5, seed=6)
    second = _prompts(model, 5, seed=7)[0]
    with torch.inference_mode():
        results = []
        for native in ("0", "1"):
            monkeypatch.setenv("SAMENGINE_NATIVE", native)
            results.append([decoder.score(e, pe, sparse, dense)[0] for e in (first, second, first)])
    torch_iou, native_iou = results
    assert not torch.allclose(torch_iou[0], torch_iou[1])  # the two images score differently
    for expected, got in zip(torch_iou, native_iou):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # A caller refilling one image tensor in place (score() then sees a view of it): the
    # second image (not the one last kept), then the first
    tokens, buffer = decoder._inputs(second, sparse, dense)
    buffer = buffer.clone()
    with torch.inference_mode():
        score_kernel.score(decoder, tokens, buffer, pe)
        buffer.copy_(decoder._inputs(first, sparse, dense)[1])
        refilled = score_kernel.score(decoder, tokens, buffer, pe)[0]
    torch.testing.assert_close(refilled, torch_iou[0], rtol=1e-4, atol=1e-5)


def test_generator_records_are_the_same_with_native_kernels(monkeypatch):
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    photo = Image.open("examples/images/coffee.jpg").convert("RGB")
    photo.thumbnail((320, 320))
    image = np.asarray(photo)
    kwargs = dict(points_per_side=16, pred_iou_thresh=0.05, stability_score_thresh=0.3, output_mode="coco_rle")
    monkeypatch.setenv("SAMENGINE_NATIVE", "0")
    torch_records = AutomaticMaskGenerator(model, **kwargs).generate(image)
    monkeypatch.setenv("SAMENGINE_NATIVE", "1")
    native_records = AutomaticMaskGenerator(model, **kwargs).generate(image)
    assert len(torch_records) >= 10
    assert len(native_records) == len(torch_records)
    # Paired by prompt and score, not by position: two masks whose scores lie within rounding
    # of each other (on an AVX2 machine, 0.27640731 and 0.27640706) may trade places.
    by_prompt = lambda records: sorted(records, key=lambda r: (r["point_coords"], r["predicted_iou"]))  # noqa: E731
    native_records, torch_records = by_prompt(native_records), by_prompt(torch_records)
    same = sum(a["segmentation"] == b["segmentation"] for a, b in zip(native_records, torch_records))
    assert same >= len(torch_records) - 1  # a pixel whose logit sits within rounding of 0 may flip
    np.testing.assert_allclose([r["predicted_iou"] for r in native_records],
                               [r["predicted_iou"] for r in torch_records], atol=1e-5)


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    code = ("import torch; from model import score_kernel, get_config, Sam; "
            "assert not score_kernel.available(); "
            "m = Sam(get_config('vit_tiny256')).eval(); e = torch.randn(1, 128, 16, 16); "
            "s, d = m.prompt_encoder((torch.rand(3, 1, 2) * 256, torch.ones(3, 1, dtype=torch.int64)), None, None); "
            "iou, scored = m.mask_decoder.score(e, m.prompt_encoder.get_dense_pe(), s, d); "
            "assert iou.shape == (3, 4) and scored.raw_keys.is_contiguous(); "
            "from amg.stability_bounds import kernel, may_pass; from amg.upsample import ThresholdUpsampler; "
            "assert kernel() is None; "
            "may_pass(ThresholdUpsampler(64, 256, (192, 256), (768, 1024)), torch.randn(4, 64, 64), 0.0, 1.0, 0.6); "
            "print('torch path')")
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), SAMENGINE_CACHE=str(tmp_path / "cache"))
    env["PATH"] = str(tmp_path)  # no cc, gcc or clang either
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch path" in done.stdout
    assert "native decoder kernels unavailable" in done.stderr
    assert "the stability bounds' kernel unavailable" in done.stderr


def test_official_sized_image_sides_run_natively_larger_ones_in_torch():
    decoder = Sam(get_config("vit_b")).mask_decoder
    assert score_kernel.supports(decoder, 64 * 64)  # the official decoders' 4 MB per prompt tensor
    assert score_kernel.supports(decoder, 14 * 14)
    assert not score_kernel.supports(decoder, 96 * 96)  # 9 MB: torch's path


def test_native_bf16_where_the_kernels_cannot_is_an_error(monkeypatch):
    model = _random_model(CONFIGS["bundled layout"], seed=3)
    embedding, pe, sparse, dense = _prompts(model, 2, seed=4)
    pixels = model.config.embedding_size ** 2
    assert model.mask_decoder.native_for(pixels)
    monkeypatch.setenv("SAMENGINE_NATIVE", "0")
    assert not model.mask_decoder.native_for(pixels) and not model.mask_decoder.native_bf16_for(pixels)
    with torch.inference_mode(), pytest.raises(ValueError, match="native_bf16"):
        model.mask_decoder.score(embedding, pe, sparse, dense, native_bf16=True)


def test_processes_starting_at_once_build_the_kernels_once(tmp_path):
    """Actors a node starts together share one build: the first takes the cache's lock and
    compiles, the others wait for it and load its library."""
    compiler = os.environ.get("CC") or "cc"
    log = tmp_path / "builds.log"
    slow = tmp_path / "cc-logged"
    slow.write_text(f'#!/bin/sh\necho "$$" >> {log}\nsleep 1\nexec {compiler} "$@"\n')
    slow.chmod(0o755)
    env = dict(os.environ, CC=str(slow), SAMENGINE_CACHE=str(tmp_path / "cache"))
    code = "from model import score_kernel; assert score_kernel.available(); print(score_kernel.build_summary())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert all("vectors" in out for out, _ in outs)
    assert len(log.read_text().split()) == 1  # one compiler run for three processes
    assert len(list((tmp_path / "cache" / "kernels").glob("score_kernel-*.so"))) == 1
