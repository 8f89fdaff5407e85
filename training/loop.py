"""The training recipe, run by Ray Train: config, data per step, AdamW with warm-up and
decay, checkpoints that resume, and the export of the final model.

    cfg = TrainConfig(steps=2000)
    path, metrics = run_training(cfg, storage_path="runs", num_workers=1)

Each worker draws its own images for a step from (seed, step, rank), so a run is
reproducible and a resumed run sees the data it would have seen without the interruption.
The Ray checkpoint directory holds model.pt (our checkpoint format) and train_state.pt
(step, optimizer state and per-step metrics; plain data that loads with weights_only=True).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataset.lineage import code_version
from dataset.storage import arrow_s3_filesystem, is_s3
from model import Sam, get_config, load_checkpoint, save_checkpoint
from model.checkpoint import local_checkpoint
from model.resample import config_with_patch_size, with_patch_size

from .data import Batch, Example, ParquetExamples, make_batch, synthetic_example
from .evaluate import single_point_miou
from .interactive import STATS, SimulatedInteraction

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


class SyntheticSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    size: int = Field(256, gt=0, description="side of the generated square scenes, px")


class ParquetSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str]
    image_column: str = Field("uri", description="encoded image bytes, or a URI to read them from")
    annotations_column: str = "annotations"
    fraction: float = Field(0.5, ge=0, le=1, description="share of images taken from here when synthetic data is also on")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for these s3:// paths (default: "
                                     "the run's endpoint_url, else AWS_ENDPOINT_URL)")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_type: str = "vit_tiny256"
    init_checkpoint: str | None = Field(None, description="fine-tune these weights (a local path or s3://) instead of "
                                        "starting from scratch")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for the run's s3:// paths: init "
                                     "checkpoint, parquet data, Ray Train storage, output (default: AWS_ENDPOINT_URL)")
    patch_size: int | None = Field(None, gt=0, description="train at this patch size instead of the model's; the "
                                   "init checkpoint's weights are resampled to it (model.resample)")
    steps: int = Field(1000, gt=0)
    images_per_step: int = Field(4, gt=0, description="per worker")
    masks_per_image: int = Field(8, gt=0)
    prompt_iterations: int = Field(4, gt=0, description="decoder passes per mask")
    mask_only_iterations: int = Field(1, ge=0, description="last passes that add no new click")
    box_probability: float = Field(0.5, ge=0, le=1)
    low_res_loss: bool = Field(False, description="focal + dice on the decoder's low-res logits vs soft coverage targets")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="cosine decay ends at lr * this")
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    decay: Literal["cosine", "step"] = "cosine"
    step_milestones: tuple[float, ...] = Field((2 / 3, 0.95), description="for step decay: fractions of steps, lr /10 at each")
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    seed: int = 0
    bf16: bool = False
    torch_threads: int = Field(0, ge=0, description="torch threads per worker; 0: the CPUs Ray gives the worker")
    vit_init: bool = Field(True, description="from scratch: ViT-style encoder init with sin-cos position embedding")
    synthetic: SyntheticSource | None = SyntheticSource()
    parquet: ParquetSource | None = None
    log_every: int = Field(10, gt=0, description="steps between ray.train.report calls")
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations on rank 0; 0: never")
    eval_images: int = Field(8, gt=0)
    eval_seed: int = 1_000_003

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.synthetic is None and self.parquet is None:
            raise ValueError("no training data: give synthetic and/or parquet")
        if self.mask_only_iterations >= self.prompt_iterations:
            raise ValueError("mask_only_iterations must be smaller than prompt_iterations")
        if self.synthetic is not None and self.eval_seed == self.synthetic.seed:
            raise ValueError("eval_seed must differ from the training data seed")
        return self


# ---- schedule and data -------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from ~0 to lr, then cosine to lr * min_lr_ratio, or /10 steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "step":
        return cfg.lr * 0.1 ** sum(step >= m * cfg.steps for m in cfg.step_milestones)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_rng(cfg: TrainConfig, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng((cfg.seed, step, rank))


def step_examples(
    cfg: TrainConfig, parquet: ParquetExamples | None, step: int, rank: int, world_size: int, rng: np.random.Generator
) -> list[Example]:
    """The images of one worker at one step. Synthetic image i of this worker and step is
    scene (step * world_size + rank) * images_per_step + i of the stream, so no two
    workers or steps share one."""
    from_parquet = np.zeros(cfg.images_per_step, bool)
    if parquet is not None:
        share = 1.0 if cfg.synthetic is None else cfg.parquet.fraction
        from_parquet = rng.random(cfg.images_per_step) < share
    examples: list[Example] = []
    wanted, draws = int(from_parquet.sum()), 0
    while len(examples) < wanted:  # unannotated rows teach nothing here: draw others
        if draws == 10:
            raise ValueError(f"Parquet rows drawn for step {step} kept having no masks; is the data annotated?")
        drawn = parquet.take(rng.integers(0, len(parquet), wanted - len(examples)).tolist())
        examples += [example for example in drawn if len(example.masks)]
        draws += 1
    first = (step * world_size + rank) * cfg.images_per_step
    for i in np.flatnonzero(~from_parquet):
        examples.append(synthetic_example(cfg.synthetic.seed, first + int(i), cfg.synthetic.size))
    return examples


def step_batch(cfg: TrainConfig, image_size: int, parquet, step: int, rank: int, world_size: int) -> tuple[Batch, int]:
    """The batch of one worker at one step and the seed of its simulated prompts."""
    rng = step_rng(cfg, step, rank)
    batch = make_batch(step_examples(cfg, parquet, step, rank, world_size, rng), image_size, cfg.masks_per_image, rng)
    return batch, int(rng.integers(2**62))


# ---- model, optimizer, state --------------------------------------------------------


def parquet_examples(cfg: TrainConfig) -> ParquetExamples | None:
    """The run's Parquet training data (ValueError/OSError when it cannot be read)."""
    if cfg.parquet is None:
        return None
    return ParquetExamples(cfg.parquet.paths, cfg.parquet.image_column, cfg.parquet.annotations_column,
                           cfg.parquet.endpoint_url or cfg.endpoint_url)


