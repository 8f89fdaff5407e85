"""Training and evaluating the text prompt path on named synthetic objects.

Every synthetic instance is named "<colour> <texture> <shape>". A phrase for an instance is
any non-empty subset of its words, in that order ("red ellipse", "striped", "the blue
star"), that names no other instance of the scene; its target is that instance's mask.

Datasets train it too: masks whose `text_prompt` is set (a COCO import's class names, say)
are named by it, one target per distinct phrase of an image (the union of its masks).

Image side (the paper's recipe): with an embedder that also embeds object crops
(model.crop_embedder.ImageTextEmbedder), each target is prompted during training with the
vector of its own crop instead of a phrase, so any mask trains it, named or not; at
inference the text vector takes the crop vector's place.

Training fits the grounding head (model.text_grounding) of a checkpoint: everything else is
frozen, the image embeddings of the training scenes are computed once, and the loss is the
log-probability, under the softmax of the heatmap over the embedding grid, that the hottest
cell lies on the named object. The decoder then answers the click at that cell as it
answers any click.

The evaluation reports, on held-out scenes, the mIoU of text-prompted masks against the named
object, next to two baselines that ignore the text (the empty phrase, and the name of another
object of the same scene) and to a click at each object's most interior pixel (what a
perfect grounding could hope for with this decoder).
"""
from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from model import Sam
from model.crop_embedder import ImageTextEmbedder, mask_crop
from model.text import TextEmbedder, embed_texts, normalize_phrase
from model.transforms import input_shape, resize_image

from .data import ParquetExamples, parquet_example
from .evaluate import interior_points
from .losses import mask_iou
from .synthetic import COLOURS, SHAPES, TEXTURES, Scene, make_scene, scene_seed

TEMPLATES = ("{}", "a {}", "the {}")
# Word subsets of a name, as index tuples into (colour, texture, shape).
_SUBSETS = [s for r in (3, 2, 1) for s in itertools.combinations(range(3), r)]


def unique_phrases(names: Sequence[str]) -> list[tuple[int, str]]:
    """(instance, phrase) for every word subset of an instance's name that no other
    instance's name also contains, most specific first."""
    words = [name.split() for name in names]
    out = []
    for i, w in enumerate(words):
        for subset in _SUBSETS:
            picked = [w[k] for k in subset]
            matches = sum(all(o[k] == w[k] for k in subset) for o in words)
            if matches == 1:
                out.append((i, " ".join(picked)))
    return out


def vocabulary() -> list[str]:
    """Every phrase a scene can produce, with every template: what training embeds once."""
    parts = (COLOURS, TEXTURES, SHAPES)
    phrases = [" ".join(ws) for subset in _SUBSETS for ws in itertools.product(*(parts[k] for k in subset))]
    return [t.format(p) for p in phrases for t in TEMPLATES]


def low_res_targets(masks: np.ndarray, side: int) -> np.ndarray:
    """N x S x S bool -> N x side x side bool: a low-res pixel is in when the object covers
    at least half of it."""
    n, h, w = masks.shape
    f = h // side
    cover = masks.reshape(n, side, f, side, f).mean(axis=(2, 4))
    return cover >= 0.5


@dataclass
class TextExamples:
    """Frozen-encoder embeddings of training scenes and what to prompt on each.

    embeddings: S x C x e x e; cells: M x e x e bool, the embedding cells each prompted
    instance covers at least half of (at least the cell of its most interior pixel);
    scene_of: M; phrases: per instance, its unique phrases; queries: M x D, when trained on
    the image side (an ImageTextEmbedder's vectors of each target's crop), else None."""

    embeddings: torch.Tensor
    cells: torch.Tensor
    scene_of: torch.Tensor
    phrases: list[list[str]]
    queries: torch.Tensor | None = None


def scene_stream(seed: int, count: int, size: int) -> Iterable[Scene]:
    return (make_scene(scene_seed(seed, i), size) for i in range(count))


