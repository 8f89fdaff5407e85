"""Property-based tests (hypothesis): COCO RLE of any mask, and the image decoder's limits
for any image size and limits."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as coco_mask

from amg.rle import coco_to_mask, masks_to_rle_counts, rle_area, rle_bbox, rle_to_coco
from pipeline.images import BadImage, ImageLimits, decode_image

masks_batches = st.tuples(st.integers(1, 4), st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda s: arrays(np.bool_, s, elements=st.booleans()))


@settings(max_examples=150, deadline=None)
@given(masks_batches)
def test_rle_of_any_mask_decodes_back_with_pycocotools(masks):
    b, h, w = masks.shape
    counts = masks_to_rle_counts(torch.from_numpy(masks))
    coco = rle_to_coco(counts, (h, w))
    for mask, c, rle in zip(masks, counts, coco):
        assert int(c.sum()) == h * w
        back = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(back.astype(bool), mask) and np.array_equal(coco_to_mask(rle), mask)
        ref = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle["counts"].encode() == ref["counts"]  # the very string pycocotools writes
        assert rle_area(c) == int(mask.sum()) == int(coco_mask.area(ref))
        assert rle_bbox(c, (h, w)) == [int(v) for v in coco_mask.toBbox(ref)]


limits = st.builds(ImageLimits, max_pixels=st.integers(1, 3000), min_side=st.integers(1, 40),
                   max_aspect_ratio=st.floats(1.0, 30.0))


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80), limits, st.sampled_from(["PNG", "JPEG", "WEBP"]))
def test_decoder_limits_for_any_size(width, height, lim, fmt):
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    expected = None
    if width * height > lim.max_pixels:
        expected = "too_many_pixels"
    elif min(width, height) < lim.min_side:
        expected = "too_small"
    elif max(width, height) / min(width, height) > lim.max_aspect_ratio:
        expected = "extreme_aspect_ratio"
    if expected is None:
        out = decode_image(buf.getvalue(), limits=lim)
        assert out.shape == (height, width, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
        if fmt == "PNG":  # lossless: the very pixels
            assert np.array_equal(out, pixels)
    else:
        with pytest.raises(BadImage) as e:
            decode_image(buf.getvalue(), limits=lim)
        assert e.value.reason == expected
