"""Our automatic mask generator against the official one, same weights, same images,
side by side in one run. Prints wall time per image, the speed-up ratio, peak memory
(RSS growth, sampled) and how the masks match, and each side's encoder time apart from
decode + post-process, whose ratio is the one that matters where the encoder costs
seconds (vit_b/l/h: the image encoder is the official network on both sides).

    python benchmarks/amg.py                                # bundled checkpoint and photos
    python benchmarks/amg.py --size 768x1024 --points-per-side 32 --precision fp32 bf16
    python benchmarks/amg.py --images 2 --repeat 3          # best of 3 per side (noisy machines)
    python benchmarks/amg.py --model-type vit_b --random-weights --skip-official
    python benchmarks/amg.py --skip-official --precision fp32 --threads 1 \
        --results-json benchmarks/results/cpu-2core.json --results-name cpu-2core

--results-json writes per-stage throughput (images/s of one actor: read, encode,
decode_prompts, postprocess, write) for the first --precision in the format of
schemas/throughput.py, which jobs/plan.py reads.
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import os
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amg import AmgParams, AutomaticMaskGenerator, decode_image, encode_image, postprocess  # noqa: E402
from amg.compare import match_records  # noqa: E402
from amg.params import checkpoint_defaults  # noqa: E402
from model import Sam, get_config, load_checkpoint, read_checkpoint_meta, score_kernel  # noqa: E402
from model.memory import retain_freed_memory  # noqa: E402
from model.predictor import resolve_precision  # noqa: E402
from schemas.annotate import DEFAULT_CHECKPOINT  # noqa: E402
from schemas.throughput import FORMAT, ThroughputResults, write_results  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def _rss() -> int:
    with open("/proc/self/statm") as f:  # Linux: pages resident
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident memory growth of this process while the block runs (sampled)."""

    def __enter__(self):
        self.stop = False
        self.base = self.peak = _rss()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def official_generator(model: Sam, params: AmgParams):
    """The official generator with the same weights; its `encode_seconds` adds up the time
    spent in its image encoder (predictor.set_image, once per crop), so that decode +
    post-process can be compared on their own where the encoder is large."""
    from segment_anything import SamAutomaticMaskGenerator
    from tests.official import build_official

    official = build_official(model.config)
    official.load_state_dict(model.state_dict())
    official.to(model.device)
    generator = SamAutomaticMaskGenerator(official, **params.model_dump(exclude={"point_grids"}))
    generator.encode_seconds = 0.0
    set_image = generator.predictor.set_image

    def timed_set_image(*args, **kwargs):
        t = time.perf_counter()
        set_image(*args, **kwargs)
        _sync(model)
        generator.encode_seconds += time.perf_counter() - t

    generator.predictor.set_image = timed_set_image
    return generator


def load_images(size: str | None) -> list[tuple[str, np.ndarray]]:
    out = []
    for path in sorted(IMAGES.glob("*.jpg")):
        im = Image.open(path).convert("RGB")
        if size:
            h, w = (int(v) for v in size.split("x"))
            im = im.resize((w, h), Image.BILINEAR)
        out.append((path.stem, np.asarray(im)))
    return out


def timed(fn, *args):
    with PeakRss() as mem:
        t = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t
    return out, dt, mem.mb


def best_of(n: int, fn, *args, seconds_inside=None):
    """fn(*args) run n times: (last output, best wall seconds, median wall seconds, peak MB over
    all runs, seconds_inside() of the best run). On a shared machine single runs vary by up to
    2x; the best of a few is the steadier figure, the median shows the spread."""
    runs = []
    for _ in range(n):
        out, dt, mb = timed(fn, *args)
        runs.append((dt, mb, seconds_inside() if seconds_inside else 0.0))
    best = min(runs)
    return out, best[0], float(np.median([r[0] for r in runs])), max(r[1] for r in runs), best[2]


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def stage_times(model, image, params, precision, encoder_precision):
    """Seconds spent in encode, decode and post-process."""
    t0 = time.perf_counter()
    enc = encode_image(model, image, params, encoder_precision)
    _sync(model)
    t1 = time.perf_counter()
    crops = decode_image(model, enc, params, precision)
    _sync(model)
    t2 = time.perf_counter()
    postprocess(crops, enc.orig_size, params)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def decoder_path(model: Sam, precision: str) -> str:
    """Which decoder our generator runs at this precision (amg.decode's choice, crops aside)."""
    pixels, decoder = model.config.embedding_size ** 2, model.mask_decoder
    if precision == "bf16" and decoder.native_bf16_for(pixels):
        return f"native kernels ({score_kernel.build_summary()}), bf16 matmuls"
    if precision == "fp32" and decoder.native_for(pixels):
        return f"native kernels ({score_kernel.build_summary()})"
    return "torch" + (", a bf16 copy of the decoder" if precision == "bf16" else "")