Item = tuple[np.ndarray, list[tuple[list[str], np.ndarray]]]  # image, [(phrases, H x W mask)]


def synthetic_items(scenes: Iterable[Scene]) -> Iterator[Item]:
    """Each scene with, for every instance some phrase names uniquely, its phrases and mask."""
    for scene in scenes:
        by_instance: dict[int, list[str]] = {}
        for i, phrase in unique_phrases(scene.names):
            by_instance.setdefault(i, []).append(phrase)
        yield scene.image, [(by_instance[i], scene.masks[i]) for i in sorted(by_instance)]


def mask_items(scenes: Iterable[Scene]) -> Iterator[Item]:
    """Each scene with every visible instance as a target, names or not (image-side training
    needs none)."""
    for scene in scenes:
        yield scene.image, [([], mask) for mask in scene.masks if mask.any()]


def dataset_items(paths: Sequence[str], endpoint_url: str | None = None, unnamed: bool = False,
                  captions: dict[str, list[str]] | None = None) -> Iterator[Item]:
    """Images of our datasets' annotation tables (Delta or Parquet, local or s3://, see
    ParquetExamples) whose masks carry a text_prompt (an imported class name, a phrase that
    found them): one target per distinct phrase of an image, the union of the masks it names.
    captions ({image file name: [sentences]}, read_captions): a caption that mentions exactly
    one of the image's phrases is one more phrase for that target.
    unnamed: every mask is a target of its own, named or not (for image-side training)."""
    source = ParquetExamples(paths, endpoint_url=endpoint_url)
    for batch in source.dataset.to_batches(columns=source.columns):
        for uri, masks in zip(*(batch.column(c).to_pylist() for c in source.columns)):
            kept = [a for a in masks or () if unnamed or a.get("text_prompt")]
            if not kept:
                continue
            example = parquet_example(uri, kept, endpoint_url)
            if unnamed:
                yield example.image, [([normalize_phrase(a["text_prompt"])] if a.get("text_prompt") else [], m)
                                      for a, m in zip(kept, example.masks) if m.any()]
                continue
            groups: dict[str, np.ndarray] = {}
            for ann, mask in zip(kept, example.masks):
                key = normalize_phrase(ann["text_prompt"])
                groups[key] = groups[key] | mask if key in groups else mask
            phrases = {key: [key] for key, mask in groups.items() if mask.any()}
            for caption in (captions or {}).get(uri.rsplit("/", 1)[-1], ()):
                named = caption_target(caption, list(phrases))
                if named is not None:
                    phrases[named].append(normalize_phrase(caption))
            yield example.image, [(ps, groups[key]) for key, ps in phrases.items()]


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """A COCO captions file (images + annotations with image_id and caption) -> {image file
    name: [captions]}."""
    data = json.loads(Path(path).read_text())
    files = {info["id"]: info["file_name"].rsplit("/", 1)[-1] for info in data.get("images", [])}
    out: dict[str, list[str]] = {}
    for ann in data.get("annotations", []):
        caption = normalize_phrase(str(ann.get("caption") or ""))
        if caption and ann.get("image_id") in files:
            out.setdefault(files[ann["image_id"]], []).append(caption)
    return out


def caption_target(caption: str, phrases: Sequence[str]) -> str | None:
    """The one phrase a caption mentions (as whole words, any case, a plural "s"/"es"
    allowed), or None when it mentions none or several."""
    found = [p for p in phrases
             if re.search(r"\b" + r"\s+".join(map(re.escape, p.lower().split())) + r"(e?s)?\b", caption.lower())]
    return found[0] if len(found) == 1 else None


