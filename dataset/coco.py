"""COCO instances JSON, class-agnostic: export a version, import anyone's COCO labels.

Exports have one category ("object"), image ids = our integer image keys, annotation ids =
1, 2, 3, ... in export order with our stored id beside them as the string `samengine_id`
(`exports.export_annotation_ids`: stored ids are above 2**53), segmentation = the stored
compressed RLE (str counts, which pycocotools reads as it is), and keep the SA-1B extras
(predicted_iou, stability_score, point_coords, crop_box) plus stage and round. Each image
also carries its `sha256`, so a re-import restores image_id and image_key without the image
files. Width, height and masks are those of the image as shown, after its EXIF orientation
is applied; file_name is the file as stored, so a loader must apply EXIF orientation too.

Imports accept polygon, uncompressed and compressed RLE segmentations; each becomes a
compressed RLE and its area and bbox are recomputed from the mask, so imported rows meet the
same checks as generated ones (COCO's own polygon areas differ slightly from mask areas).
A mask's category name becomes its `text_prompt` (the words that name its object, which the
text path trains on: training/text.py), except our own class-agnostic "object". A mask's
`stage` and `round` come from the file where it has them (our exports do), else from the
importing run; `from_file=()` makes the run's win. Annotations whose image_id names no image
of the file cannot be imported: they are counted (`CocoFile.orphans`), not guessed at.
"""
from __future__ import annotations

import json
import marshal
import os
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ijson
from pycocotools import mask as coco_mask

from .identity import image_identity_and_size
from .exports import EXPORT_ID_FIELD, export_annotation_ids, export_file_names
from .reader import iter_images
from .writer import Skipped

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
_EXTRAS = ("predicted_iou", "stability_score", "point_coords", "crop_box", "stage", "round")
_RUN_FIELDS = ("stage", "round")  # a mask's fields that the importing run sets where the file does not


# What the images list of an export takes from a row (not its masks, most of the row).
_IMAGE_COLUMNS = ("image_key", "width", "height", "uri", "image_id", "phash")


