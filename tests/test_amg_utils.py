"""The AMG building blocks in `amg/` against the official segment-anything utilities and
pycocotools, run live on seeded random masks and on the edge cases that break RLE and box
code: empty and full masks, single pixels, masks touching the border, thin images, and
empty batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("segment_anything")
from pycocotools import mask as coco_mask  # noqa: E402
from segment_anything.utils import amg as official  # noqa: E402

from amg.grid import crop_boxes, point_grid, point_grids  # noqa: E402
from amg.masks import (  # noqa: E402
    box_near_crop_edge, masks_to_boxes_xyxy, remove_small_regions, uncrop_boxes, uncrop_masks, uncrop_points,
)
from amg.regions import clean_small_regions  # noqa: E402
from amg.stability_bounds import may_pass, may_pass_torch  # noqa: E402
from amg.upsample import ThresholdUpsampler  # noqa: E402
from amg.rle import (  # noqa: E402
    _run_starts_numpy, _run_starts_torch, coco_to_mask, masks_to_rle_counts, rle_area,
    rle_bbox, rle_to_coco,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(37, 53), (64, 48), (1, 17), (17, 1), (1, 1)]


def smooth_noise(n: int, h: int, w: int, seed: int, cell: int = 8) -> torch.Tensor:
    """n x h x w float: coarse random noise upsampled, so thresholds give blobs."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, h // cell + 2, w // cell + 2, generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def blob_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """n random blob masks (with holes and islands) followed by the edge cases."""
    levels = torch.linspace(-1.0, 1.0, n)[:, None, None]
    blobs = smooth_noise(n, h, w, seed) > levels
    edge = torch.zeros(7, h, w, dtype=torch.bool)
    edge[1] = True  # full
    edge[2, 0, 0] = True  # first pixel only
    edge[3, h - 1, w - 1] = True  # last pixel only
    edge[4, h // 2, w // 2] = True  # one pixel inside
    edge[5, :, 0] = edge[5, :, w - 1] = edge[5, 0, :] = edge[5, h - 1, :] = True  # frame
    edge[6, :, w // 2:] = True  # right half: one run that spans columns
    # edge[0] stays empty.
    return torch.cat([blobs, edge])


def official_counts(masks: torch.Tensor) -> list[list[int]]:
    return [r["counts"] for r in official.mask_to_rle_pytorch(masks)]


# ---------------------------------------------------------------- RLE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_rle_counts_match_official(device, size):
    masks = blob_masks(12, *size, seed=1).to(device)
    ours = masks_to_rle_counts(masks)
    assert len(ours) == len(masks)
    for counts, expected in zip(ours, official_counts(masks)):
        assert counts.tolist() == expected
        assert counts.sum() == size[0] * size[1]


@pytest.mark.parametrize("size", SIZES)
def test_numpy_and_torch_run_starts_agree(size):
    # CPU masks take the numpy path; the torch path (used on GPUs) is checked here on CPU
    # so that machines without a GPU still cover it.
    masks = blob_masks(12, *size, seed=10)
    np.testing.assert_array_equal(_run_starts_torch(masks), _run_starts_numpy(masks.numpy()))


@pytest.mark.parametrize("size", SIZES)
def test_coco_rle_matches_official_and_decodes_exactly(size):
    h, w = size
    masks = blob_masks(12, h, w, seed=2)
    ours = rle_to_coco(masks_to_rle_counts(masks), (h, w))
    expected = [official.coco_encode_rle(r) for r in official.mask_to_rle_pytorch(masks)]
    assert ours == expected
    for rle, mask in zip(ours, masks.numpy()):
        assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
        np.testing.assert_array_equal(coco_to_mask(rle), mask)
        np.testing.assert_array_equal(official.rle_to_mask(
            {"size": [h, w], "counts": masks_to_rle_counts(torch.from_numpy(mask)[None])[0]}
        ), mask)


@pytest.mark.parametrize("size", SIZES)
def test_area_and_bbox_match_pycocotools(size):
    h, w = size
    masks = blob_masks(12, h, w, seed=3)
    counts_list = masks_to_rle_counts(masks)
    coco = rle_to_coco(counts_list, (h, w))
    for counts, rle, mask in zip(counts_list, coco, masks.numpy()):
        compressed = {"size": rle["size"], "counts": rle["counts"].encode()}
        assert rle_area(counts) == official.area_from_rle({"counts": counts.tolist()})
        assert rle_area(counts) == int(coco_mask.area(compressed)) == int(mask.sum())
        assert rle_bbox(counts, (h, w)) == coco_mask.toBbox(compressed).astype(int).tolist()


def test_bbox_of_run_wrapping_columns_spans_full_height():
    # Two pixels: bottom of column 0 and top of column 1, one run in column-major order.
    mask = np.zeros((5, 4), dtype=bool)
    mask[4, 0] = mask[0, 1] = True
    counts = masks_to_rle_counts(torch.from_numpy(mask)[None])[0]
    assert counts.tolist() == [4, 2, 14]
    assert rle_bbox(counts, mask.shape) == [0, 0, 2, 5]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batches(device):
    assert masks_to_rle_counts(torch.zeros(0, 8, 9, dtype=torch.bool, device=device)) == []
    assert rle_to_coco([], (8, 9)) == []


# ---------------------------------------------------------------- mask math


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low,input_size,out_size", [
    (64, (192, 256), (768, 1024)), (64, (256, 256), (256, 256)), (64, (192, 256), (481, 643)),
    (64, (256, 179), (100, 70)), (64, (31, 256), (37, 301)), (128, (192, 256), (300, 400)),
    (16, (192, 256), (200, 260))])
def test_threshold_upsampler_matches_full_size_logits(device, low, input_size, out_size):
    """Masks and pixel counts from amg.upsample equal thresholding the full-size logits of
    postprocess_masks' two bilinear resizes, except pixels within float rounding of a
    threshold; stability scores from the counts equal the official function's on the
    full-size logits; candidates ruled out by the count bounds fail the exact filter.
    Covers up- and downsampling, padding cropped away, a 2x first resize (patch 8) and
    a first resize wider than the block window (radius 2)."""
    # blobs from blurry to sharp, plus nothing above any threshold and everything above
    low_res = smooth_noise(24, low, low, seed=7, cell=max(low // 8, 2)) * torch.logspace(-1, 2.5, 24)[:, None, None]
    low_res = (low_res + 0.5).to(device)
    low_res[0], low_res[1] = -5.0, 5.0
    framed = F.interpolate(low_res[:, None], (256, 256), mode="bilinear", align_corners=False)
    full = F.interpolate(framed[..., : input_size[0], : input_size[1]], out_size, mode="bilinear",
                         align_corners=False)[:, 0]
    thresholds = [1.0, -1.0, 0.0, 0.37]
    upsampler = ThresholdUpsampler(low, 256, input_size, out_size, device)
    blocks = upsampler.classify(low_res, thresholds)
    exact = blocks.exact()
    scale = 1 + full.abs().flatten(1).amax(1)[:, None, None]
    for k, t in enumerate(thresholds):
        expected = full > t
        masks = exact.masks(k)
        assert masks.shape == expected.shape and masks.dtype == torch.bool and masks.device == expected.device
        differ = masks != expected
        if device == "cpu":  # the same arithmetic as torch's CPU kernel
            assert not differ.any()
        assert not (differ & ((full - t).abs() > 1e-5 * scale)).any()  # at most rounding ties
        counts = exact.counts([k])[:, 0]
        assert (counts - masks.flatten(1).sum(1)).abs().max() == 0
        assert torch.equal(exact.boxes(k), masks_to_boxes_xyxy(masks))
        rows = torch.tensor([5, 2, 17], device=device)
        assert torch.equal(exact.masks(k, rows), masks[rows])
        assert torch.equal(exact.boxes(k, rows), masks_to_boxes_xyxy(masks[rows]))
    counts = exact.counts([0, 1])
    stability = counts[:, 0] / counts[:, 1]
    expected = official.calculate_stability_score(full, 0.0, 1.0)
    assert stability.dtype == expected.dtype
    torch.testing.assert_close(stability, expected, equal_nan=True, rtol=0, atol=2e-5)
    assert torch.isnan(stability[0]) and stability[1] == 1
    lower, upper = blocks.count_bounds([0, 1])
    assert (lower <= counts).all() and (counts <= upper).all()
    # The frame cells' bounds hold, are at least as tight, and much tighter in sum.
    rows = torch.arange(24, device=device)
    for k in (0, 1):
        cell_upper, cell_lower = blocks.cell_bound(rows, k, upper=True), blocks.cell_bound(rows, k, upper=False)
        assert (lower[:, k] <= cell_lower).all() and (cell_lower <= counts[:, k]).all()
        assert (counts[:, k] <= cell_upper).all() and (cell_upper <= upper[:, k]).all()
        assert torch.equal(blocks.cell_bound(rows[3:9], k, upper=True), cell_upper[3:9])
        assert blocks.cell_bound(rows[:0], k, upper=False).shape == (0,)
        if out_size == (768, 1024):
            assert (cell_upper - cell_lower).sum() < 0.5 * (upper[:, k] - lower[:, k]).sum()
    subset = torch.tensor([3, 1, 8], device=device)
    assert torch.equal(blocks.exact(subset).counts([0, 1]), counts[subset])
    none = blocks.exact(subset[:0])
    assert none.counts([0, 1]).shape == (0, 2) and none.masks(2).shape == (0, *out_size)
    assert none.boxes(2).shape == (0, 4) and exact.boxes(2, subset[:0]).shape == (0, 4)
    if out_size == (768, 1024):  # the blocks' bounds leave most pixels unevaluated
        assert exact.values.numel() < 0.5 * full.numel()


@pytest.mark.parametrize("low,input_size,out_size", [
    (64, (192, 256), (768, 1024)), (64, (256, 179), (100, 70)), (64, (31, 256), (37, 301)),
    (128, (192, 256), (300, 400)), (16, (192, 256), (200, 260))])
def test_stability_bounds_cpu_kernel(low, input_size, out_size):
    """The compiled CPU kernel keeps every candidate whose exact stability score reaches the
    threshold, only candidates the torch bounds keep (its last level, the mixed blocks'
    pixels, is tighter than their frame cells) and fewer of them; a candidate with NaN
    logits is left to the exact filter."""
    low_res = smooth_noise(40, low, low, seed=11, cell=max(low // 8, 2)) * torch.logspace(-1, 2.5, 40)[:, None, None]
    low_res = low_res + torch.linspace(-2, 2, 40)[:, None, None]
    low_res[0], low_res[1] = -5.0, 5.0
    low_res[2, 3, 4] = float("nan")
    upsampler = ThresholdUpsampler(low, 256, input_size, out_size)
    exact = upsampler.classify(low_res, [1.0, -1.0, 0.5, -0.5]).exact().counts([0, 1, 2, 3])
    kept = kept_torch = 0
    for offset, thresh in ((1.0, 0.65), (1.0, 0.95), (0.5, 0.8), (0.5, 0.3)):
        k = 0 if offset == 1.0 else 2
        reach = set((exact[:, k] / exact[:, k + 1] >= thresh).nonzero().squeeze(1).tolist())
        ours = may_pass(upsampler, low_res, 0.0, offset, thresh)
        assert ours.dtype == torch.int64
        ours = set(ours.tolist())
        theirs = set(may_pass_torch(upsampler, low_res, 0.0, offset, thresh).tolist())
        assert reach <= ours and reach <= theirs
        assert ours - {2} <= theirs and 2 in ours
        kept, kept_torch = kept + len(ours - {2}), kept_torch + len(theirs - {2})
    assert kept < kept_torch < 4 * 39
    assert may_pass(upsampler, low_res[:0], 0.0, 1.0, 0.9).shape == (0,)
    with pytest.raises(ValueError, match="do not fit"):  # the kernel would read past them
        may_pass(upsampler, low_res[:, :-1, :-1], 0.0, 1.0, 0.9)


@pytest.mark.parametrize("ry,rx", [(1, 1), (0, 2), (3, 1), (70, 0)])
def test_stability_kernel_window_extrema(ry, rx):
    """The kernel's window max and -min, clipped at the borders, are amg.upsample's (torch)."""
    from amg.stability_bounds import kernel
    from amg.upsample import _window_max

    v = torch.randn(2, 64, 64)
    v[1, 5:9, 7:12] = float("inf")
    for x in v:
        scratch = [torch.empty(64) for _ in range(2)]
        hi, neg_lo = torch.empty(64, 64), torch.empty(64, 64)
        kernel().window_extrema(x.data_ptr(), 64, ry, rx, *(t.data_ptr() for t in (*scratch, hi, neg_lo)))
        assert torch.equal(hi, _window_max(x[None], ry, rx)[0])
        assert torch.equal(neg_lo, _window_max(-x[None], ry, rx)[0])


def test_stability_bounds_cpu_kernel_keeps_the_callers_thread_count():
    """The kernel splits candidates over torch's OpenMP team: in a fresh process (the first
    call builds or loads it and starts the team) the caller's thread count is kept."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from amg.stability_bounds import kernel, may_pass\n"
            "from amg.upsample import ThresholdUpsampler\n"
            "up = ThresholdUpsampler(64, 256, (192, 256), (768, 1024))\n"
            "may_pass(up, torch.randn(8, 64, 64), 0.0, 1.0, 0.65)\n"
            "print(kernel() is not None, torch.get_num_threads())\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True 1"