@torch.inference_mode()
def prepare_examples(model: Sam, items: Iterable[Item], batch: int = 16,
                     image_embedder: ImageTextEmbedder | None = None) -> TextExamples:
    """Encode images (resized and padded to the model's input frame, as the predictor does)
    and collect their named targets as embedding-grid cells. With image_embedder, each
    target's query is also computed: the embedder's vector of its crop (at the image's own
    resolution), the paper's recipe for training text prompts on unnamed masks."""
    size, side = model.image_size, model.config.embedding_size
    embeddings, cells, scene_of, phrases, queries = [], [], [], [], []
    pending: list[np.ndarray] = []

    def flush():
        if pending:
            x = torch.as_tensor(np.stack(pending), device=model.device).permute(0, 3, 1, 2).float()
            embeddings.append(model.encode(x).cpu())
            pending.clear()

    for s, (image, targets) in enumerate(items):
        h, w = input_shape(*image.shape[:2], size)
        resized = image if (h, w) == image.shape[:2] else resize_image(image, size)
        if pending and pending[0].shape != resized.shape:
            flush()  # a batch holds images of one shape
        pending.append(resized)
        if len(pending) == batch:
            flush()
        if not targets:
            continue
        masks = torch.from_numpy(np.stack([m for _, m in targets]))
        if (h, w) != tuple(masks.shape[-2:]):
            masks = F.interpolate(masks[None].float(), (h, w), mode="nearest")[0] > 0.5
        frame = np.zeros((len(targets), size, size), bool)
        frame[:, :h, :w] = masks.numpy()
        keep = frame.reshape(len(frame), -1).any(1)  # a target too thin to survive the resize is dropped
        if not keep.any():
            continue
        frame = frame[keep]
        covered = low_res_targets(frame, side)
        inner = interior_points(frame) * side // size  # (x, y) cell of each most interior pixel
        covered[np.arange(len(frame)), inner[:, 1], inner[:, 0]] = True
        cells.append(torch.from_numpy(covered))
        scene_of += [s] * len(frame)
        phrases += [p for (p, _), k in zip(targets, keep) if k]
        if image_embedder is not None:
            crops = [mask_crop(image, m) for (_, m), k in zip(targets, keep) if k]
            queries.append(torch.from_numpy(np.asarray(image_embedder.embed_images(crops), np.float32)))
    flush()
    if not cells:
        raise ValueError("no named objects to train on")
    return TextExamples(torch.cat(embeddings), torch.cat(cells), torch.tensor(scene_of), phrases,
                        torch.cat(queries) if image_embedder is not None else None)


