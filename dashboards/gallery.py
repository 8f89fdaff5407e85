"""Sample gallery: sampled images with their masks drawn on top, as inline JPEG thumbnails.
Images are read from each row's `uri` (local or s3://); one that cannot be read, or whose
size no longer matches its masks, is skipped and counted."""
from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
from PIL import Image

from amg.overlay import overlay
from amg.rle import coco_to_mask
from pipeline.images import ImageLimits, decode_image
from pipeline.sources import read_bytes

THUMB_SIDE = 420


def _masks(row: dict) -> list[np.ndarray]:
    return [coco_to_mask(m["segmentation"]) for m in row["annotations"]]


def _seed(image_id: str) -> int:
    """Mask colours fixed per image, so two reports of one version look the same."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:4], "big")


def tile(row: dict, endpoint_url: str | None = None, limits: ImageLimits = ImageLimits()) -> dict:
    """One gallery tile: {image_id, uri, masks, width, height, src (data: URL)} or
    {image_id, uri, skipped: reason}."""
    base = {"image_id": row["image_id"], "uri": row["uri"], "masks": len(row["annotations"]),
            "width": row["width"], "height": row["height"]}
    try:
        image = decode_image(read_bytes(row["uri"], max_bytes=limits.max_bytes, endpoint_url=endpoint_url),
                             limits=limits)
    except Exception as e:  # moved, deleted, no credentials: the gallery goes on without it
        return {**base, "skipped": f"unreadable: {type(e).__name__}"}
    if image.shape[:2] != (row["height"], row["width"]):
        return {**base, "skipped": f"image is {image.shape[1]}x{image.shape[0]}, masks are {row['width']}x{row['height']}"}
    drawn = overlay(image, _masks(row), alpha=0.45, seed=_seed(row["image_id"]))
    thumb = Image.fromarray(drawn)
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return {**base, "src": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}
