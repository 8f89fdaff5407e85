"""Semi-automatic stage: pre-fill the confident masks, hand annotators only what is missing.

Pre-fill comes from the automatic generator run by the service (`EngineConfig.prefill =
"generator"`) or from the masks of a dataset version, typically an automatic run
(`dataset_prefill`). Annotators finish an image either in our page or in Label Studio:
`export_tasks` writes Label Studio tasks whose pre-annotations ("predictions") are the
pre-filled masks as brush labels, `import_tasks` brings the finished tasks back into a
dataset with stage "semi_auto".

Label Studio task JSON, as used here (one object per image):

    {"data": {"image": <url Label Studio loads>, "image_id": <sha256>, "uri": <our uri>, "width", "height"},
     "predictions": [{"model_version": ..., "score": ..., "result": [<brush result>, ...]}],
     "annotations": [{"result": [...], "was_cancelled": false, ...}]}     (in exports)

    brush result: {"id", "type": "brushlabels", "from_name", "to_name", "original_width",
                   "original_height", "image_rotation": 0,
                   "value": {"format": "rle", "rle": [bytes], "brushlabels": [label]}, "score"?}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from pycocotools import mask as coco_mask

from .labelstudio import brush_to_coco, coco_to_brush

FROM_NAME, TO_NAME, LABEL = "mask", "image", "object"

LABEL_CONFIG = f"""<View>
  <Image name="{TO_NAME}" value="$image" zoom="true"/>
  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">
    <Label value="{LABEL}" background="#ff4d4d"/>
  </BrushLabels>
</View>
"""


# -- pre-fill ------------------------------------------------------------------------------------
def confident(annotations: Iterable[dict], min_iou: float) -> list[dict]:
    """The masks worth pre-filling: predicted IoU >= min_iou, or made by a person (no
    predicted IoU)."""
    return [a for a in annotations if a.get("predicted_iou") is None or a["predicted_iou"] >= min_iou]


def dataset_prefill(root: str, *, min_iou: float, run_id: str | None = None,
                    endpoint_url: str | None = None) -> dict[str, list[dict]]:
    """image_id -> confident masks of a dataset version (its latest, or the last of run_id)."""
    from dataset import iter_images, storage_options

    images = iter_images(root, run_id=run_id, options=storage_options(root, endpoint_url))
    return {im["image_id"]: confident(im["annotations"], min_iou) for im in images}


# -- Label Studio tasks out -------------------------------------------------------------------------
def brush_result(segmentation: dict[str, Any], result_id: str, score: float | None = None) -> dict[str, Any]:
    """A Label Studio brushlabels result of one COCO RLE mask."""
    h, w = (int(s) for s in segmentation["size"])
    result = {
        "id": result_id, "type": "brushlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"format": "rle", "rle": coco_to_brush(segmentation), "brushlabels": [LABEL]},
    }
    if score is not None:
        result["score"] = float(score)
    return result


def export_tasks(images: Iterable[dict], *, model_version: str = "",
                 image_url: Callable[[str], str] = lambda uri: uri) -> list[dict]:
    """Label Studio tasks of image records (image_id, uri, width, height, annotations: the
    pre-filled masks). image_url maps our uri to what Label Studio loads (a URL, an s3://
    URI of its cloud storage, or "/data/local-files/?d=..." for local files)."""
    tasks = []
    for image in images:
        results = [brush_result(a["segmentation"], f"prefill-{i}", a.get("predicted_iou"))
                   for i, a in enumerate(image.get("annotations", ()))]
        scores = [r["score"] for r in results if "score" in r]
        task = {"data": {"image": image_url(image["uri"]), "image_id": image["image_id"], "uri": image["uri"],
                         "width": image["width"], "height": image["height"]}}
        if results:
            prediction = {"model_version": model_version, "result": results}
            if scores:
                prediction["score"] = sum(scores) / len(scores)
            task["predictions"] = [prediction]
        tasks.append(task)
    return tasks


def local_files_url(document_root: str) -> Callable[[str], str]:
    """image_url for Label Studio's local file serving (LOCAL_FILES_DOCUMENT_ROOT). An image is
    named by the path it was listed under (a symlink by its own name, which Label Studio opens
    through), or by its real path where only that lies under the root."""
    root, real_root = os.path.abspath(document_root), os.path.realpath(document_root)

    def url(uri: str) -> str:
        path = os.path.abspath(uri)
        if os.path.commonpath([root, path]) != root:
            path, base = os.path.realpath(uri), real_root
        else:
            base = root
        return f"/data/local-files/?d={Path(os.path.relpath(path, base)).as_posix()}"

    return url


def write_project(folder: str | Path, tasks: list[dict]) -> tuple[Path, Path]:
    """tasks.json (import it into a project) and label_config.xml (the project's labeling
    interface) in folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tasks_path, config_path = folder / "tasks.json", folder / "label_config.xml"
    tasks_path.write_text(json.dumps(tasks))
    config_path.write_text(LABEL_CONFIG)
    return tasks_path, config_path


