"""Train the image side of the "minilm-crops" text embedder: a small crop encoder whose
vectors land on MiniLM's embeddings of the objects' names (model/crop_embedder.py,
training/crop_embedder.py). With it, `jobs/train_text.py --image-side` trains the text
input on mask crops alone, as the paper does with CLIP.

    python jobs/train_crop_embedder.py            # -> checkpoints/crop_embedder_minilm.pt
    python jobs/train_crop_embedder.py --scenes 500 --steps 300 --output /tmp/crops.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.checkpoint import CheckpointError, check_checkpoint_path, save_file  # noqa: E402
from jobs.arg_types import positive  # noqa: E402
from model.crop_embedder import DEFAULT_WEIGHTS, MiniLMCropEmbedder  # noqa: E402
from model.text import load_embedder  # noqa: E402
from training.crop_embedder import (  # noqa: E402
    CropTrainConfig, crop_accuracy, name_vocabulary, scene_crops, train_crop_encoder,
)
from dataset.lineage import code_version  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402
from training.text import scene_stream  # noqa: E402

TRAIN_SEED = 0  # the synthetic training stream of the other jobs
EVAL_SEED = 1_000_003  # their held-out stream
SCENE_SIZE = 256


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(DEFAULT_WEIGHTS), help="weights file to write, local or s3://")
    ap.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    ap.add_argument("--scenes", type=positive, default=2000, help="training scenes (stream seed 0)")
    ap.add_argument("--steps", type=positive, default=CropTrainConfig.steps)
    ap.add_argument("--batch", type=positive, default=CropTrainConfig.batch)
    ap.add_argument("--width", type=positive, default=CropTrainConfig.width)
    ap.add_argument("--eval-scenes", type=positive, default=200)
    ap.add_argument("--log-every", type=positive, default=250)
    args = ap.parse_args(argv)
    try:  # ray job submit --working-dir: the default output lies in Ray's temporary copy
        refuse_job_copy_paths([("--output" if args.output != str(DEFAULT_WEIGHTS) else "the default --output",
                                args.output)], ROOT)
        check_checkpoint_path(args.output)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    text = load_embedder("minilm")
    vocabulary = name_vocabulary()
    vectors = torch.as_tensor(text.embed(vocabulary))
    crops, names = scene_crops(scene_stream(TRAIN_SEED, args.scenes, SCENE_SIZE))
    print(f"{len(names)} crops from {args.scenes} scenes, {len(vocabulary)} names", flush=True)
    cfg = CropTrainConfig(steps=args.steps, batch=args.batch, width=args.width)

    def log(row):
        if row["step"] % args.log_every == 0 or row["step"] == cfg.steps:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    encoder, history = train_crop_encoder(crops, names, vectors, vocabulary, cfg, log)
    seconds = time.perf_counter() - start
    held_crops, held_names = scene_crops(scene_stream(EVAL_SEED, args.eval_scenes, SCENE_SIZE))
    with torch.inference_mode():
        embed = lambda c: encoder(torch.from_numpy(c).permute(0, 3, 1, 2)).numpy()  # noqa: E731
        metrics = crop_accuracy(embed, held_crops, held_names, vectors.numpy(), vocabulary)
    meta = {"command": "python jobs/train_crop_embedder.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": vars(args), "train_seed": TRAIN_SEED, "eval_seed": EVAL_SEED, "crops": len(names),
            "train_seconds": round(seconds, 1), "held_out_accuracy": metrics, "final": history[-1],
            "code_version": code_version()}
    digest = save_file({"width": args.width, "model": encoder.state_dict(), "meta": meta}, args.output,
                       args.endpoint_url)
    from model.checkpoint import local_checkpoint

    MiniLMCropEmbedder(local_checkpoint(args.output, args.endpoint_url))  # it loads as the registered embedder does
    print(json.dumps({"output": args.output, "sha256": digest, "train_seconds": round(seconds, 1), **metrics},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
