"""COCO instances JSON, class-agnostic: export a version, import anyone's COCO labels.

Exports have one category ("object"), image ids = our integer image keys, annotation ids =
ours, segmentation = the stored compressed RLE (str counts, which pycocotools reads as it
is), and keep the SA-1B extras (predicted_iou, stability_score, point_coords, crop_box) plus
stage and round. Each image also carries its `sha256`, so a re-import restores image_id and
image_key without the image files.

Imports accept polygon, uncompressed and compressed RLE segmentations; each becomes a
compressed RLE and its area and bbox are recomputed from the mask, so imported rows meet the
same checks as generated ones (COCO's own polygon areas differ slightly from mask areas).
A mask's category name becomes its `text_prompt` (the words that name its object, which the
text path trains on: training/text.py), except our own class-agnostic "object".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from pycocotools import mask as coco_mask

from .identity import image_identity
from .reader import iter_images

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
_EXTRAS = ("predicted_iou", "stability_score", "point_coords", "crop_box", "stage", "round")


def export_coco(root: str, dest: str | Path, **pin: Any) -> int:
    """Write a version as one COCO instances JSON file (local path; missing folders are made);
    returns the image count.

    Streams: the images list is written in a first pass over the small columns, the
    annotations in a second, so memory holds one batch of rows at a time. The file appears
    under its name only when complete (written beside it, then renamed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    n = 0
    with open(partial, "w") as f:
        f.write('{"info":{"description":"samengine export"},"licenses":[],')
        f.write(f'"categories":[{json.dumps(CATEGORY)}],"images":[')
        for image in iter_images(root, **pin):
            entry = {"id": image["image_key"], "width": image["width"], "height": image["height"],
                     "file_name": os.path.basename(image["uri"]), "sha256": image["image_id"],
                     "coco_url": image["uri"], "phash": image["phash"]}
            f.write(("," if n else "") + json.dumps(entry))
            n += 1
        f.write('],"annotations":[')
        first = True
        for image in iter_images(root, **pin):
            for ann in image["annotations"]:
                entry = {"id": ann["id"], "image_id": image["image_key"], "category_id": CATEGORY["id"],
                         "segmentation": ann["segmentation"], "area": ann["area"], "bbox": ann["bbox"],
                         "iscrowd": 0, **{k: ann[k] for k in _EXTRAS}}
                if ann.get("text_prompt") is not None:
                    entry["text_prompt"] = ann["text_prompt"]
                f.write(("" if first else ",") + json.dumps(entry))
                first = False
        f.write("]}")
    os.replace(partial, dest)
    return n


def read_coco(path: str | Path, images_dir: str | Path | None = None) -> Iterator[dict]:
    """Writer-ready records from a COCO instances file (all categories become masks).

    image_id is the image's `sha256` field when present (our exports), else the sha256 of
    images_dir / file_name.
    """
    data = json.loads(Path(path).read_text())
    names = {c["id"]: c.get("name") for c in data.get("categories", []) if c.get("name") != CATEGORY["name"]}
    by_image: dict[Any, list[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    for info in data["images"]:
        h, w = int(info["height"]), int(info["width"])
        record = {"width": w, "height": h,
                  "annotations": [_mask(a, h, w, names) for a in by_image.get(info["id"], [])]}
        if "sha256" in info:
            record.update(image_id=info["sha256"], image_key=int(info["id"]),
                          uri=info.get("coco_url") or info["file_name"], phash=info.get("phash"))
        else:
            if images_dir is None:
                raise ValueError(f"{path}: image {info['file_name']} has no sha256; pass images_dir")
            file = Path(images_dir) / info["file_name"]
            sha, phash = image_identity(file.read_bytes())
            record.update(image_id=sha, uri=str(file), phash=phash)
        yield record


def _mask(ann: dict, h: int, w: int, names: dict | None = None) -> dict:
    rle = _to_rle(ann["segmentation"], h, w)
    mask = {"segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(coco_mask.area(rle)), "bbox": [int(v) for v in coco_mask.toBbox(rle)],
            "predicted_iou": ann.get("predicted_iou", ann.get("score")),
            "stability_score": ann.get("stability_score"),
            "point_coords": ann.get("point_coords") or [], "crop_box": ann.get("crop_box") or [0, 0, w, h]}
    mask.update({k: ann[k] for k in ("stage", "round", "text_prompt") if k in ann})
    if mask.get("text_prompt") is None and names and names.get(ann.get("category_id")):
        mask["text_prompt"] = str(names[ann["category_id"]])
    return mask


def _to_rle(segm: Any, h: int, w: int) -> dict:
    """Any COCO segmentation -> one compressed RLE with bytes counts."""
    if isinstance(segm, list):  # polygons of one object
        return coco_mask.merge(coco_mask.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return coco_mask.frPyObjects(segm, h, w)
    counts = segm["counts"]
    return {"size": list(segm["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def import_coco(path: str | Path, writer, images_dir: str | Path | None = None,
                chunk_images: int = 1000) -> list[int]:
    """Commit a COCO file through a DatasetWriter; returns the versions made."""
    return writer.commit_all(read_coco(path, images_dir), chunk_images)
