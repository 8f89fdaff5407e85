"""Semi-automatic stage: Label Studio brush RLE both ways, Label Studio tasks out and back
into the dataset, and pre-filled masks completed by the simulated annotator over HTTP."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from dataset.synthetic import blob_masks
from engine.labelstudio import (
    BrushRleError, brush_to_coco, brush_to_mask, coco_to_brush, decode_values, encode_runs, mask_to_brush,
)


# -- an independent, bit-by-bit reading of the format (the module docstring's grammar) -------
def reference_decode(rle: list[int]) -> np.ndarray:
    bits = "".join(f"{b:08b}" for b in rle)
    pos = 0

    def take(n: int) -> int:
        nonlocal pos
        pos += n
        return int(bits[pos - n: pos], 2)

    total, word = take(32), take(5) + 1
    widths = [take(4) + 1 for _ in range(4)]
    out: list[int] = []
    while len(out) < total:
        repeat = take(1)
        count = take(widths[take(2)]) + 1
        out.extend([take(word)] * count if repeat else [take(word) for _ in range(count)])
    assert len(out) == total
    return np.asarray(out, np.uint8)


def reference_encode_literals(values: np.ndarray, group: int = 5) -> list[int]:
    """Another valid encoding of the same stream: only literal chunks of up to `group`
    values, as the browser's encoder writes runs of distinct values. Never produced by
    engine.labelstudio, so it checks that the decoder reads what others write."""
    parts = [f"{len(values):032b}", f"{8 - 1:05b}", *(f"{w - 1:04b}" for w in (3, 4, 8, 16))]
    for start in range(0, len(values), group):
        chunk = values[start:start + group]
        parts += ["0", "00", f"{len(chunk) - 1:03b}", *(f"{v:08b}" for v in chunk.tolist())]
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def as_ls_values(mask: np.ndarray) -> np.ndarray:
    """What Label Studio's converter feeds its encoder: every pixel as 4 equal RGBA bytes."""
    return np.repeat(mask.astype(np.uint8).ravel() * 255, 4)


def edge_masks() -> list[np.ndarray]:
    full = np.ones((128, 128), bool)  # 65536 values: exactly one longest chunk
    checker = (np.indices((9, 11)).sum(0) % 2).astype(bool)
    corners = np.zeros((17, 23), bool)
    corners[0, 0] = corners[-1, -1] = corners[0, -1] = corners[-1, 0] = True
    return [
        np.zeros((1, 1), bool), np.ones((1, 1), bool), np.zeros((40, 30), bool), np.ones((40, 30), bool),
        full, np.ones((200, 400), bool),  # one run split over several chunks
        np.ones((1, 97), bool), np.zeros((97, 1), bool), checker, corners,
        np.eye(31, 47, dtype=bool),
    ]


def random_masks(rng: np.random.Generator) -> list[np.ndarray]:
    masks = [rng.random((int(rng.integers(1, 60)), int(rng.integers(1, 60)))) < rng.uniform(0.05, 0.95)
             for _ in range(25)]
    masks += list(blob_masks(150, 210, 8, rng))
    return masks


def test_brush_rle_golden_bytes():
    # 2 x 2 mask, top-left pixel set: 4 x 255 then 12 x 0, written out field by field.
    bits = ("00000000000000000000000000010000" "00111" "0010" "0011" "0111" "1111"  # 16 values, 8-bit words
            "1" "00" "011" "11111111"  # repeat, 3-bit length field, length 4, value 255
            "1" "01" "1011" "00000000")  # repeat, 4-bit length field, length 12, value 0
    bits += "0" * (-len(bits) % 8)
    expected = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    mask = np.array([[True, False], [False, False]])
    assert mask_to_brush(mask) == expected
    assert (brush_to_mask(expected, 2, 2) == mask).all()


def test_brush_rle_round_trip_random_and_edge_masks():
    rng = np.random.default_rng(8)
    for mask in edge_masks() + random_masks(rng):
        h, w = mask.shape
        rle = mask_to_brush(mask)
        assert all(0 <= b <= 255 for b in rle)
        # Our bytes read back exactly, by us and by the independent reader ...
        assert np.array_equal(reference_decode(rle), as_ls_values(mask))
        assert np.array_equal(brush_to_mask(rle, h, w), mask)
        # ... and a stream written differently (literal chunks) reads back the same.
        assert np.array_equal(brush_to_mask(reference_encode_literals(as_ls_values(mask)), h, w), mask)
        # COCO -> brush -> COCO gives pycocotools' own string back, byte for byte.
        coco = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        coco = {"size": [h, w], "counts": coco["counts"].decode()}
        assert coco_to_brush(coco) == rle
        assert brush_to_coco(rle, h, w) == coco


def test_encode_runs_any_values_and_lengths():
    rng = np.random.default_rng(1)
    lengths = np.array([1, 1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 200001, 1, 3])
    values = rng.integers(0, 256, len(lengths))
    rle = encode_runs(lengths, values)
    expected = np.repeat(values.astype(np.uint8), lengths)
    assert np.array_equal(decode_values(rle), expected)
    assert np.array_equal(reference_decode(rle), expected)
    assert encode_runs(np.zeros(0, int), np.zeros(0, int)) == reference_encode_literals(np.zeros(0, np.uint8))


def test_brush_alpha_threshold_reads_antialiased_edges():
    # A browser-painted stroke: colour in RGB, partial alpha on its edge pixels.
    alpha = np.array([[0, 60, 127, 128, 200, 255]], np.uint8)
    rgba = np.stack([np.full_like(alpha, 30), np.full_like(alpha, 200), np.zeros_like(alpha), alpha], axis=-1)
    rle = reference_encode_literals(rgba.ravel())
    assert brush_to_mask(rle, 1, 6).tolist() == [[False, False, False, True, True, True]]


def test_malformed_brush_rle_is_refused():
    rle = mask_to_brush(np.ones((10, 10), bool) ^ np.eye(10, dtype=bool))
    with pytest.raises(BrushRleError, match="ends after"):
        brush_to_mask(rle[:-3], 10, 10)
    with pytest.raises(BrushRleError, match="RGBA image has"):
        brush_to_mask(rle, 10, 11)
    with pytest.raises(BrushRleError, match="header"):
        brush_to_mask([0, 0, 1], 1, 1)
    with pytest.raises(BrushRleError, match="byte values"):
        brush_to_mask([*rle[:-1], 256], 10, 10)
