"""Sample gallery: sampled images with their masks drawn on top, as inline JPEG thumbnails.
Images are read from each row's `uri` (local or s3://); one that cannot be read, whose bytes
are no longer those annotated (their sha256 is not the image_id), or whose size no longer
matches its masks, is skipped with the reason."""
from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
from PIL import Image

from amg.overlay import overlay
from amg.rle import coco_to_mask
from pipeline.images import BadImage, ImageLimits, decode_image
from pipeline.sources import ReadError, read_bytes

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
        data = read_bytes(row["uri"], max_bytes=limits.max_bytes, endpoint_url=endpoint_url)
        # The masks fit the bytes that were annotated, whose sha256 is the image_id.
        if hashlib.sha256(data).hexdigest() != row["image_id"]:
            return {**base, "skipped": "image changed since it was annotated"}
        image = decode_image(data, limits=limits)
    except (ReadError, BadImage) as e:  # moved, deleted, forbidden: the reason quarantine would give
        return {**base, "skipped": e.reason}
    except Exception as e:  # no credentials, ...: the gallery goes on without it
        return {**base, "skipped": f"unreadable: {type(e).__name__}"}
    if image.shape[:2] != (row["height"], row["width"]):
        return {**base, "skipped": f"image is {image.shape[1]}x{image.shape[0]}, masks are {row['width']}x{row['height']}"}
    drawn = overlay(image, _masks(row), alpha=0.45, seed=_seed(row["image_id"]))
    thumb = Image.fromarray(drawn)
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return {**base, "src": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}