def initial_model(cfg: TrainConfig) -> Sam:
    if cfg.init_checkpoint:
        model, _ = load_checkpoint(local_checkpoint(cfg.init_checkpoint, cfg.endpoint_url))
        return with_patch_size(model, cfg.patch_size or model.config.patch_size).train()
    torch.manual_seed(cfg.seed)
    config = get_config(cfg.model_type)
    model = Sam(config_with_patch_size(config, cfg.patch_size) if cfg.patch_size else config)
    if cfg.vit_init:
        vit_init_(model)
    return model.train()


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """grid x grid x dim fixed 2-D sine-cosine position embedding (half the channels for
    y, half for x), as MAE starts its ViTs with."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    angles = pos[:, None] * omega[None]  # grid x quarter
    one_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # grid x dim/2
    y = one_axis[:, None, :].expand(grid, grid, -1)
    x = one_axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([y, x], dim=-1).float()


@torch.no_grad()
def vit_init_(model: Sam) -> None:
    """From-scratch initialisation of the image encoder in the usual ViT way: truncated
    normal (std 0.02) linear weights with zero biases, and a 2-D sine-cosine absolute
    position embedding instead of zeros (the official zeros assume pretrained weights:
    from scratch, windowed blocks with zero position terms cannot tell patches apart)."""
    encoder = model.image_encoder
    for module in encoder.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.trunc_normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)
    _, grid, _, dim = encoder.pos_embed.shape
    encoder.pos_embed.copy_(sincos_2d(grid, dim)[None])


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices and embeddings decay, biases and norm scales (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def save_state(directory: str, model: Sam, optimizer, step: int, history: list[dict], cfg: TrainConfig) -> None:
    save_checkpoint(model, Path(directory) / MODEL_FILE, {"step": step, "train_config": cfg.model_dump(mode="json")})
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "history": history}, Path(directory) / STATE_FILE)


def load_state(directory: str) -> tuple[Sam, dict]:
    model, _ = load_checkpoint(Path(directory) / MODEL_FILE)
    return model.train(), torch.load(Path(directory) / STATE_FILE, weights_only=True)


# ---- the per-worker loop --------------------------------------------------------------


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point: config is TrainConfig as a dict. Returns (on every rank)
    the per-step metrics history and the step this run started from."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Ray sets OMP_NUM_THREADS to the CPUs given to this worker; use them all, unless told
    # otherwise: on a CPU shared with other work, one thread per worker avoids the stalls of
    # a parallel region waiting for a descheduled thread (measured several times slower).
    torch.set_num_threads(cfg.torch_threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    # Denormal floats are many times slower on CPUs; tiny gradients and Adam moments make them.
    torch.set_flush_denormal(True)
    device = ray.train.torch.get_device()

    start_step, history = 0, []
    model, optimizer_state = initial_model(cfg), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model, state = load_state(directory)
        start_step, history, optimizer_state = state["step"], state["history"], state["optimizer"]
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    step_module = SimulatedInteraction(
        model, cfg.prompt_iterations, cfg.mask_only_iterations, cfg.box_probability, cfg.low_res_loss
    )
    if world_size > 1:
        # Box and point embeddings go unused in a step without boxes or points.
        step_module = ray.train.torch.prepare_model(step_module, parallel_strategy_kwargs={"find_unused_parameters": True})
    parquet = parquet_examples(cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    for step in range(start_step, cfg.steps):
        started = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch, prompt_seed = step_batch(cfg, model.image_size, parquet, step, rank, world_size)
        if not len(batch.masks):
            raise ValueError(f"step {step} drew images without usable masks")
        generator = torch.Generator(device).manual_seed(prompt_seed)
        with autocast:
            stats = step_module([image.to(device) for image in batch.images], batch.masks.to(device), batch.image_index.to(device), generator)
        optimizer.zero_grad(set_to_none=True)
        stats["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        history.append({"step": step + 1, "lr": lr, "seconds": time.perf_counter() - started, "masks": len(batch.masks)}
                       | {name: float(stats[name].detach()) for name in STATS})

        done = step + 1
        if done % cfg.log_every and done % cfg.checkpoint_every and done != cfg.steps:
            continue
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps) and rank == 0:
            history[-1] |= {f"eval_{k}": v for k, v in evaluate_held_out(model, cfg).items()}
        metrics = window_means(history[-cfg.log_every :]) | {"step": done, "start_step": start_step}
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    save_state(directory, model, optimizer, done, history, cfg)
                # Only rank 0 holds a checkpoint: the replicas are identical.
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)
        else:
            ray.train.report(metrics)
    return {"history": history, "start_step": start_step}


def window_means(rows: list[dict]) -> dict[str, float]:
    """Means of the per-step metrics over some steps (the last log window); a metric
    measured on some steps only (held-out evaluation) is averaged where it exists."""
    names = dict.fromkeys(name for row in rows for name in row if name != "step")
    return {name: float(np.mean([row[name] for row in rows if name in row])) for name in names}


def evaluate_held_out(model: Sam, cfg: TrainConfig) -> dict[str, float]:
    """Single-point mIoU on synthetic scenes from eval_seed, a stream training never uses."""
    size = cfg.synthetic.size if cfg.synthetic else model.image_size
    scenes = (synthetic_example(cfg.eval_seed, i, size) for i in range(cfg.eval_images))
    return single_point_miou(model, scenes)


# ---- the driver side ------------------------------------------------------------------


def run_training(
    cfg: TrainConfig,
    storage_path: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    resume: bool = True,
    name: str | None = None,
    output: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Train with Ray Train on the cluster ray.init() connected to, and export the final
    model as one checkpoint file (default: <storage>/<name>/final.pt).

    Ray Train (2.60, "v2") resumes by run identity: a run with the same storage_path and
    name starts from the latest checkpoint found there (TorchTrainer.restore and
    resume_from_checkpoint are gone). resume=False starts a fresh run under a new name.
    Returns the exported file's path and the metrics (the last log window's means,
    start_step, and the per-step history)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path = os.path.abspath(storage_path) if "://" not in storage_path else storage_path
    storage_filesystem, ray_storage_path = None, storage_path
    if is_s3(storage_path) and cfg.endpoint_url:  # else Ray Train resolves s3:// from the AWS environment
        storage_filesystem, ray_storage_path = arrow_s3_filesystem(cfg.endpoint_url), storage_path.split("://", 1)[1]
    name = name or f"{cfg.model_type}-seed{cfg.seed}"
    if not resume:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # On CPU each worker takes an equal share of the cluster's cores for torch's threads.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": max(1, cpus // num_workers)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    returned = result.return_value or {}
    history = returned.get("history", [])
    metrics = window_means(history[-cfg.log_every :]) if history else dict(result.metrics or {})
    metrics |= {"steps": cfg.steps, "start_step": returned.get("start_step", 0), "history": history}

    output = output or os.path.join(storage_path, name, "final.pt")
    with result.checkpoint.as_directory() as directory:
        model, _ = load_checkpoint(Path(directory) / MODEL_FILE)
    export_checkpoint(model, output, cfg, metrics)
    return output, metrics


def export_checkpoint(model: Sam, path: str, cfg: TrainConfig, metrics: dict[str, Any], extra: dict | None = None) -> str:
    """Save the trained model with what it takes to know where it came from."""
    meta = {
        "train_config": cfg.model_dump(mode="json"),
        "training_data_seed": cfg.synthetic.seed if cfg.synthetic else None,
        "steps": cfg.steps,
        "metrics": {k: v for k, v in metrics.items() if k != "history"},
        "code_version": code_version(),
        **(extra or {}),
    }
    save_checkpoint(model, path, meta, cfg.endpoint_url)
    return path
