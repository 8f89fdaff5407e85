"""An image's identity from its bytes: sha256 (the image_id) and perceptual hash.

One implementation of each, shared with the pipeline (`pipeline.images` re-exports them):
the phash is always that of the decoded, upright RGB image (`pipeline.images.decode_image`),
so an image imported here and the same bytes annotated by the pipeline get the same hash.
"""
from __future__ import annotations

import hashlib

import numpy as np


def sha256_hex(data: bytes) -> str:
    """The image_id: sha256 hex of the file's bytes."""
    return hashlib.sha256(data).hexdigest()


def phash_rgb(rgb: np.ndarray) -> str:
    """imagehash.phash (hex) of an H x W x 3 uint8 RGB image."""
    import imagehash  # only importers need these
    from PIL import Image

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {rgb.shape} {rgb.dtype}")
    return str(imagehash.phash(Image.fromarray(rgb)))


def image_identity(data: bytes) -> tuple[str, str | None]:
    """(sha256 hex, phash hex or None if the bytes do not decode as an image)."""
    sha, phash, _ = image_identity_and_size(data)
    return sha, phash


def image_identity_and_size(data: bytes) -> tuple[str, str | None, tuple[int, int] | None]:
    """image_identity, and the upright image's (height, width) as the pipeline decodes it
    (None for both if the bytes do not decode as an image)."""
    from pipeline.images import BadImage, ImageLimits, decode_image  # decoding lives with the pipeline's reader

    sha = sha256_hex(data)
    try:  # any size or shape the decoder can read has a phash; the pipeline's limits are its own
        rgb = decode_image(data, limits=ImageLimits(min_side=1, max_aspect_ratio=float("inf")))
    except BadImage:
        return sha, None, None
    return sha, phash_rgb(rgb), rgb.shape[:2]