def _spread(n: int, median: float) -> str:
    return f"  (best of {n}, median {median:.2f} s)" if n > 1 else ""


def read_seconds(image: np.ndarray) -> float:
    """JPEG bytes of an image of this size -> RGB array, as the pipeline's read stage
    decodes them (no storage I/O)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    decode = lambda: np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))  # noqa: E731
    decode()  # warm-up
    t = time.perf_counter()
    decode()
    return time.perf_counter() - t


def write_seconds(records: list[dict]) -> float:
    """Records of one image -> one zstd Parquet row group in memory (no storage I/O)."""
    def write():
        rows = [{"counts": r["segmentation"]["counts"], "size": list(r["segmentation"]["size"]),
                 "bbox": [float(v) for v in r["bbox"]], "area": int(r["area"]),
                 "predicted_iou": float(r["predicted_iou"]), "stability_score": float(r["stability_score"]),
                 "point_coords": [[float(v) for v in p] for p in r["point_coords"]],
                 "crop_box": [float(v) for v in r["crop_box"]]} for r in records]
        table = pa.table({"image_id": ["0" * 64], "annotations": [rows]})
        pq.write_table(table, io.BytesIO(), compression="zstd")

    write()  # warm-up
    t = time.perf_counter()
    write()
    return time.perf_counter() - t


def throughput_results(args, model, params, precision: str, seconds: dict[str, float], n_images: int,
                       masks: int) -> ThroughputResults:
    gpu = model.device.type == "cuda"
    threads = torch.get_num_threads()
    model_stage = {"CPU": 1, "GPU": 1} if gpu else {"CPU": threads}
    resources = {"read": {"CPU": 1}, "encode": model_stage, "decode_prompts": model_stage,
                 "postprocess": {"CPU": threads}, "write": {"CPU": 1}}
    device = torch.cuda.get_device_name(model.device) if gpu else platform.processor() or platform.machine()
    return ThroughputResults(
        format=FORMAT, name=args.results_name, device=args.results_device or ("gpu" if gpu else "cpu"),
        machine=f"{device}, {os.cpu_count()} CPUs visible, torch threads {threads}, "
                f"load average at the end {os.getloadavg()[0]:.1f}", source="measured",
        config={"model_type": model.config.name, "points_per_side": params.points_per_side,
                "crop_n_layers": params.crop_n_layers, "image_size": args.size, "precision": precision,
                "pred_iou_thresh": params.pred_iou_thresh,
                "stability_score_thresh": params.stability_score_thresh,
                "random_weights": args.random_weights, "images": n_images,
                "masks_per_image": masks / n_images},
        notes="benchmarks/amg.py: one warm-up generate per image, then one timed pass per stage; "
              "read and write exclude storage I/O",
        stages=[{"stage": s, "items_per_s": n_images / seconds[s], "resources": resources[s]}
                for s in ("read", "encode", "decode_prompts", "postprocess", "write")],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--model-type", default=None, help="with --random-weights: a config name")
    ap.add_argument("--random-weights", action="store_true", help="no checkpoint (timing only)")
    ap.add_argument("--size", default="768x1024", help="HxW every image is resized to ('' keeps them)")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--min-mask-region-area", type=int, default=0)
    ap.add_argument("--pred-iou-thresh", type=float, default=None,
                    help="default: the checkpoint's recommendation, as jobs/auto_annotate.py uses it "
                         "(the official 0.88 without one)")
    ap.add_argument("--stability-score-thresh", type=float, default=None,
                    help="default: the checkpoint's recommendation (the official 0.95 without one)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], help="of our decoder, one run each")
    ap.add_argument("--encoder-precision", default="fp32", help="of our image encoder, in every run")
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each side this many times per image (after the warm-up) and report the best")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="torch device of our model (and the official one)")
    ap.add_argument("--results-json", default=None, metavar="PATH",
                    help="write per-stage throughput of the first --precision (schemas/throughput.py)")
    ap.add_argument("--results-name", default="amg", help="name of the run in --results-json")
    ap.add_argument("--results-device", default=None,
                    help="device type in --results-json that jobs/plan.py prices, e.g. H100 (default: cpu or gpu)")
    ap.add_argument("--malloc", choices=("retain", "default"), default="retain",
                    help="retain: model.memory.retain_freed_memory, as our workers run (applies to "
                         "both generators: one process)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain" and not retain_freed_memory():
        print("note: retain_freed_memory has no effect here (not glibc)")

    if args.random_weights:
        torch.manual_seed(0)
        model = Sam(get_config(args.model_type or "vit_tiny256")).eval()
    else:
        model, _ = load_checkpoint(args.checkpoint, model_type=args.model_type)
    model = model.to(args.device)
    given = {k: v for k, v in (("pred_iou_thresh", args.pred_iou_thresh),
                                ("stability_score_thresh", args.stability_score_thresh)) if v is not None}
    params = AmgParams(points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers,
                       min_mask_region_area=args.min_mask_region_area, output_mode="coco_rle", **given)
    if not args.random_weights:  # what jobs/auto_annotate.py takes from the checkpoint (flags win)
        params = params.over(checkpoint_defaults(read_checkpoint_meta(args.checkpoint, args.model_type)))
    print(f"model {model.config.name} ({model.image_size}px), {params.points_per_side}x{params.points_per_side} "
          f"points, crop_n_layers={params.crop_n_layers}, min_mask_region_area={params.min_mask_region_area}, "
          f"pred_iou_thresh={params.pred_iou_thresh}, stability_score_thresh={params.stability_score_thresh}, "
          f"threads={torch.get_num_threads()}, malloc={args.malloc}")
    # What each asked precision runs at here: bf16 on a CPU without native bf16 runs fp32 (as
    # the generator and the pipeline's actors do; model.predictor.resolve_precision).
    runs = {p: resolve_precision(p, model.device) for p in args.precision}
    encoder_precision = resolve_precision(args.encoder_precision, model.device, "encoder_precision")
    print("decoder: " + "; ".join(f"{p}: {decoder_path(model, runs[p])}" + (f" (runs {runs[p]} here)" if runs[p] != p else "")
                                  for p in args.precision)
          + f"; our encoder in {encoder_precision}")
    official = None if args.skip_official else official_generator(model, params)
    seconds = dict.fromkeys(("read", "encode", "decode_prompts", "postprocess", "write"), 0.0)
    images = load_images(args.size)[: args.images]
    masks = 0
    for name, image in images:
        print(f"\n{name} {image.shape[0]}x{image.shape[1]}")
        ref = None
        if official is not None:
            official.generate(image)  # warm-up, as ours gets: first calls pay one-off set-up (seconds)

            def official_run():
                official.encode_seconds = 0.0
                return official.generate(image)

            ref, t_ref, t_ref_median, m_ref, enc_ref = best_of(
                args.repeat, official_run, seconds_inside=lambda: official.encode_seconds)
            ref_rest = t_ref - enc_ref
            print(f"  official       {t_ref:8.2f} s  peak +{m_ref:7.0f} MB  {len(ref)} masks"
                  f"  [encode {enc_ref:.2f} s, decode + post {ref_rest:.2f} s]{_spread(args.repeat, t_ref_median)}")
        for precision in args.precision:
            gen = AutomaticMaskGenerator(model, params, precision=runs[precision], encoder_precision=encoder_precision)
            gen.generate(image)  # warm-up
            out, t, t_median, m, _ = best_of(args.repeat, gen.generate, image)
            enc, dec, post = np.min([stage_times(model, image, params, runs[precision], encoder_precision)
                                     for _ in range(args.repeat)], axis=0)
            if args.results_json and precision == args.precision[0]:
                for stage, dt in zip(("encode", "decode_prompts", "postprocess"), (enc, dec, post)):
                    seconds[stage] += dt
                seconds["read"] += read_seconds(image)
                seconds["write"] += write_seconds(out)
                masks += len(out)
            label = precision if runs[precision] == precision else f"{precision}={runs[precision]}"
            line = (f"  ours {label:10s}{t:8.2f} s  peak +{m:7.0f} MB  {len(out)} masks"
                    f"  [encode {enc:.2f} s, decode {dec:.2f} s, post {post:.2f} s]{_spread(args.repeat, t_median)}")
            if ref is not None:
                m = match_records(out, ref)
                below = sum(iou < 0.99 for iou in m["ious"])
                line += (f"\n      speed-up x{t_ref / t:6.1f} "
                         f"(decode + post-process alone x{ref_rest / (dec + post):.1f});"
                         f" official masks matched {m['matched']}/{m['theirs']}"
                         f" (min IoU {m['min_iou']:.4f}, {below} under 0.99), equal RLE {m['equal_rle']},"
                         f" ours unmatched {m['ours'] - m['matched']}")
            print(line)
    if args.results_json:
        results = throughput_results(args, model, params, runs[args.precision[0]], seconds, len(images), masks)
        write_results(args.results_json, results)
        print(f"\nwrote {args.results_json}")


if __name__ == "__main__":
    main()