# -- finished tasks back in -----------------------------------------------------------------------
def final_annotation(task: dict) -> dict | None:
    """The annotation of a task that counts: a ground-truth one if any, else the last one
    not cancelled; None when the task was not finished."""
    done = [a for a in task.get("annotations") or () if not a.get("was_cancelled")]
    if not done:
        return None
    truth = [a for a in done if a.get("ground_truth")]
    return (truth or done)[-1]


def task_to_record(task: dict) -> dict | None:
    """A generator-style image record (no ids, stage, round, phash) of a finished task, or
    None if it was not finished. A pre-filled mask the annotator kept unchanged (same result
    id and same RLE as the task's prediction) keeps its predicted IoU; masks added or
    edited by the annotator have none. Results other than brush labels are refused."""
    annotation = final_annotation(task)
    if annotation is None:
        return None
    predicted = {r["id"]: r for p in task.get("predictions") or () for r in p.get("result", ())}
    data = task["data"]
    size = None
    masks = []
    for result in annotation.get("result", ()):
        if result.get("type") != "brushlabels" or result["value"].get("format") != "rle":
            raise ValueError(f"task {data.get('uri')}: result type {result.get('type')!r} is not an RLE brush mask")
        if result.get("image_rotation", 0):
            raise ValueError(f"task {data.get('uri')}: rotated results are not supported")
        h, w = int(result["original_height"]), int(result["original_width"])
        if size not in (None, (h, w)):
            raise ValueError(f"task {data.get('uri')}: results disagree on the image size")
        size = (h, w)
        rle = brush_to_coco(result["value"]["rle"], h, w)
        encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        kept = predicted.get(result.get("id"))
        # Compared as masks: Label Studio's front end may re-encode a mask it did not change.
        unchanged = kept is not None and brush_to_coco(kept["value"]["rle"], h, w) == rle
        masks.append({
            "segmentation": rle,
            "area": int(coco_mask.area(encoded)),
            "bbox": [int(v) for v in coco_mask.toBbox(encoded)],
            "predicted_iou": kept.get("score") if unchanged else None,
            "point_coords": [],
            "stability_score": None,
            "crop_box": [0, 0, w, h],
        })
    if size is None:
        size = (data.get("height"), data.get("width"))
        if None in size:
            raise ValueError(f"task {data.get('uri')}: no masks and no image size in its data")
    return {"image_id": data["image_id"], "uri": data["uri"], "width": size[1], "height": size[0],
            "annotations": masks}


def import_tasks(tasks: Iterable[dict], root: str, lineage, **writer_options) -> dict[str, Any]:
    """Commit the finished tasks into the dataset at root (lineage.stage: "semi_auto") in one
    commit; returns {"version", "images", "masks", "unfinished"}."""
    from dataset import DatasetWriter

    records, unfinished = [], 0
    for task in tasks:
        record = task_to_record(task)
        if record is None:
            unfinished += 1
        else:
            records.append(record)
    writer = DatasetWriter(root, lineage, **writer_options)
    writer.start_run()
    version = writer.commit_images(records) if records else None
    return {"version": version, "images": len(records), "masks": sum(len(r["annotations"]) for r in records),
            "unfinished": unfinished}
