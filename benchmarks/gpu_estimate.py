"""GPU throughput ESTIMATES for the encode and decode_prompts stages, from FLOP counts of
our own model configs and datasheet peaks, written in the results format jobs/plan.py
reads (schemas/throughput.py) with source "estimate". Replace them with measured files
(`benchmarks/amg.py --device cuda --results-json ...`) when a GPU machine is at hand.

    python benchmarks/gpu_estimate.py                       # vit_h, 32x32 points, H100/A100/L4
    python benchmarks/gpu_estimate.py --model-type vit_b --gpus H100 --out-dir /tmp

FLOPs are counted by torch.utils.flop_counter on the meta device (no weights, no compute):
matmuls, convolutions and attention only; elementwise work, mask upsampling to full size
and the filters are not counted, which is what the assumed utilisation has to absorb.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Sam, get_config  # noqa: E402
from schemas.throughput import FORMAT, ThroughputResults, write_results  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA datasheets, FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
# Assumed fraction of that peak reached: large ViT matmuls vs small decoder batches.
ENCODER_UTILISATION = 0.35
DECODER_UTILISATION = 0.15


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(model_type: str, points_per_side: int, points_per_batch: int) -> dict[str, float]:
    """FLOPs per image (one crop) of the image encoder and of the grid-prompt decoder,
    with masks computed for every multimask token (no token filtered by predicted IoU)."""
    config = get_config(model_type)
    with torch.device("meta"):
        model = Sam(config).eval()
        e = config.embedding_size
        image = torch.empty(1, 3, config.image_size, config.image_size)
        embedding = torch.empty(1, config.prompt_embed_dim, e, e)
        coords = torch.empty(points_per_batch, 1, 2)
        labels = torch.ones(points_per_batch, 1, dtype=torch.int64)

    def decode_batch():
        sparse, dense = model.prompt_encoder((coords, labels), None, None)
        decoder = model.mask_decoder
        tokens, img, _ = decoder.attend(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
        decoder.masks_from(tokens[:, 1:], img, torch.arange(1, decoder.num_mask_tokens))

    with torch.inference_mode():
        encode = count_flops(lambda: model.image_encoder(image))
        batch = count_flops(decode_batch)
    return {"encode": encode, "decode_prompts": batch * points_per_side**2 / points_per_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="vit_h")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--gpus", nargs="+", default=["H100", "A100", "L4"], choices=sorted(PEAK_BF16))
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    flops = model_flops(args.model_type, args.points_per_side, args.points_per_batch)
    utilisation = {"encode": ENCODER_UTILISATION, "decode_prompts": DECODER_UTILISATION}
    print(f"{args.model_type}, {args.points_per_side}x{args.points_per_side} points, one crop: "
          f"encode {flops['encode'] / 1e12:.3f} TFLOP, decode_prompts {flops['decode_prompts'] / 1e12:.3f} TFLOP "
          f"per image ({flops['decode_prompts'] / args.points_per_side**2 / 1e9:.2f} GFLOP per prompt)")
    for gpu in args.gpus:
        stages = [{"stage": s, "items_per_s": PEAK_BF16[gpu] * utilisation[s] / flops[s],
                   "resources": {"CPU": 1, "GPU": 1}} for s in ("encode", "decode_prompts")]
        results = ThroughputResults(
            format=FORMAT, name=f"{gpu}-estimate", device=gpu, source="estimate",
            machine=f"{gpu} (not run: datasheet bf16 peak {PEAK_BF16[gpu] / 1e12:.0f} TFLOP/s)",
            config={"model_type": args.model_type, "points_per_side": args.points_per_side,
                    "points_per_batch": args.points_per_batch, "crop_n_layers": 0, "precision": "bf16",
                    "encode_flop_per_image": flops["encode"], "decode_flop_per_image": flops["decode_prompts"]},
            notes=(f"ESTIMATE from FLOP counts (benchmarks/gpu_estimate.py), not measured: images/s = peak x "
                   f"assumed utilisation ({ENCODER_UTILISATION} encoder, {DECODER_UTILISATION} decoder) / FLOP "
                   f"per image. Masks of all 3 tokens of every prompt counted; upsampling to full size, "
                   f"filters and host work not counted."),
            stages=stages)
        path = Path(args.out_dir) / f"{gpu}-estimate.json"
        write_results(path, results)
        print(f"  {gpu}: encode {stages[0]['items_per_s']:.1f} img/s, decode_prompts "
              f"{stages[1]['items_per_s']:.1f} img/s per GPU -> {path}")


if __name__ == "__main__":
    main()
