"""Cost and capacity plan from benchmark results: how many actors each stage needs for a
target rate, what GPUs and CPUs that takes, which stage dominates, hours and cost.

    python jobs/plan.py --images 11e6 --hours 48                    # rate from a deadline
    python jobs/plan.py --rate 50 --images 11e6 --gpu-price H100=2.5 --json
    python jobs/plan.py --results benchmarks/results/cpu-2core.json --rate 1

Each results file (format: schemas/throughput.py) is one scenario. Stages a file lacks are
taken from another file that ran them on CPU only (read, post-process and write usually
come from a measured CPU run, encode and decode from a GPU run or estimate); the table
names the file each row comes from. Prices are assumptions, not quotes: pass your own.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.arg_types import amount, price  # noqa: E402
from schemas.throughput import STAGES, ResultsFileError, StageThroughput, ThroughputResults, load_results  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# Assumed on-demand prices in USD per hour (public cloud list prices, late 2025, rounded).
# A GPU's price is its instance's divided by its GPUs, host CPUs included: CPU requests of
# GPU actors cost nothing extra; CPU-only actors pay per vCPU.
DEFAULT_GPU_PRICES = {"H100": 3.00, "H200": 3.80, "A100": 1.80, "L4": 0.80, "A10G": 1.00}
DEFAULT_CPU_PRICE = 0.045


@dataclass
class StagePlan:
    stage: str
    origin: str          # name of the results file the throughput comes from
    source: str          # measured | estimate
    items_per_s: float   # one actor
    cpus_per_actor: float
    gpus_per_actor: float
    actors: int
    cpus: float
    gpus: float
    load: float          # target rate / capacity of the actors (<= 1)
    usd_per_hour: float


@dataclass
class Plan:
    scenario: str
    device: str
    rate: float          # images per second
    images: float | None
    hours: float | None
    stages: list[StagePlan]
    missing: list[str]   # stages no file covers: not in the totals
    cpus: float
    gpus: float
    usd_per_hour: float
    usd_total: float | None
    bottleneck: str      # the stage with the largest share of the cost
    estimate: bool       # any row derived from FLOPs/datasheets rather than measured
    config: dict = field(default_factory=dict)  # of the scenario's own results file
    notes: list[str] = field(default_factory=list)


def scenario_stages(main: ThroughputResults, others: list[ThroughputResults]):
    """main's stages, completed by CPU-only stages of the other files (first one wins)."""
    chosen = {s.stage: (s, main) for s in main.stages}
    notes = []
    for stage in STAGES:
        for other in others:
            entry = next((s for s in other.stages if s.stage == stage and s.resources.gpus == 0), None)
            if stage in chosen or entry is None:
                continue
            chosen[stage] = (entry, other)
            differ = sorted(k for k in set(main.config) & set(other.config) if main.config[k] != other.config[k])
            if differ:
                notes.append(f"{stage} from {other.name}, whose config differs in {', '.join(differ)}")
    return [chosen[s] for s in STAGES if s in chosen], notes


def plan(name: str, device: str, stages: list[tuple[StageThroughput, ThroughputResults]], *,
         rate: float, images: float | None, hours: float | None, gpu_price: float | None,
         cpu_price: float) -> Plan:
    rows = []
    for entry, origin in stages:
        need = rate / entry.items_per_s
        if not math.isfinite(need):
            raise ValueError(f"{rate:g} images/s is too many to plan for ({entry.stage} would need more "
                             f"than {sys.float_info.max:g} actors): lower --rate or --images, or raise --hours")
        actors = max(1, math.ceil(need - 1e-9))  # a tiny rate still needs one actor
        res = entry.resources
        gpus, cpus = actors * res.gpus, actors * res.cpus
        if res.gpus and gpu_price is None:
            raise ValueError(f"no price for GPU type {device!r}: pass --gpu-price {device}=USD")
        cost = gpus * gpu_price if res.gpus else cpus * cpu_price
        rows.append(StagePlan(entry.stage, origin.name, entry.source, entry.items_per_s, res.cpus, res.gpus,
                              actors, cpus, gpus, rate / (actors * entry.items_per_s), cost))
    per_hour = sum(r.usd_per_hour for r in rows)
    totals = (per_hour, per_hour * hours if hours is not None else 0.0, *(r.cpus + r.gpus for r in rows))
    if not all(map(math.isfinite, totals)):
        raise ValueError(f"the plan for {rate:g} images/s has a cost or CPU/GPU count beyond what a float "
                         "can hold: lower --rate or --images, or raise --hours")
    return Plan(
        scenario=name, device=device, rate=rate, images=images, hours=hours, stages=rows,
        missing=[s for s in STAGES if s not in {r.stage for r in rows}],
        cpus=sum(r.cpus for r in rows), gpus=sum(r.gpus for r in rows), usd_per_hour=per_hour,
        usd_total=None if hours is None else per_hour * hours,
        bottleneck=max(rows, key=lambda r: r.usd_per_hour).stage,
        estimate=any(r.source == "estimate" for r in rows))


