import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A non-square RGB image with smooth regions and edges (no file needed)."""
    rng = np.random.default_rng(0)
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float32)
    img[..., 0] = 255 * xx / w
    img[..., 1] = 255 * yy / h
    img[..., 2] = 128
    for _ in range(6):
        cy, cx, r = rng.integers(20, h - 20), rng.integers(20, w - 20), rng.integers(15, 60)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[disk] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
