"""Give a checkpoint a text prompt input: fit its grounding head on named synthetic objects,
then measure text-prompted mIoU on held-out scenes against baselines that ignore the text.

    python jobs/train_text.py                      # bundled checkpoint -> checkpoints/samengine_tiny256_text.pt
    python jobs/train_text.py --init-checkpoint my.pt --output my_text.pt --steps 4000
    python jobs/train_text.py --init-checkpoint s3://models/my.pt --output s3://models/my_text.pt \
        --endpoint-url http://minio:9000
    python jobs/train_text.py --dataset out/coco_import/annotations   # plus masks with text_prompt
    python jobs/train_text.py --dataset out/coco_import/annotations --captions captions_train2017.json
    python jobs/train_text.py --embedder minilm-crops --image-side   # trained on unnamed mask crops

--image-side (the paper's recipe) prompts each training mask with the embedder's vector of
its crop instead of a phrase: names are not needed, every mask of the scenes and of --dataset
tables trains it; held-out evaluation then prompts with words, as a user does.

Only the grounding head learns (model/text_grounding.py, training/text.py): the image
encoder, prompt encoder and decoder keep the input checkpoint's weights, so clicks give the
same masks as before. Embeddings of the training scenes are computed once. The text
embedder is recorded in the checkpoint, so `SamPredictor.predict(text=...)` and
`jobs/auto_annotate.py --text` find it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import CheckpointError, Sam, load_checkpoint, save_checkpoint  # noqa: E402
from jobs.arg_types import amount, count, positive  # noqa: E402
from model.checkpoint import check_checkpoint_path  # noqa: E402
from model.checkpoint import file_sha256  # noqa: E402
from model.crop_embedder import ImageTextEmbedder  # noqa: E402
from model.text import load_embedder  # noqa: E402
from schemas.annotate import DEFAULT_CHECKPOINT, DEFAULT_TEXT_CHECKPOINT  # noqa: E402
from dataset.lineage import code_version  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402
from training.text import (  # noqa: E402
    TextTrainConfig, dataset_items, mask_items, prepare_examples, read_captions, scene_stream, synthetic_items,
    text_miou, train_text,
)

TRAIN_SEED = 0  # the bundled checkpoint's training stream: no new images are seen
EVAL_SEED = 1_000_003  # the held-out stream of jobs/train.py


def with_text_input(model: Sam, embedder: str, dim: int) -> Sam:
    """A copy of model with a (freshly initialized) grounding head for dim-wide text embeddings."""
    config = model.config.model_copy(update={"text_embed_dim": dim, "text_embedder": embedder})
    torch.manual_seed(0)
    out = Sam(config)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("text_grounding.") for k in missing):
        raise ValueError(f"weights do not carry over: missing {missing}, unexpected {unexpected}")
    return out


def _examples(model: Sam, args: argparse.Namespace, init_sha256: str, image_embedder=None):
    """The training examples, from --examples-cache when it matches this run."""
    key = {"checkpoint": init_sha256, "scenes": args.scenes, "seed": TRAIN_SEED,
           "datasets": args.dataset, "captions": args.captions, "image_side": args.embedder if args.image_side else None}
    if args.examples_cache and Path(args.examples_cache).exists():
        cached = torch.load(args.examples_cache, weights_only=False)
        if cached.get("key") == key:
            return cached["data"]
    captions: dict[str, list[str]] = {}
    for path in args.captions:
        for name, sentences in read_captions(path).items():
            captions.setdefault(name, []).extend(sentences)
    scenes = scene_stream(TRAIN_SEED, args.scenes, model.image_size)
    items = itertools.chain(mask_items(scenes) if args.image_side else synthetic_items(scenes),
                            dataset_items(args.dataset, args.endpoint_url, unnamed=args.image_side,
                                          captions=captions) if args.dataset else ())
    data = prepare_examples(model, items, image_embedder=image_embedder)
    if args.examples_cache:
        torch.save({"key": key, "data": data}, args.examples_cache)
    return data


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-checkpoint", default=DEFAULT_CHECKPOINT, help="starting checkpoint, local or s3://")
    ap.add_argument("--output", default=DEFAULT_TEXT_CHECKPOINT, help="checkpoint file to write, local or s3://")
    ap.add_argument("--embedder", default="minilm", help="model.text.load_embedder name or module:factory")
    ap.add_argument("--scenes", type=count, default=3000, help="training scenes (stream seed 0); 0: none")
    ap.add_argument("--dataset", action="append", default=[],
                    help="annotations table (Delta or Parquet, local or s3://) whose masks' text_prompt names "
                         "them (repeatable)")
    ap.add_argument("--captions", action="append", default=[],
                    help="COCO captions file for the --dataset images (matched by file name): a caption naming "
                         "exactly one of an image's phrases trains as one more phrase for it (repeatable)")
    ap.add_argument("--image-side", action="store_true",
                    help="train on the embedder's vectors of mask crops, not on names (needs an embedder with "
                         "embed_images, e.g. minilm-crops)")
    ap.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of the s3:// --init-checkpoint, "
                    "--dataset and --output (default: AWS_ENDPOINT_URL)")
    ap.add_argument("--steps", type=positive, default=TextTrainConfig.steps)
    ap.add_argument("--batch-scenes", type=positive, default=TextTrainConfig.scenes, help="scenes per step")
    ap.add_argument("--lr", type=amount, default=TextTrainConfig.lr)
    ap.add_argument("--seed", type=count, default=0)
    ap.add_argument("--eval-scenes", type=positive, default=200)
    ap.add_argument("--torch-threads", type=count, default=0, help="0: torch's default")
    ap.add_argument("--log-every", type=positive, default=250)
    ap.add_argument("--examples-cache", help="file keeping the training scenes' embeddings between runs "
                                             "(reused when it holds the same checkpoint and scene count)")
    return ap.parse_args(argv)


def job_copy_paths(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The local paths that must not lie in a submitted job's working dir copy
    (pipeline.cluster.refuse_job_copy_paths), by flag: what it writes, the output (given or
    default, which lies under the code) and the examples cache, and the tables and captions
    it reads, which the checkpoint's record names. The starting checkpoint, the bundled one
    by default, may be read from the copy: its sha256 is recorded."""
    output = "--output" if args.output != DEFAULT_TEXT_CHECKPOINT else "the default --output"
    return [(output, args.output), ("--examples-cache", args.examples_cache),
            *(("--dataset", path) for path in args.dataset), *(("--captions", path) for path in args.captions)]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        refuse_job_copy_paths(job_copy_paths(args), ROOT)
        check_checkpoint_path(args.output)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    from model.checkpoint import checkpoint_problem, local_checkpoint

    try:  # before the embedder loads: a bad checkpoint is refused at once
        init_path = local_checkpoint(args.init_checkpoint, args.endpoint_url)
        base, _ = load_checkpoint(init_path)
    except CheckpointError as e:
        print(f"error: {checkpoint_problem(args.init_checkpoint, e)}", file=sys.stderr)
        return 2
    embedder = load_embedder(args.embedder)
    size = base.image_size
    if base.config.text_embed_dim:
        if base.config.text_embed_dim != embedder.dim:
            raise SystemExit(f"{args.init_checkpoint} has a {base.config.text_embed_dim}-d text input; "
                             f"{args.embedder} gives {embedder.dim}-d")
        model = base
    else:
        model = with_text_input(base, args.embedder, embedder.dim)
    if args.image_side and not isinstance(embedder, ImageTextEmbedder):
        raise SystemExit(f"--image-side needs an embedder with an image side (embed_images); {args.embedder} has none")
    init_sha256 = file_sha256(init_path)
    data = _examples(model, args, init_sha256, embedder if args.image_side else None)
    prepared = time.perf_counter() - start
    print(f"{len(data.cells)} targets in {len(data.embeddings)} images ({prepared:.0f} s)", flush=True)

    cfg = TextTrainConfig(steps=args.steps, scenes=args.batch_scenes, lr=args.lr, seed=args.seed)

    def log(row):
        if row["step"] % args.log_every == 0 or row["step"] == cfg.steps:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    def embed(texts):
        return torch.as_tensor(embedder.embed(texts))

    history = train_text(model, data, embed, cfg, log)
    train_seconds = time.perf_counter() - start
    metrics = text_miou(model, embedder, scene_stream(EVAL_SEED, args.eval_scenes, size))
    metrics |= {"eval_seed": EVAL_SEED, "eval_scenes": args.eval_scenes}
    meta = {
        "text_training": vars(args) | {"train_seed": TRAIN_SEED, "instances": len(data.cells)},
        "init_checkpoint_sha256": init_sha256,
        "command": "python jobs/train_text.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_seconds": round(train_seconds, 1),
        "text_metrics": metrics,
        "final_loss": history[-1] if history else None,
        "code_version": code_version(),
    }
    digest = save_checkpoint(model, args.output, meta, args.endpoint_url)
    print(json.dumps({"output": args.output, "sha256": digest, "train_seconds": round(train_seconds, 1),
                      **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
