"""Resizing to the model's input frame: the longest side becomes image_size, and
coordinates follow. Uses torchvision's resize (PIL bilinear with antialias for uint8
arrays), the same resampling as the official predictor."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import resize


def input_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to long_side, rounded half up."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """H x W x 3 uint8 -> h x w x 3 uint8 with max(h, w) == long_side."""
    h, w = input_shape(image.shape[0], image.shape[1], long_side)
    return np.array(resize(Image.fromarray(image), [h, w]))


def scale_coords(coords: np.ndarray | torch.Tensor, original: tuple[int, int], long_side: int):
    """... x 2 (x, y) pixel coordinates in the original image -> in the resized frame."""
    h, w = original
    nh, nw = input_shape(h, w, long_side)
    coords = coords.copy() if isinstance(coords, np.ndarray) else coords.clone()
    coords = coords.astype(np.float32) if isinstance(coords, np.ndarray) else coords.float()
    coords[..., 0] = coords[..., 0] * (nw / w)
    coords[..., 1] = coords[..., 1] * (nh / h)
    return coords


def scale_boxes(boxes: np.ndarray | torch.Tensor, original: tuple[int, int], long_side: int):
    """... x 4 XYXY boxes in the original image -> in the resized frame."""
    shape = boxes.shape
    return scale_coords(boxes.reshape(-1, 2, 2), original, long_side).reshape(shape)
