"""Automatic annotation: images in (folder, glob, manifest or s3:// prefix), a Delta Lake
dataset of COCO RLE masks out, on Ray Data.

    python jobs/auto_annotate.py          # bundled photos and checkpoint -> out/auto_annotate
    python jobs/auto_annotate.py --input s3://bucket/images --output s3://bucket/dataset \\
        --checkpoint sam_vit_h_4b8939.pth --model-type vit_h
    ray job submit --working-dir . -- python jobs/auto_annotate.py --input ... --output ...
    python jobs/auto_annotate.py --text "red ellipse" --text "blue star"   # text prompts

Without a cluster it starts an embedded local Ray. Under `ray job submit --working-dir`
the job runs in Ray's temporary copy of that folder: a relative --input or --output, or
the default output, would lie in the copy, so give absolute paths on shared storage or
s3:// URIs (the bundled sample images, the default input, are read from the copy; their
stored URIs then name files of the copy). Rerunning the same command on the same
output resumes: inputs already committed are skipped. Settings come from --config (YAML or
JSON of schemas.annotate.AnnotateConfig) and flags; a flag wins over the file. The
generator's flags are those of the official scripts/amg.py; generator settings that
neither gives come from the checkpoint's recommendation where it has one (ours do:
jobs/calibrate_checkpoint.py), else from the official defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from amg.params import AmgParams  # noqa: E402
from schemas.annotate import AnnotateConfig  # noqa: E402
from schemas.settings_file import (  # noqa: E402
    SETTINGS_ERRORS, read_settings_file, settings_error_message, update_section,
)

# Official scripts/amg.py flags that set generator parameters (same names, same meaning).
AMG_FLAGS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
             "crop_n_points_downscale_factor", "min_mask_region_area")
TOP_FLAGS = ("input", "output", "checkpoint", "model_type", "device", "precision", "encoder_precision",
             "embedding_dtype", "endpoint_url",
             "near_duplicate_distance", "chunk_images", "writers", "read_batch_size", "round", "run_id", "ray_address")


# Shown for defaults whose value reads badly in --help.
DEFAULT_TEXT = {"crop_overlap_ratio": "512/1500, about 0.341"}


def _pool(text: str) -> dict:
    """'N', 'MIN,MAX', 'auto' or 'MIN,auto' -> ActorPool bounds (argparse names the option in its
    error)."""
    parts = text.split(",")
    try:
        bounds = [p.strip() if p.strip() == "auto" else int(p) for p in parts]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or bounds[0] == "auto" and len(bounds) == 2:
        raise argparse.ArgumentTypeError(f"expected N, MIN,MAX, auto or MIN,auto (whole numbers), got {text!r}")
    if bounds == ["auto"]:
        return {"max": "auto"}
    return {"min": bounds[0], "max": bounds[-1]}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    fields = AnnotateConfig.model_fields
    ap.add_argument("--config", help="YAML or JSON file of the run's settings")
    for name in TOP_FLAGS:
        flags = ["--" + name.replace("_", "-")]
        if name == "ray_address":
            flags.append("--address")  # the spelling of data_engine.py and annotate_service.py
        text = fields[name].description or ""
        if "default" not in text:  # descriptions that say their default themselves
            text += f" (default: {fields[name].get_default(call_default_factory=False)})"
        ap.add_argument(*flags, dest=name, help=text.strip())
    ap.add_argument("--text", action="append", help="a phrase that prompts every image instead of the point grid "
                    "(repeatable: one mask per phrase, recorded as text_prompt); default checkpoint: the bundled "
                    "text one")
    ap.add_argument("--convert-to-rle", action="store_true", help="accepted for compatibility: masks are always RLE")
    ap.add_argument("--fuse-stages", dest="fuse_stages", action="store_true", help="encode+decode+post-process in one actor")
    ap.add_argument("--split-stages", dest="fuse_stages", action="store_false", help="separate encoder/decoder pools")
    ap.add_argument("--encoder-actors", type=_pool, help="N, MIN,MAX or MIN,auto encoder (or fused) actors "
                    "(default: 1,auto: up to as many as the cluster's nodes hold)")
    ap.add_argument("--decoder-actors", type=_pool, help="N, MIN,MAX or MIN,auto decoder actors (split stages; "
                    "default 1,auto)")
    ap.add_argument("--gpus-per-actor", type=float, help="GPUs per encoder/decoder actor (default 1 on CUDA)")
    ap.add_argument("--cpus-per-actor", type=float, help="CPUs (and torch threads) per encoder/decoder actor")
    ap.add_argument("--actor-memory-gb", type=float, help="memory (GiB) each encoder/decoder actor reserves "
                    "with Ray (default: estimated from the model; 0: none)")
    ap.add_argument("--encoder-batch-size", type=int, help="images per encoder (or fused) call")
    amg_fields = AmgParams.model_fields
    for name in AMG_FLAGS:
        default = DEFAULT_TEXT.get(name, amg_fields[name].default)
        if name in ("pred_iou_thresh", "stability_score_thresh"):
            default = f"the checkpoint's recommendation, else {default}"
        ap.add_argument("--" + name.replace("_", "-"), help=f"{amg_fields[name].description or ''} "
                        f"(default: {default})")
    return ap


def load_config(argv=None) -> AnnotateConfig:
    """Settings file, then flags on top; raises ValidationError naming a bad field, or
    SettingsFileError."""
    args = vars(parser().parse_args(argv))
    data: dict = {}
    if "config" in args:
        data = read_settings_file(args.pop("config"))
    args.pop("convert_to_rle", None)
    update_section(data, "amg", {k: args.pop(k) for k in AMG_FLAGS if k in args})
    for pool_name, flag in (("encoder", "encoder_actors"), ("decoder", "decoder_actors")):
        pool = dict(args.get(flag, {}))
        for key, src in (("num_gpus", "gpus_per_actor"), ("num_cpus", "cpus_per_actor"),
                         ("memory_gb", "actor_memory_gb")):
            if src in args:
                pool[key] = args[src]
        if pool_name == "encoder" and "encoder_batch_size" in args:
            pool["batch_size"] = args["encoder_batch_size"]
        update_section(data, pool_name, pool)
    for k in ("encoder_actors", "decoder_actors", "gpus_per_actor", "cpus_per_actor", "actor_memory_gb",
              "encoder_batch_size"):
        args.pop(k, None)
    data.update(args)
    return AnnotateConfig.model_validate(data)


def job_copy_paths(config: AnnotateConfig) -> dict[str, str]:
    """The run's local paths that must not lie in a submitted job's working dir copy
    (pipeline.cluster.refuse_job_copy_paths), by flag: the output, given or default, and a
    given input. The default input, the bundled sample images, may be read from the copy
    (a smoke test of a cluster); main says that their URIs name the copy."""
    given = config.model_fields_set
    paths = {"--output" if "output" in given else "the default --output": config.output}
    if "input" in given:
        paths["--input"] = config.input
    return paths


def main(argv=None) -> int:
    try:
        config = load_config(argv)
    except SETTINGS_ERRORS as e:
        print(settings_error_message(e), file=sys.stderr)
        return 2
    from pipeline.cluster import check_device, connect, job_working_dir_copy, refuse_job_copy_paths
    from pipeline.graph import run
    from pipeline.lease import check_free
    from pipeline.sources import InputError, check_output

    try:
        refuse_job_copy_paths(job_copy_paths(config).items(), ROOT)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "input" not in config.model_fields_set and job_working_dir_copy(ROOT):  # the samples lie under ROOT
        print(f"note: reading the bundled sample images from Ray's temporary copy of the working dir; the "
              f"dataset's URIs name {config.input}, which Ray deletes later", file=sys.stderr, flush=True)
    print(f"output: {config.output}", flush=True)
    try:
        # Before starting Ray (run checks both again): a run bound to be refused is refused at once.
        check_output(config.output, config.endpoint_url)
        check_free(config.output, config.endpoint_url)
        check_device(config.device, connect(config.ray_address))
        summary = run(config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Committed inputs stay committed (exactly-once): the same command picks up the rest.
        print(f"interrupted: what was committed to {config.output} is kept; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