def resolve_rate(rate: float | None, images: float | None, hours: float | None):
    """Two of rate (images/s), images and hours give the third."""
    given = sum(v is not None for v in (rate, images, hours))
    if rate is None and (images is None or hours is None) or given == 3:
        raise ValueError("give --rate, or --images with --hours, or --rate with one of them")
    if any(v is not None and v <= 0 for v in (rate, images, hours)):
        raise ValueError("--rate, --images and --hours must be positive")
    if rate is None:
        rate = images / (hours * 3600)
    elif images is not None:
        hours = images / rate / 3600
    elif hours is not None:
        images = rate * hours * 3600
    # Each is finite and > 0, but a ratio of extremes may not be (1e308 images in 1e-10 h).
    for name, value in (("rate", rate), ("images", images), ("hours", hours)):
        if value is not None and not 0 < value < math.inf:
            raise ValueError(f"--rate, --images and --hours give {name} = {value:g}, "
                             "out of the range a float can hold")
    return rate, images, hours


def format_plan(p: Plan) -> str:
    tag = " [ESTIMATE: includes FLOP-derived throughput]" if p.estimate else ""
    shown = ("model_type", "points_per_side", "crop_n_layers", "image_size", "precision", "masks_per_image")
    config = ", ".join(f"{k}={p.config[k]}" for k in shown if k in p.config)
    lines = [f"== {p.scenario} ({p.device}){tag}", f"config: {config or 'not given'}",
             f"{'stage':15s}{'from':>14s}{'source':>10s}{'img/s/actor':>12s}{'actor':>11s}"
             f"{'actors':>8s}{'CPUs':>8s}{'GPUs':>7s}{'load':>6s}{'$/h':>9s}"]
    for r in p.stages:
        actor = f"{r.cpus_per_actor:g}C" + (f"+{r.gpus_per_actor:g}G" if r.gpus_per_actor else "")
        lines.append(f"{r.stage:15s}{r.origin:>14s}{r.source:>10s}{r.items_per_s:12.3f}{actor:>11s}"
                     f"{r.actors:8d}{r.cpus:8g}{r.gpus:7g}{r.load:6.2f}{r.usd_per_hour:9.2f}")
    lines.append(f"total: {p.rate:.3f} images/s, {p.gpus:g} GPUs, {p.cpus:g} CPUs, ${p.usd_per_hour:,.2f}/h; "
                 f"bottleneck (largest cost share): {p.bottleneck}")
    if p.images is not None:
        lines.append(f"{p.images:,.0f} images in {p.hours:,.1f} h for ${p.usd_total:,.0f}")
    lines += [f"note: {n}" for n in p.notes]
    if p.missing:
        lines.append(f"note: no results for {', '.join(p.missing)}: not counted")
    return "\n".join(lines)


def parse_prices(items: list[str]) -> dict[str, float]:
    """Defaults updated by TYPE=USD items; GPU type names are matched case-insensitively."""
    prices = {k.upper(): v for k, v in DEFAULT_GPU_PRICES.items()}
    for item in items:
        kind, _, usd = item.partition("=")
        try:
            prices[kind.strip().upper()] = price(usd)
        except argparse.ArgumentTypeError:
            raise ValueError(f"--gpu-price wants TYPE=USD with USD >= 0, got {item!r}") from None
    return prices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", default=sorted(str(p) for p in RESULTS_DIR.glob("*.json")),
                    help="results files (default: benchmarks/results/*.json)")
    ap.add_argument("--rate", type=amount, help="target images per second")
    ap.add_argument("--images", type=amount, help="number of images, e.g. 11e6")
    ap.add_argument("--hours", type=amount, help="time budget in hours")
    ap.add_argument("--gpu-price", action="append", default=[], metavar="TYPE=USD",
                    help=f"USD per GPU-hour (assumed defaults: {DEFAULT_GPU_PRICES})")
    ap.add_argument("--cpu-price", type=price, default=DEFAULT_CPU_PRICE,
                    help="USD per vCPU-hour for CPU-only actors (assumed default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = ap.parse_args(argv)
    try:
        rate, images, hours = resolve_rate(args.rate, args.images, args.hours)
        prices = parse_prices(args.gpu_price)
        if not args.results:
            raise ValueError("no results files given and none in benchmarks/results/")
        files = [load_results(p) for p in args.results]
        plans = []
        for i, main_file in enumerate(files):
            stages, notes = scenario_stages(main_file, files[:i] + files[i + 1:])
            p = plan(main_file.name, main_file.device, stages, rate=rate, images=images, hours=hours,
                     gpu_price=prices.get(main_file.device.upper()), cpu_price=args.cpu_price)
            p.config, p.notes = main_file.config, notes
            plans.append(p)
    except (ValueError, ResultsFileError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"assumptions": {"gpu_usd_per_hour": prices, "cpu_usd_per_hour": args.cpu_price},
                          "plans": [asdict(p) for p in plans]}, indent=2))
    else:
        print(f"assumed prices (USD/h, override with --gpu-price/--cpu-price): GPU {prices}, vCPU {args.cpu_price}")
        print("\n\n".join(format_plan(p) for p in plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
