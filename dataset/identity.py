"""An image's identity from its bytes: sha256 (the image_id) and perceptual hash."""
from __future__ import annotations

import hashlib
import io


def image_identity(data: bytes) -> tuple[str, str | None]:
    """(sha256 hex, phash hex or None if the bytes do not decode as an image)."""
    import imagehash  # only importers need these
    from PIL import Image, UnidentifiedImageError

    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            return sha, str(imagehash.phash(im))
    except (UnidentifiedImageError, OSError):
        return sha, None
