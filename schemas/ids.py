"""Integer ids: the image key used by SA-1B / COCO exports, and annotation ids.

An image's identity is its sha256 (`image_id`), but SA-1B and COCO want integers. Each
row stores an `image_key`: the first 48 bits of the sha256, which is what every image gets
unless another image in the table already holds that key (about a one-in-five chance that
*some* pair collides among 11M images). Then the writer takes the next free key
(key + 1, key + 2, ...). Because the key is stored in the table, exports and re-imports
never recompute it, and the probe order can be anything deterministic.

Annotation ids pack the image key and the mask's index in its image:

    id = image_key << 15 | index        (index < 32768 masks per image)

so ids are unique in the table exactly when image keys are, stay below 2**63 (int64), and
an id names its image without a lookup. 48-bit image keys are also safe as JSON numbers in
any language (< 2**53); annotation ids are int64 and need a 64-bit JSON reader outside Python.
"""
from __future__ import annotations

from typing import Callable, Iterable

KEY_BITS = 48
INDEX_BITS = 15
MAX_MASKS_PER_IMAGE = 1 << INDEX_BITS
_KEY_MASK = (1 << KEY_BITS) - 1


def natural_image_key(image_id: str) -> int:
    """The key an image gets when nothing else holds it: the top 48 bits of its sha256."""
    return int(image_id[: KEY_BITS // 4], 16)


def assign_image_keys(image_ids: Iterable[str], owner: Callable[[int], str | None]) -> dict[str, int]:
    """image_id -> image_key. `owner(key)` is the image_id holding key in the table, or None.

    Each image walks the probe chain from its natural key and stops at a free key or at the
    key it already holds, so an image already in the table gets its stored key back and a
    new one gets a key no other image holds (in the table or in this batch).
    """
    chosen: dict[int, str] = {}
    keys: dict[str, int] = {}
    for image_id in image_ids:
        key = natural_image_key(image_id)
        while True:
            holder = chosen.get(key) or owner(key)
            if holder is None or holder == image_id:
                break
            key = (key + 1) & _KEY_MASK
        chosen[key] = image_id
        keys[image_id] = key
    return keys


def annotation_id(image_key: int, index: int) -> int:
    """Id of the index-th mask of an image."""
    if not 0 <= index < MAX_MASKS_PER_IMAGE:
        raise ValueError(f"mask index {index} out of range: at most {MAX_MASKS_PER_IMAGE} masks per image")
    return (image_key << INDEX_BITS) | index


def split_annotation_id(ann_id: int) -> tuple[int, int]:
    """(image_key, index) of an annotation id."""
    return ann_id >> INDEX_BITS, ann_id & (MAX_MASKS_PER_IMAGE - 1)