def test_torch_stability_bounds_in_mixed_block_groups(monkeypatch):
    """The torch bounds' frame cells hold memory per mixed pixel, so they run in groups of at
    most amg.upsample.MIXED_PIXELS of them: a budget of one pixel keeps the same candidates."""
    import amg.upsample

    upsampler = ThresholdUpsampler(64, 256, (192, 256), (768, 1024))
    low_res = smooth_noise(40, 64, 64, seed=11, cell=8) * torch.logspace(-1, 2.5, 40)[:, None, None]
    whole = [may_pass_torch(upsampler, low_res, 0.0, 1.0, t) for t in (0.3, 0.65, 0.9)]
    monkeypatch.setattr(amg.upsample, "MIXED_PIXELS", 1)
    assert all(torch.equal(may_pass_torch(upsampler, low_res, 0.0, 1.0, t), w) for t, w in zip((0.3, 0.65, 0.9), whole))
    assert 0 < len(whole[1]) < 40


def test_stability_bounds_without_native_kernels_run_in_torch(monkeypatch):
    """SAMENGINE_NATIVE=0 (or no C compiler): the torch bounds, which keep a superset."""
    from amg import stability_bounds

    upsampler = ThresholdUpsampler(64, 256, (192, 256), (768, 1024))
    low_res = smooth_noise(12, 64, 64, seed=3, cell=8) * 4
    native_kept = stability_bounds.may_pass(upsampler, low_res, 0.0, 1.0, 0.65)
    monkeypatch.setenv("SAMENGINE_NATIVE", "0")
    assert stability_bounds.kernel() is None
    torch_kept = stability_bounds.may_pass(upsampler, low_res, 0.0, 1.0, 0.65)
    assert torch.equal(torch_kept, stability_bounds.may_pass_torch(upsampler, low_res, 0.0, 1.0, 0.65))
    assert set(native_kept.tolist()) <= set(torch_kept.tolist())
    assert len(native_kept) < len(torch_kept)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_boxes_match_official(device, size):
    masks = blob_masks(12, *size, seed=5).to(device)
    ours = masks_to_boxes_xyxy(masks)
    assert ours.device == masks.device
    assert torch.equal(ours, official.batched_mask_to_box(masks).long())
    # Any leading dims, and an empty batch.
    grouped = masks[:12].reshape(3, 4, *size)
    assert torch.equal(masks_to_boxes_xyxy(grouped), official.batched_mask_to_box(grouped))
    assert masks_to_boxes_xyxy(masks[:0]).shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_box_near_crop_edge_matches_official(device):
    gen = torch.Generator().manual_seed(6)
    crop, image = [100, 60, 300, 260], [0, 0, 320, 260]
    xy = torch.randint(0, 200, (500, 2), generator=gen)
    wh = torch.randint(0, 120, (500, 2), generator=gen)
    int_boxes = torch.cat([xy, (xy + wh).clamp(max=199)], dim=1).to(device)
    float_boxes = int_boxes.float() + torch.rand(500, 4, generator=gen).to(device)
    for boxes in (int_boxes, float_boxes):
        for atol in (20.0, 5.0, 0.0):
            expected = official.is_box_near_crop_edge(boxes, crop, image, atol)
            assert torch.equal(box_near_crop_edge(boxes, crop, image, atol), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_uncrop_matches_official(device):
    gen = torch.Generator().manual_seed(7)
    crop = [30, 20, 90, 70]
    boxes = torch.randint(0, 50, (6, 4), generator=gen).to(device)
    boxes_per_channel = torch.rand(2, 6, 4, generator=gen).to(device) * 50
    points = torch.rand(6, 2, generator=gen).to(device) * 50
    points_per_channel = torch.rand(2, 6, 2, generator=gen).to(device) * 50
    for ours, expected in [
        (uncrop_boxes(boxes, crop), official.uncrop_boxes_xyxy(boxes, crop)),
        (uncrop_boxes(boxes_per_channel, crop),
         official.uncrop_boxes_xyxy(boxes_per_channel, crop)),
        (uncrop_points(points, crop), official.uncrop_points(points, crop)),
        (uncrop_points(points_per_channel, crop),
         official.uncrop_points(points_per_channel, crop)),
    ]:
        assert ours.dtype == expected.dtype and torch.equal(ours, expected)

    masks = blob_masks(5, 50, 60, seed=7).to(device)
    for crop_box, orig_h, orig_w in [([30, 20, 90, 70], 80, 100), ([0, 0, 60, 50], 50, 60),
                                     ([40, 30, 100, 80], 80, 100)]:
        ours = uncrop_masks(masks, crop_box, orig_h, orig_w)
        assert torch.equal(ours, official.uncrop_masks(masks, crop_box, orig_h, orig_w))
    assert uncrop_masks(masks, [0, 0, 60, 50], 50, 60) is masks


def small_region_cases() -> list[np.ndarray]:
    cases = [m.numpy() for m in blob_masks(16, 48, 64, seed=8)]
    cases += [m.numpy() for m in blob_masks(8, 31, 17, seed=9)]
    # Equal-size islands all below the threshold: the tie decides which is kept.
    ties = np.zeros((20, 20), dtype=bool)
    ties[2:4, 12:14] = ties[2:4, 2:4] = ties[12:14, 2:4] = ties[12:14, 12:14] = True
    # Diagonal neighbours: one region under 8-connectivity, two under 4.
    diagonal = np.zeros((6, 6), dtype=bool)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[4, 4] = True
    return cases + [ties, diagonal, ~ties, ~diagonal]


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area_thresh", [0, 1, 3, 4.5, 30, 200, 1e9])
def test_remove_small_regions_matches_official(mode, area_thresh):
    for mask in small_region_cases():
        ours, ours_changed = remove_small_regions(mask, area_thresh, mode)
        expected, expected_changed = official.remove_small_regions(mask, area_thresh, mode)
        assert ours_changed == expected_changed
        assert ours.dtype == bool
        np.testing.assert_array_equal(ours, expected)
        if not ours_changed:
            assert ours is mask


def cleanup_cases() -> list[np.ndarray]:
    """Masks for the in-box cleanup: the cases above placed in larger images (margins of
    every width, touching each border), and masks whose surroundings split or are small."""
    cases = small_region_cases()
    for k, mask in enumerate(cases[:12]):
        h, w = mask.shape
        top, left = [(0, 0), (1, 3), (9, 0), (0, 14), (5, 7), (2, 2)][k % 6]
        placed = np.zeros((h + top + 4 * (k % 3), w + left + 3 * (k % 2)), dtype=bool)
        placed[top:top + h, left:left + w] = mask
        cases.append(placed)
    band = np.zeros((20, 30), dtype=bool)
    band[8:12] = True  # spans the width: above and below are two regions
    band[9, 5:8] = False  # with a hole
    column = band.T.copy()
    ring = np.zeros((12, 12), dtype=bool)
    ring[1:11, 1:11] = True
    ring[4:8, 4:8] = False  # a hole the size of its surroundings
    almost_full = np.ones((9, 9), dtype=bool)
    almost_full[0, 0] = almost_full[8, 8] = almost_full[4, 4] = False  # small background pieces
    speck = np.zeros((40, 50), dtype=bool)
    speck[20, 30] = True
    return cases + [band, column, ring, almost_full, speck, np.zeros((7, 5), dtype=bool), np.ones((7, 5), dtype=bool)]


@pytest.mark.parametrize("area_thresh", [1, 3, 4.5, 30, 60, 200, 1e9])
def test_in_box_cleanup_matches_official(area_thresh):
    for mask in cleanup_cases():
        size = mask.shape
        expected, filled = official.remove_small_regions(mask, area_thresh, "holes")
        expected, dropped = official.remove_small_regions(expected, area_thresh, "islands")
        counts = masks_to_rle_counts(torch.from_numpy(mask)[None])[0]
        cleaned = clean_small_regions(counts, size, area_thresh)
        assert (cleaned is not None) == (filled or dropped)
        if cleaned is None:
            continue
        whole = coco_to_mask(rle_to_coco([cleaned.counts(size)], size)[0]).astype(bool)
        np.testing.assert_array_equal(whole, expected)
        assert cleaned.box() == masks_to_boxes_xyxy(torch.from_numpy(expected)[None])[0].tolist()


def test_in_box_cleanup_decodes_only_the_box(monkeypatch):
    """A small mask on a large image is cleaned without the whole image (the point of it)."""
    import amg.regions

    def whole_image(*args):
        raise AssertionError("worked on the whole image")

    monkeypatch.setattr(amg.regions, "_on_whole_image", whole_image)
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[1000:1040, 2000:2050] = True
    mask[1010:1012, 2010:2012] = False  # a hole
    mask[1100, 2100] = True  # an island
    cleaned = clean_small_regions(masks_to_rle_counts(torch.from_numpy(mask)[None])[0], mask.shape, 10)
    assert cleaned.pixels.shape == (103, 103) and (cleaned.y0, cleaned.x0) == (999, 1999)  # box + margin
    assert cleaned.pixels.sum() == 40 * 50 and cleaned.box() == [2000, 1000, 2049, 1039]


def test_remove_small_regions_rejects_unknown_mode():
    with pytest.raises(ValueError):
        remove_small_regions(np.zeros((3, 3), dtype=bool), 1, "both")


# ---------------------------------------------------------------- grids and crops


def test_point_grids_match_official():
    for n in range(1, 65):
        ours = point_grid(n)
        assert ours.shape == (n * n, 2)
        np.testing.assert_array_equal(ours, official.build_point_grid(n))
    for n_per_side, n_layers, scale in [(32, 0, 1), (32, 2, 2), (16, 3, 2), (10, 2, 3)]:
        ours = point_grids(n_per_side, n_layers, scale)
        expected = official.build_all_layer_point_grids(n_per_side, n_layers, scale)
        assert len(ours) == len(expected) == n_layers + 1
        for a, b in zip(ours, expected):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("im_size", [(768, 1024), (1024, 768), (500, 375), (1, 1), (7, 300)])
def test_crop_boxes_match_official(im_size):
    for n_layers in range(4):
        for overlap_ratio in (0.0, 512 / 1500, 0.25, 0.5, 0.9):
            ours = crop_boxes(im_size, n_layers, overlap_ratio)
            expected = official.generate_crop_boxes(im_size, n_layers, overlap_ratio)
            assert ours == expected


def test_the_package_names_stay_functions_after_every_module_is_imported():
    """amg loads its names lazily (the report imports amg.rle without torch); a module named
    like one of them would replace it once imported (amg.postprocess did: the pipeline's
    post-process stage then called a module)."""
    import importlib
    import pkgutil
    import types

    import amg

    for info in pkgutil.iter_modules(amg.__path__):
        importlib.import_module(f"amg.{info.name}")
    for name in amg.__all__:
        assert not isinstance(getattr(amg, name), types.ModuleType), name
