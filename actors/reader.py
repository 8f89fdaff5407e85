"""Read, hash, decode and validate input files (CPU tasks)."""
from __future__ import annotations

import time

import numpy as np

from pipeline.images import BadImage, ImageLimits, decode_image, image_identity, phash
from pipeline.sources import ReadError, read_bytes

from .batch import OK, QUARANTINED, node_id, objects

_EMPTY = np.zeros((0, 0, 3), np.uint8)


def read_images(batch: dict[str, np.ndarray], *, limits: dict, endpoint_url: str | None = None) -> dict[str, np.ndarray]:
    """uri, size -> image (H x W x 3 uint8 RGB, upright), image_id (sha256 of the bytes),
    phash, width, height; a row that cannot be read or decoded is quarantined with the reason."""
    limits = ImageLimits(**limits)
    n = len(batch["uri"])
    status, reason = [OK] * n, [""] * n
    ids, hashes, images = [""] * n, [""] * n, [_EMPTY] * n
    seconds = np.zeros(n)
    for i, uri in enumerate(batch["uri"]):
        t = time.perf_counter()
        size = batch["size"][i]
        try:
            data = read_bytes(str(uri), max_bytes=limits.max_bytes, endpoint_url=endpoint_url,
                              size=None if size is None or np.isnan(size) else int(size))
            ids[i] = image_identity(data)
            images[i] = decode_image(data, limits=limits)
            hashes[i] = phash(images[i])
        except (ReadError, BadImage) as e:
            status[i], reason[i] = QUARANTINED, f"{e.reason}: {e.detail}"[:500]
        except Exception as e:  # anything unforeseen is this file's problem, not the run's
            status[i], reason[i] = QUARANTINED, f"read_error: {type(e).__name__}: {e}"[:500]
        seconds[i] = time.perf_counter() - t
    return {
        "uri": batch["uri"], "status": objects(status), "reason": objects(reason),
        "image_id": objects(ids), "phash": objects(hashes), "image": objects(images),
        "height": np.array([im.shape[0] for im in images], np.int64),
        "width": np.array([im.shape[1] for im in images], np.int64),
        "t_read": seconds, "node_read": objects([node_id()] * n),
    }
