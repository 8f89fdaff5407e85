"""Interactive prediction: embed an image once, then answer point / box / mask / text
prompts from the stored embedding."""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch

from .sam import Sam
from .text import TextEmbedder, embed_texts, load_embedder
from .transforms import input_shape, resize_image, scale_boxes, scale_coords

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str, name: str = "precision") -> str:
    """The precision to run at: `precision`, checked (an unknown one is a ValueError naming the
    setting), except bf16 on a CPU without native bf16 (AVX512-BF16 or AMX). bf16 matmuls are
    emulated there and run many times slower than fp32 (the automatic generator's decoder: 13.0
    against 0.86 s per photo on an AVX2 EPYC), so fp32 runs instead, with a warning: bf16 is
    asked for speed, and a job on mixed nodes gets each node's fast path. (torch's CPU autocast
    likewise turns itself off for a dtype the CPU does not support.)"""
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"{name} bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls are emulated there and run "
                      "many times slower than fp32, so this runs in fp32", RuntimeWarning, stacklevel=3)
        return "fp32"
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (Linux: from /proc/cpuinfo; elsewhere
    assumed, e.g. Apple silicon)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    if not flags:
        return True  # no x86 flags line (ARM): not ours to judge
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


class SamPredictor:
    def __init__(self, model: Sam, precision: str = "fp32", text_embedder: TextEmbedder | None = None) -> None:
        """text_embedder turns `predict(text=...)` into vectors; default: the one the
        checkpoint names (model.config.text_embedder), loaded on first use."""
        self.precision = resolve_precision(precision, model.device)
        self.model = model.eval()
        self._text_embedder = text_embedder
        self.reset_image()

    @property
    def text_embedder(self) -> TextEmbedder:
        if self._text_embedder is None:
            if self.model.config.text_embed_dim <= 0:
                raise ValueError("this model has no text prompt input (text_embed_dim = 0)")
            self._text_embedder = load_embedder(self.model.config.text_embedder)
        return self._text_embedder

    def embed_text(self, text: str | Sequence[str]) -> np.ndarray:
        """One text -> D, or a list of texts -> B x D, in the model's text input space."""
        texts = [text] if isinstance(text, str) else list(text)
        out = embed_texts(self.text_embedder, texts, self.model.config.text_embed_dim)
        return out[0] if isinstance(text, str) else out

    # ---- image -------------------------------------------------------------------
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """image: H x W x 3 uint8 array in image_format ("RGB" or "BGR")."""
        validate_image(image)
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = resize_image(np.ascontiguousarray(image), self.model.image_size)
        x = torch.as_tensor(resized, device=self.model.device).permute(2, 0, 1)[None].float()
        with torch.inference_mode(), self._autocast():
            features = self.model.encode(x)
        self.set_embedding(features.float(), image.shape[:2])

    def set_embedding(self, features: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Use a precomputed 1 x C x e x e embedding (e.g. from a cache) of an image of
        original_size (h, w)."""
        self.features = features.to(self.model.device)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = input_shape(*self.original_size, self.model.image_size)

    def reset_image(self) -> None:
        self.features = None
        self.original_size = None
        self.input_size = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    # ---- prompts -------------------------------------------------------------------
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        text_embedding: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: str | Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts in original-image pixels. One prompt: point_coords N x 2, point_labels
        N (1 foreground, 0 background), box 4 (XYXY), mask_input 1 x 4e x 4e (low-res
        logits from a previous call), text ("red ellipse") or its text_embedding D. Many
        prompts at once: add a leading batch dimension B to every prompt given (a list of
        B texts).

        Returns masks (M x H x W bool, or logits), IoU predictions M and low-res logits
        M x 4e x 4e, with M = 3 if multimask_output else 1, and a leading B if batched."""
        if not self.is_image_set:
            raise RuntimeError("call set_image (or set_embedding) before predict")
        if text is not None:
            if text_embedding is not None:
                raise ValueError("give text or text_embedding, not both")
            if not isinstance(text, str) and not (isinstance(text, Sequence) and all(isinstance(t, str) for t in text)):
                raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
            text_embedding = self.embed_text(text)
        prompts, batched = self._prompts(point_coords, point_labels, box, mask_input, text_embedding)
        with torch.inference_mode(), self._autocast():
            low_res, iou = self.model.decode(self.features, **prompts, multimask_output=multimask_output,
                                             input_size=self.input_size)
            low_res, iou = low_res.float(), iou.float()
            masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        out = tuple(t.cpu().numpy() for t in (masks, iou, low_res))
        return out if batched else tuple(t[0] for t in out)

    def _prompts(self, coords, labels, box, mask_input, text) -> tuple[dict, bool]:
        if (coords is None) != (labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if coords is None and box is None and mask_input is None and text is None:
            raise ValueError("give at least one prompt: point_coords, box, mask_input, text or text_embedding")
        batched = None

        def check(name, value, item_ndim, item_shape=None):
            nonlocal batched
            arr = _as_array(name, value)
            if arr.ndim not in (item_ndim, item_ndim + 1):
                raise ValueError(f"{name} must have {item_ndim} dims (one prompt) or {item_ndim + 1} "
                                 f"(a batch of prompts), got shape {arr.shape}")
            is_batched = arr.ndim == item_ndim + 1
            if batched is not None and batched != is_batched:
                raise ValueError(f"{name} is {'' if is_batched else 'not '}batched but an earlier prompt "
                                 f"{'is not' if is_batched else 'is'}: give all prompts with or without a batch dim")
            batched = is_batched
            arr = arr if is_batched else arr[None]
            if item_shape is not None:
                for axis, size in enumerate(item_shape, start=1):
                    if size is not None and arr.shape[axis] != size:
                        want = ", ".join("N" if s is None else str(s) for s in item_shape)
                        raise ValueError(f"{name} has shape {arr.shape[1:]} per prompt, expected ({want},)"
                                         if len(item_shape) == 1 else
                                         f"{name} has shape {arr.shape[1:]} per prompt, expected ({want})")
            return arr

        size, dev = self.model.image_size, self.model.device
        out: dict[str, torch.Tensor] = {}
        sizes: dict[str, int] = {}
        if coords is not None:
            c = check("point_coords", coords, 2, (None, 2))
            lab = check("point_labels", labels, 1)
            if lab.shape != c.shape[:2]:
                raise ValueError(f"point_labels shape {lab.shape} does not match point_coords {c.shape}")
            if not np.isin(lab, (0, 1, -1)).all():
                raise ValueError("point_labels must be 1 (foreground), 0 (background) or -1 (ignore)")
            out["point_coords"] = torch.as_tensor(scale_coords(c, self.original_size, size), device=dev)
            out["point_labels"] = torch.as_tensor(lab.astype(np.int64), device=dev)
            sizes["point_coords"] = c.shape[0]
        if box is not None:
            b = check("box", box, 1, (4,))
            if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
                raise ValueError("box must be XYXY with x1 <= x2 and y1 <= y2")
            out["boxes"] = torch.as_tensor(scale_boxes(b, self.original_size, size), device=dev)
            sizes["box"] = b.shape[0]
        if mask_input is not None:
            lo = self.model.prompt_encoder.mask_input_size
            m = check("mask_input", mask_input, 3, (1, *lo))
            out["mask_input"] = torch.as_tensor(m.astype(np.float32), device=dev)
            sizes["mask_input"] = m.shape[0]
        if text is not None:
            d = self.model.config.text_embed_dim
            if d <= 0:
                raise ValueError("this model has no text prompt input (text_embed_dim = 0)")
            t = check("text_embedding", text, 1, (d,))
            out["text_embedding"] = torch.as_tensor(t.astype(np.float32), device=dev)
            sizes["text_embedding"] = t.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompts disagree on the batch size: {sizes}")
        return out, bool(batched)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.model.device.type, dtype=dtype)


def validate_image(image) -> None:
    """Raise ValueError unless image is a non-empty H x W x 3 uint8 numpy array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 (RGB), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")


def _as_array(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise ValueError(f"{name} must be array-like: {e}") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.size and not np.isfinite(arr.astype(np.float64)).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr
