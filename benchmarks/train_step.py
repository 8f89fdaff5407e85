"""Seconds per training step (data + forward + backward + AdamW), fp32 and bf16 autocast,
without Ray.

    python benchmarks/train_step.py [--model-type vit_tiny256] [--size 256] [--images 4]
        [--masks 8] [--iterations 4] [--steps 6] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.interactive import SimulatedInteraction  # noqa: E402
from training.loop import SyntheticSource, TrainConfig, initial_model, make_optimizer, step_batch  # noqa: E402


def time_steps(cfg: TrainConfig, steps: int) -> dict[str, float]:
    """Mean seconds of the data part and of the whole step, after one warm-up step."""
    model = initial_model(cfg)
    optimizer = make_optimizer(model, cfg)
    step_module = SimulatedInteraction(model, cfg.prompt_iterations, cfg.mask_only_iterations, cfg.box_probability)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    data_seconds, step_seconds, losses = [], [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        batch, seed = step_batch(cfg, model.image_size, None, step, 0, 1)
        loaded = time.perf_counter()
        with autocast:
            stats = step_module(batch.images, batch.masks, batch.image_index, torch.Generator().manual_seed(seed))
        optimizer.zero_grad(set_to_none=True)
        stats["loss"].backward()
        optimizer.step()
        if step:  # the first step pays for allocations and kernel selection
            data_seconds.append(loaded - start)
            step_seconds.append(time.perf_counter() - start)
        losses.append(float(stats["loss"].detach()))
    return {"data_s": sum(data_seconds) / steps, "step_s": sum(step_seconds) / steps, "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_tiny256")
    parser.add_argument("--size", type=int, default=256, help="synthetic scene side, px")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for bf16 in (False, True):
        cfg = TrainConfig(
            model_type=args.model_type, images_per_step=args.images, masks_per_image=args.masks,
            prompt_iterations=args.iterations, synthetic=SyntheticSource(size=args.size), bf16=bf16,
        )
        result = time_steps(cfg, args.steps)
        print(
            f"{args.model_type} {args.size}px {args.images} images x {args.masks} masks x {args.iterations} "
            f"iterations, {args.threads} threads, {'bf16' if bf16 else 'fp32'}: "
            f"{result['step_s']:.3f} s/step (data {result['data_s']:.3f} s), loss {result['last_loss']:.3f}"
        )


if __name__ == "__main__":
    main()
