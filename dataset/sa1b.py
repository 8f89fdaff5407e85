"""SA-1B per-image JSON: export a version, import SA-1B itself (folders or tar shards).

An SA-1B file is {"image": {image_id, width, height, file_name}, "annotations": [{id,
segmentation {size, counts}, area, bbox, predicted_iou, point_coords, stability_score,
crop_box}]} with integer ids. Exports write that layout, one `<image_key>.json` per
image, plus `image_keys.parquet` mapping each integer image_id back to our sha256 image_id,
uri and phash: the stored table that lets a re-import restore every id. Annotation ids are
1, 2, 3, ... in export order, each with our stored id beside it as the string
`samengine_id` (`exports.export_annotation_ids`: stored ids are above 2**53). Stage and
round are not part of SA-1B; an import takes them from the importing run's lineage.
Width, height and masks are those of the image after its EXIF orientation is applied.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .identity import image_identity
from .exports import EXPORT_ID_FIELD, export_annotation_ids, export_file_names, replacing_folder
from .reader import iter_images
from .writer import Skipped

KEY_TABLE = "image_keys.parquet"
KEY_SCHEMA = pa.schema([("image_key", pa.int64()), ("image_id", pa.string()), ("uri", pa.string()),
                        ("phash", pa.string())])
_IMAGE_FIELDS = ("image_id", "width", "height", "file_name")
_LAYOUT = ('per-image JSON files such as sa_1.json, each {"image": {image_id, width, height, file_name}, '
           '"annotations": [...]}')
_MASK_FIELDS = ("id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                "crop_box")


def to_sa1b(image: dict, file_name: str, ids: Iterator[int]) -> dict:
    """One of our image rows -> its SA-1B JSON document; its masks take the next export ids."""
    return {
        "image": {"image_id": image["image_key"], "width": image["width"], "height": image["height"],
                  "file_name": file_name},
        "annotations": [{**{k: ann[k] for k in _MASK_FIELDS}, "id": next(ids), EXPORT_ID_FIELD: str(ann["id"])}
                        for ann in image["annotations"]],
    }


def export_sa1b(root: str, dest: str | Path, **pin: Any) -> int:
    """Write a version as SA-1B JSON files under dest (a local folder); returns the image count.

    JSON files are named by image_key, unique in a version, where SA-1B names them after the
    image: images with the same base name in different folders must not share one. Each
    file_name is the image's path relative to the folder that holds them all
    (`export_file_names`). dest is replaced whole (`replacing_folder`), so that it holds
    this export and no JSON file of an earlier one.
    """
    keys: list[dict] = []
    with replacing_folder(dest, _is_sa1b_export) as new:
        file_name = export_file_names(root, **pin)
        ids = export_annotation_ids()
        for image in iter_images(root, **pin):
            doc = to_sa1b(image, file_name(image["uri"]), ids)
            (new / f"{image['image_key']}.json").write_text(json.dumps(doc, separators=(",", ":")))
            keys.append({k: image[k] for k in KEY_SCHEMA.names})
        pq.write_table(pa.Table.from_pylist(keys, schema=KEY_SCHEMA), new / KEY_TABLE, compression="zstd")
    return len(keys)


def _is_sa1b_export(path: Path) -> bool:
    """Whether path is one of the files export_sa1b writes."""
    return path.is_file() and (path.name == KEY_TABLE or re.fullmatch(r"\d+\.json", path.name) is not None)


def from_sa1b(doc: dict, image_id: str, uri: str, phash: str | None, image_key: int | None = None) -> dict:
    """An SA-1B document -> a writer-ready image record. Annotation ids are dropped: the writer
    derives them from the image key (for our own exports that gives back the same ids)."""
    info = doc["image"]
    annotations = []
    for ann in doc["annotations"]:
        seg = ann["segmentation"]
        annotations.append({
            "segmentation": {"size": [int(s) for s in seg["size"]], "counts": seg["counts"]},
            "area": int(ann["area"]), "bbox": [int(round(v)) for v in ann["bbox"]],
            "predicted_iou": ann.get("predicted_iou"), "point_coords": ann.get("point_coords") or [],
            "stability_score": ann.get("stability_score"),
            "crop_box": [int(round(v)) for v in ann.get("crop_box") or (0, 0, info["width"], info["height"])],
        })
    record = {"image_id": image_id, "uri": uri, "width": int(info["width"]), "height": int(info["height"]),
              "phash": phash, "annotations": annotations}
    if image_key is not None:
        record["image_key"] = image_key
    return record


def read_sa1b(source: str | Path) -> Iterator[dict | Skipped]:
    """Writer-ready records from an SA-1B folder or tar shard.

    The sha256 image_id comes from `image_keys.parquet` when the folder has one (our exports),
    otherwise from the image file named by file_name, which must then sit beside the JSON.
    A record that cannot be read (bad JSON, a missing image) yields a Skipped with the
    reason. A source that is not SA-1B (neither a folder nor a tar file, or without one
    SA-1B JSON document) is a ValueError here, when called, so that an importer refuses it
    before writing anything; the records are read as they are iterated.
    """
    source = Path(source)
    problem = _format_problem(source)
    if problem:
        raise ValueError(f"{source}: not an SA-1B folder or tar shard: expected {_LAYOUT}; {problem}")
    return _read_tar(source) if source.is_file() else _read_folder(source)


def _format_problem(source: Path) -> str | None:
    """What makes source no SA-1B source (None when one of its JSON files is an SA-1B
    document). Reads up to the first such file: in an SA-1B folder or shard, the first."""
    if source.is_file() and tarfile.is_tarfile(source):
        documents = _tar_json(source)
    elif source.is_dir():
        documents = (_read_or_empty(p) for p in sorted(source.glob("*.json")))
    else:
        return "it is a file that is not a tar archive"
    seen = 0
    try:
        for data in documents:
            seen += 1
            if _is_sa1b(data):
                return None
    except tarfile.TarError as e:
        return f"its tar archive cannot be read ({e})"
    return f"none of its {seen} JSON files is one" if seen else "it has no .json file"


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # unreadable, or a folder named *.json: not a document (read_sa1b quarantines it)
        return b""


def _is_sa1b(data: bytes) -> bool:
    try:
        doc = json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    image = doc.get("image") if isinstance(doc, dict) else None
    return isinstance(image, dict) and set(_IMAGE_FIELDS) <= image.keys() and isinstance(doc.get("annotations"), list)


def _tar_json(path: Path) -> Iterator[bytes]:
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield tar.extractfile(member).read()


def _read_folder(source: Path) -> Iterator[dict | Skipped]:
    keys = _key_table(source / KEY_TABLE)
    for path in sorted(source.glob("*.json")):
        try:
            record = _folder_record(path, keys)
        except (OSError, ValueError, KeyError, TypeError) as e:
            record = Skipped(str(path), f"bad_record: {type(e).__name__}: {e}")
        yield record


def _folder_record(path: Path, keys: dict[int, dict]) -> dict | Skipped:
    doc = json.loads(path.read_bytes())
    known = keys.get(doc["image"]["image_id"])
    if known is not None:
        return from_sa1b(doc, known["image_id"], known["uri"], known["phash"], known["image_key"])
    image_path = path.parent / doc["image"]["file_name"]
    if not image_path.is_file():
        return Skipped(str(path), f"missing: image {image_path.name} not found and no {KEY_TABLE} entry")
    sha, phash = image_identity(image_path.read_bytes())
    return from_sa1b(doc, sha, str(image_path), phash)


def _read_tar(path: Path) -> Iterator[dict | Skipped]:
    """SA-1B shards hold sa_N.jpg next to sa_N.json; pair them as they stream by."""
    images: dict[str, bytes] = {}
    docs: dict[str, dict] = {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            data = tar.extractfile(member).read()
            if name.endswith(".json"):
                try:
                    doc = json.loads(data)
                    docs[doc["image"]["file_name"]] = doc
                except (ValueError, KeyError, TypeError) as e:
                    yield Skipped(f"{path}#{name}", f"bad_record: {type(e).__name__}: {e}")
            else:
                images[name] = data
            for file_name in [f for f in docs if f in images]:
                sha, phash = image_identity(images.pop(file_name))
                try:
                    record = from_sa1b(docs.pop(file_name), sha, f"{path}#{file_name}", phash)
                except (ValueError, KeyError, TypeError) as e:
                    record = Skipped(f"{path}#{file_name}", f"bad_record: {type(e).__name__}: {e}")
                yield record
    for file_name in sorted(docs):
        yield Skipped(f"{path}#{file_name}", "missing: the shard has no image for this record")


def _key_table(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    return {row["image_key"]: row for row in pq.read_table(path).to_pylist()}


def read_sa1b_sources(sources: Iterable[str | Path]) -> Iterator[dict | Skipped]:
    """The records of several SA-1B folders / tar shards, every source checked (read_sa1b's
    ValueError) when this is called, before any record is read or anything is written."""
    return itertools.chain.from_iterable([read_sa1b(s) for s in sources])


def import_sa1b(sources: Iterable[str | Path], writer, chunk_images: int = 1000) -> list[int]:
    """Commit SA-1B folders / tar shards through a DatasetWriter; returns the versions made."""
    return writer.commit_all(read_sa1b_sources(sources), chunk_images)