def export_coco(root: str, dest: str | Path, **pin: Any) -> int:
    """Write a version as one COCO instances JSON file (local path; missing folders are made);
    returns the image count. Each image's file_name is its path relative to the folder that
    holds them all (`export_file_names`).

    Streams: the images list is written in a first pass over the small columns, the
    annotations in a second, so memory holds one batch of rows at a time. The file appears
    under its name only when complete (written beside it, then renamed); a failed export
    leaves nothing behind.
    """
    dest = Path(dest)
    if dest.is_dir():  # refused before any work, not when the finished file cannot be renamed
        raise IsADirectoryError(f"a folder; name the JSON file to write, such as {dest / 'instances.json'}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    file_name = export_file_names(root, **pin)
    partial = dest.with_name(dest.name + ".partial")
    try:
        n = 0
        with open(partial, "w") as f:
            f.write('{"info":{"description":"samengine export"},"licenses":[],')
            f.write(f'"categories":[{json.dumps(CATEGORY)}],"images":[')
            for image in iter_images(root, columns=list(_IMAGE_COLUMNS), **pin):
                entry = {"id": image["image_key"], "width": image["width"], "height": image["height"],
                         "file_name": file_name(image["uri"]), "sha256": image["image_id"],
                         "coco_url": image["uri"], "phash": image["phash"]}
                f.write(("," if n else "") + json.dumps(entry))
                n += 1
            f.write('],"annotations":[')
            first = True
            ids = export_annotation_ids()
            for image in iter_images(root, **pin):
                for ann in image["annotations"]:
                    entry = {"id": next(ids), EXPORT_ID_FIELD: str(ann["id"]), "image_id": image["image_key"],
                             "category_id": CATEGORY["id"], "segmentation": ann["segmentation"],
                             "area": ann["area"], "bbox": ann["bbox"], "iscrowd": 0, **{k: ann[k] for k in _EXTRAS}}
                    if ann.get("text_prompt") is not None:
                        entry["text_prompt"] = ann["text_prompt"]
                    f.write(("" if first else ",") + json.dumps(entry))
                    first = False
            f.write("]}")
        os.replace(partial, dest)
    except BaseException:  # a half-written or unplaced file is no export: leave nothing behind
        partial.unlink(missing_ok=True)
        raise
    return n


@dataclass
class CocoFile:
    """A COCO instances file, parsed and checked whole by read_coco; iterating it yields
    writer-ready records, one per image (a Skipped for an image that cannot be used).

    The images list is held in memory; the annotations, most of the file, wait in a
    temporary SQLite file (under TMPDIR) keyed by image, so memory does not grow with them."""

    path: str
    images: list[dict]
    annotations: "_Annotations"
    names: dict[Any, str]  # category id -> name, except our own "object"
    images_dir: str | Path | None
    from_file: tuple[str, ...]  # of _RUN_FIELDS, those a mask takes from the file where it has them
    orphans: int  # annotations whose image_id names no image of the file: not imported

    def __iter__(self) -> Iterator[dict | Skipped]:
        for info in self.images:
            try:
                record = _coco_image(self, info)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                where = info.get("file_name", info.get("id"))
                record = Skipped(f"{self.path}#{where}", f"bad_record: {type(e).__name__}: {e}")
            yield record


class _Annotations:
    """A file's annotations by image_id, spilled to a temporary SQLite file in file order
    (marshal: the parsed JSON values, several times faster to write and read than JSON)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="samengine-coco-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "annotations.sqlite"))
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE ann (image TEXT, seq INTEGER, body BLOB)")
        self.per_image: Counter = Counter()  # annotations per image key
        self._pending: list[tuple[str, int, bytes]] = []
        self._count = 0  # rows inserted

    def add(self, ann: dict) -> None:
        key = _key(ann.get("image_id"))
        self.per_image[key] += 1
        self._pending.append((key, self._count + len(self._pending), marshal.dumps(ann)))
        if len(self._pending) >= 10_000:
            self._flush()

    def _flush(self) -> None:
        self._db.executemany("INSERT INTO ann VALUES (?, ?, ?)", self._pending)
        self._count += len(self._pending)
        self._pending = []

    def finish(self) -> None:
        self._flush()
        self._db.execute("CREATE INDEX by_image ON ann (image, seq)")
        self._db.commit()

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def get(self, image_id: Any) -> list[dict]:
        rows = self._db.execute("SELECT body FROM ann WHERE image = ? ORDER BY seq", (_key(image_id),))
        return [marshal.loads(body) for body, in rows]


def _key(image_id: Any) -> str:
    """An image_id as a key that tells apart what a dict of the parsed file would: 1 and
    "1" differ, 1 and 1.0 do not."""
    if isinstance(image_id, str):
        return "s" + image_id
    if isinstance(image_id, int) or (isinstance(image_id, float) and image_id.is_integer()):
        return "n%d" % image_id
    return "o" + repr(image_id)


def read_coco(path: str | Path, images_dir: str | Path | None = None, *,
              from_file: tuple[str, ...] = _RUN_FIELDS) -> CocoFile:
    """A COCO instances file (all categories become masks), read and checked before
    anything is written: a file that is not COCO JSON is a ValueError here.

    image_id is the image's `sha256` field when present (our exports), else the sha256 of
    images_dir / file_name. An image whose file is missing or whose annotations cannot be
    read becomes a Skipped with the reason. from_file: which of a mask's stage and round
    come from the file where it has them; the others (and those it lacks) are the
    importing run's.

    Streams (an incremental parser): memory holds the images and categories, not the
    annotations (CocoFile).
    """
    if not set(from_file) <= set(_RUN_FIELDS):
        raise ValueError(f"from_file takes {_RUN_FIELDS}, not {from_file}")
    annotations = _Annotations()
    try:
        images, categories = _parse(Path(path), annotations)
    except (ValueError, KeyError, TypeError, ijson.JSONError) as e:  # UnicodeDecodeError is a ValueError
        annotations.close()
        # The parser's own messages run over several lines (a caret under the text): the first.
        why = f"invalid JSON: {str(e).strip().splitlines()[0]}" if isinstance(e, ijson.JSONError) \
            else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: not a COCO instances JSON file ({why})") from None
    except BaseException:
        annotations.close()
        raise
    annotations.finish()
    if images_dir is None:  # the whole file needs it: refused before anything is committed
        unnamed = next((i for i in images if "sha256" not in i), None)
        if unnamed is not None:
            annotations.close()
            raise ValueError(f"{path}: image {unnamed.get('file_name')} has no sha256; pass images_dir")
    names = {c["id"]: c.get("name") for c in categories if c.get("name") != CATEGORY["name"]}
    known = {_key(info.get("id")) for info in images}
    orphans = sum(n for key, n in annotations.per_image.items() if key not in known)
    return CocoFile(str(path), images, annotations, names, images_dir, tuple(from_file), orphans)


_MISSING = object()


def _parse(path: Path, annotations: _Annotations) -> tuple[list[dict], list[dict]]:
    """The file's images and categories; its annotations go to `annotations`. Raises what
    json.loads of a non-COCO file would have led to. Objects are built by the parser's C
    backend, one incremental pass per part; the images and categories passes stop where
    their list ends (before the annotations in COCO files and our exports)."""

    def part(prefix: str, default: Any = _MISSING) -> Any:
        with open(path, "rb") as f:
            return next(ijson.items(f, prefix, use_float=True), default)

    def objects(name: str, items: Any) -> list[dict]:
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise TypeError(f"{name} must be a list of objects")
        return items

    images = part("images")
    if images is _MISSING:
        raise KeyError("images")
    images, categories = objects("images", images), objects("categories", part("categories", []))
    with open(path, "rb") as f:
        for ann in ijson.items(f, "annotations.item", use_float=True):
            if not isinstance(ann, dict):
                raise TypeError("annotations must be a list of objects")
            annotations.add(ann)
    if not annotations.per_image:  # none, or "annotations" is not a list
        objects("annotations", part("annotations", []))
    return images, categories


def _coco_image(coco: CocoFile, info: dict) -> dict | Skipped:
    """One COCO image entry as a writer record (Skipped when its file is missing)."""
    h, w = int(info["height"]), int(info["width"])
    annotations = coco.annotations.get(info.get("id"))
    record = {"width": w, "height": h, "annotations": [_mask(a, h, w, coco.names, coco.from_file) for a in annotations]}
    if "sha256" in info:
        record.update(image_id=info["sha256"], image_key=int(info["id"]),
                      uri=info.get("coco_url") or info["file_name"], phash=info.get("phash"))
        return record
    file = Path(coco.images_dir) / info["file_name"]
    if not file.is_file():
        return Skipped(str(file), "missing: no such image file")
    sha, phash, size = image_identity_and_size(file.read_bytes())
    if size is not None and size != (h, w):  # masks drawn for another size would not fit the image
        return Skipped(str(file), f"size_mismatch: the image is {size[1]}x{size[0]}, its COCO entry says {w}x{h}")
    record.update(image_id=sha, uri=str(file), phash=phash)
    return record


def _mask(ann: dict, h: int, w: int, names: dict | None = None, from_file: tuple[str, ...] = _RUN_FIELDS) -> dict:
    fault = _polygon_fault(ann["segmentation"])
    if fault:
        raise ValueError(f"annotation {ann.get('id')}: {fault}")
    rle = _to_rle(ann["segmentation"], h, w)
    if [int(s) for s in rle["size"]] != [h, w]:
        raise ValueError(f"annotation {ann.get('id')}: segmentation size {list(rle['size'])} is not the image's "
                         f"[{h}, {w}] (height, width)")
    mask = {"segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(coco_mask.area(rle)), "bbox": [int(v) for v in coco_mask.toBbox(rle)],
            "predicted_iou": ann.get("predicted_iou", ann.get("score")),
            "stability_score": ann.get("stability_score"),
            "point_coords": ann.get("point_coords") or [], "crop_box": ann.get("crop_box") or [0, 0, w, h]}
    mask.update({k: ann[k] for k in (*from_file, "text_prompt") if k in ann})
    if mask.get("text_prompt") is None and names and names.get(ann.get("category_id")):
        mask["text_prompt"] = str(names[ann["category_id"]])
    return mask


def _polygon_fault(segm: Any) -> str | None:
    """Why a polygon segmentation cannot be drawn (None when it can, or is not polygons).
    pycocotools fails on these with errors that do not name the fault (an IndexError for no
    polygon, a bare Exception, which would end the import, for an empty one), or reads a
    4-number polygon as a box."""
    if not isinstance(segm, list):
        return None
    if not segm:
        return "empty segmentation (no polygon)"
    for i, poly in enumerate(segm):
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            return f"polygon {i} is not a list of numbers"
        if len(poly) < 6 or len(poly) % 2:
            return f"polygon {i} has {len(poly)} coordinates; a polygon needs 3 or more x, y pairs"
    return None


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
    """Commit a COCO file through a DatasetWriter; returns the versions made (jobs/import_.py
    reads the file first, with read_coco, to refuse a bad one before creating anything)."""
    return writer.commit_all(read_coco(path, images_dir), chunk_images)