@dataclass
class TextTrainConfig:
    steps: int = 5000
    scenes: int = 32  # scenes per step; every named instance of each is prompted
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def grounding_loss(heat: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B x h x w logits, B x h x w bool target cells -> (mean of -log P(peak on the object),
    B bool: the hottest cell is on the object)."""
    flat, target = heat.flatten(1).float(), cells.flatten(1)
    on_object = torch.logsumexp(flat.masked_fill(~target, float("-inf")), dim=1)
    loss = (torch.logsumexp(flat, dim=1) - on_object).mean()
    hit = target.gather(1, flat.argmax(1, keepdim=True))[:, 0]
    return loss, hit


def train_text(model: Sam, data: TextExamples, embed: Callable[[list[str]], torch.Tensor] | None,
               cfg: TextTrainConfig, log: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit model.text_grounding in place (nothing else changes); returns the history.

    embed: phrases -> N x D text embeddings (called with every phrase once, up front); not
    used (may be None) when data holds image-side queries, which are prompted instead."""
    if model.text_grounding is None:
        raise ValueError("the model has no text input to train (text_embed_dim = 0)")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    image_side = data.queries is not None
    all_phrases = [] if image_side else sorted({t.format(p) for ps in data.phrases for p in ps for t in TEMPLATES})
    table = embed(all_phrases) if all_phrases else None
    index = {p: k for k, p in enumerate(all_phrases)}
    head = model.text_grounding
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.train()
    history = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        scale = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * scale
        # Scenes, then all their instances: the keys of a scene are computed once per step.
        scenes = torch.as_tensor(rng.choice(len(data.embeddings), min(cfg.scenes, len(data.embeddings)),
                                            replace=False))
        picked = torch.isin(data.scene_of, scenes)
        rows = picked.nonzero()[:, 0]
        local = torch.searchsorted(scenes.sort().values, data.scene_of[rows])
        if image_side:
            text = data.queries[rows]
        else:
            phrases = [TEMPLATES[rng.integers(len(TEMPLATES))].format(
                data.phrases[r][rng.integers(len(data.phrases[r]))]) for r in rows.tolist()]
            text = table[[index[p] for p in phrases]]
        heat = head(data.embeddings[scenes.sort().values], text, local)
        loss, hit = grounding_loss(heat, data.cells[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = dict(step=step + 1, loss=float(loss.detach()), hit_rate=float(hit.float().mean()),
                   seconds=time.perf_counter() - start)
        history.append(row)
        if log is not None:
            log(row)
    head.eval()
    return history


@torch.inference_mode()
def text_miou(model: Sam, embedder: TextEmbedder, scenes: Iterable[Scene]) -> dict[str, float]:
    """Held-out mIoU of text-prompted masks against the named instance (the candidate the
    model ranks first, as for a click), for each instance's most specific unique phrase
    (its full name) and its shortest one; two baselines that ignore the text (the empty
    phrase, another instance's name); and a click at the instance's most interior pixel.
    hit_rate_*: how often the click the text grounds to lands on the named instance."""
    model.eval()
    size = model.image_size
    scores: dict[str, list[float]] = {"full_name": [], "shortest": [], "empty_text": [], "other_object": [],
                                      "interior_click": []}
    hits: dict[str, list[bool]] = {k: [] for k in ("full_name", "shortest", "empty_text", "other_object")}
    for scene in scenes:
        pairs = unique_phrases(scene.names)
        by_instance: dict[int, list[str]] = {}
        for i, p in pairs:
            by_instance.setdefault(i, []).append(p)
        if not by_instance:
            continue
        x = torch.as_tensor(scene.image, device=model.device).permute(2, 0, 1)[None].float()
        if scene.image.shape[:2] != (size, size):
            raise ValueError(f"scenes must be {size} x {size}, the model's input size")
        emb = model.encode(x)
        inst = sorted(by_instance)
        full = [by_instance[i][0] for i in inst]
        short = [min(by_instance[i], key=lambda p: (len(p.split()), p)) for i in inst]
        other = [scene.names[(i + 1) % len(scene.names)] for i in inst]
        gt = torch.from_numpy(scene.masks[inst])
        for key, texts in (("full_name", full), ("shortest", short), ("empty_text", [""] * len(inst)),
                           ("other_object", other)):
            vec = torch.as_tensor(embed_texts(embedder, texts, model.config.text_embed_dim), device=model.device)
            low, iou = model.decode(emb, text_embedding=vec, multimask_output=True)
            scores[key] += mask_iou(_ranked_first(low, iou, size).cpu(), gt).tolist()
            click = model.text_click(emb, vec)[0][:, 0].long().clamp(0, size - 1).cpu()
            hits[key] += gt[torch.arange(len(inst)), click[:, 1], click[:, 0]].tolist()
        points = torch.as_tensor(interior_points(scene.masks[inst]), dtype=torch.float32, device=model.device)
        low, iou = model.decode(emb, points[:, None], torch.ones(len(inst), 1, dtype=torch.int64), multimask_output=True)
        scores["interior_click"] += mask_iou(_ranked_first(low, iou, size).cpu(), gt).tolist()
    out = {f"miou_{k}": float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    out |= {f"hit_rate_{k}": float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out["instances"] = len(scores["full_name"])
    return out


def _ranked_first(low: torch.Tensor, iou: torch.Tensor, size: int) -> torch.Tensor:
    """B x K low-res logits and B x K predicted IoUs -> B x size x size bool masks of the
    candidate with the highest predicted IoU."""
    best = low[torch.arange(len(low)), iou.argmax(1)][:, None].float()
    return F.interpolate(best, (size, size), mode="bilinear", align_corners=False)[:, 0] > 0
