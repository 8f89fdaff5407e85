"""The report's figures: matplotlib (object API, no pyplot state, no display) to inline SVG.

Each function takes plain numbers (what `report.py` also embeds as JSON) and returns one
SVG string; text stays text (`svg.fonttype: none`), so the page's font renders it.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib import rc_context
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

ACCENT, ACCENT_2, MUTED, GRID, INK = "#2f6fdb", "#e8833a", "#9aa4b2", "#e6e9ef", "#1f2633"
SERIES = (ACCENT, ACCENT_2, "#2ea37a", "#b04fc9", "#d4444f", "#6b7a8f")
HEAT = LinearSegmentedColormap.from_list("report", ["#f7f9fc", "#a9c4f5", ACCENT, "#14306b"])
STYLE = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9.5,
    "axes.edgecolor": MUTED, "axes.labelcolor": INK, "axes.titlesize": 10.5, "axes.titleweight": "bold",
    "axes.titlecolor": INK, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "axes.axisbelow": True, "grid.color": GRID, "grid.linewidth": 0.8, "xtick.color": "#4a5463",
    "ytick.color": "#4a5463", "legend.frameon": False,
}


def _svg(fig: Figure, salt: str) -> str:
    buf = io.StringIO()
    # A per-figure salt keeps the ids matplotlib gives clip paths distinct across the
    # several SVGs inlined in one page.
    with rc_context({**STYLE, "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight", transparent=True)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline in HTML


# Figure widths in inches that match the page's half and full columns at 96 px per inch,
# so every figure's text shows at the same size.
HALF, FULL = 5.5, 11.3


def _figure(width: float = HALF, height: float = 3.2, ncols: int = 1) -> tuple[Figure, list]:
    with rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _empty(ax, text: str) -> None:
    if len(ax.figure.axes) == 1:  # a figure with nothing to draw stays short
        ax.figure.set_size_inches(ax.figure.get_size_inches()[0], 1.2)
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#6b7a8f", transform=ax.transAxes, wrap=True)


def _share(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def masks_per_image(hist: dict[int, int]) -> str:
    with rc_context(STYLE):
        fig, (ax,) = _figure()
        if not hist:
            _empty(ax, "no images")
            return _svg(fig, "masks-per-image")
        values = np.array(sorted(hist), dtype=np.int64)
        counts = np.array([hist[v] for v in values], dtype=np.float64)
        top = int(values.max())
        width = max(1, int(np.ceil((top + 1) / 40)))  # at most ~40 bars
        edges = np.arange(0, top + width + 1, width)
        binned = np.histogram(values, bins=edges, weights=counts)[0]
        if width == 1:  # one bar per count, centred on it
            ax.bar(edges[:-1], _share(binned), width=0.8, color=ACCENT)
        else:
            ax.bar(edges[:-1], _share(binned), width=width * 0.9, align="edge", color=ACCENT)
        mean = float((values * counts).sum() / counts.sum())
        ax.axvline(mean, color=ACCENT_2, lw=1.5, ls="--", label=f"mean {mean:.1f}")
        ax.set_xlabel("masks per image" + (f" (bins of {width})" if width > 1 else ""))
        ax.set_ylabel("images")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
        return _svg(fig, "masks-per-image")


def unit_histogram(edges: list[float], counts: list[int], xlabel: str, salt: str, *, ylabel: str = "masks",
                   color: str = ACCENT, ax=None, empty: str = "no masks") -> str | None:
    """Bars over [0, 1] as a share of the total; draws into ax when given."""
    with rc_context(STYLE):
        fig = None
        if ax is None:
            fig, (ax,) = _figure()
        counts = np.asarray(counts, np.float64)
        if counts.sum() == 0:
            _empty(ax, empty)
        else:
            edges = np.asarray(edges)
            ax.bar(edges[:-1], _share(counts), width=np.diff(edges) * 0.92, align="edge", color=color)
            ax.set_xlim(0, 1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        return _svg(fig, salt) if fig is not None else None


def scores(edges: list[float], iou: list[int], stability: list[int],
           thresholds: dict[str, list[float]] | None = None) -> str:
    """Two histograms; the runs' filter thresholds (pred_iou_thresh, stability_score_thresh)
    as dashed lines where they are above 0 (0 turns a filter off)."""
    thresholds = thresholds or {}
    with rc_context(STYLE):
        fig, axes = _figure(width=FULL, height=3.0, ncols=2)
        for ax, counts, label, color, key in (
                (axes[0], iou, "predicted IoU", ACCENT, "pred_iou_thresh"),
                (axes[1], stability, "stability score", ACCENT_2, "stability_score_thresh")):
            unit_histogram(edges, counts, label, "", ax=ax, color=color, empty=f"no {label}")
            for i, t in enumerate(sorted({t for t in thresholds.get(key, []) if 0 < t <= 1})):
                ax.axvline(t, color=INK, lw=1.2, ls="--", label="filter threshold" if i == 0 else None)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right")
        axes[1].set_ylabel("")
        return _svg(fig, "scores")


def centres(counts: list[list[int]]) -> str:
    with rc_context(STYLE):
        fig, (ax,) = _figure(width=HALF, height=3.6)
        grid = np.asarray(counts, np.float64)
        if grid.sum() == 0:
            _empty(ax, "no masks")
            return _svg(fig, "centres")
        image = ax.imshow(_share(grid), cmap=HEAT, extent=(0, 1, 1, 0), interpolation="nearest", aspect="equal")
        ax.grid(False)
        ax.set_xlabel("box centre x / image width")
        ax.set_ylabel("box centre y / image height")
        bar = fig.colorbar(image, ax=ax, shrink=0.85, format=PercentFormatter(1.0, decimals=1))
        bar.outline.set_visible(False)
        bar.set_label("share of masks")
        return _svg(fig, "centres")


def funnel(steps: list[tuple[str, int]]) -> str:
    """Horizontal bars, widest first: the candidates left after each filter."""
    with rc_context(STYLE):
        fig, (ax,) = _figure(width=FULL, height=0.42 * len(steps) + 0.8)
        if not steps or steps[0][1] == 0:
            _empty(ax, "no run summaries with candidates for this version")
            return _svg(fig, "funnel")
        labels, values = zip(*steps)
        y = np.arange(len(steps))[::-1]
        total = values[0]
        colors = [MUTED] + [ACCENT] * (len(steps) - 2) + [ACCENT_2]
        ax.barh(y, values, color=colors[: len(steps)], height=0.62)
        for yi, v in zip(y, values):
            ax.text(v + total * 0.01, yi, f"{v:,}  ({v / total:.1%})", va="center", color=INK, fontsize=9)
        ax.set_yticks(y, labels)
        ax.set_xlim(0, total * 1.28)
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("candidate masks (3 per grid point per crop)")
        return _svg(fig, "funnel")


def rejects(quarantine: dict[str, int], duplicates: dict[str, int]) -> str:
    with rc_context(STYLE):
        fig, axes = _figure(width=FULL, height=max(1.8, 0.34 * max(len(quarantine), len(duplicates), 1) + 1.0), ncols=2)
        for ax, counts, title, color in ((axes[0], duplicates, "duplicates by kind", ACCENT),
                                         (axes[1], quarantine, "quarantined by reason", "#d4444f")):
            if not counts:
                ax.set_title(title, loc="left")
                _empty(ax, "none")
                ax.title.set_visible(True)
                continue
            items = sorted(counts.items(), key=lambda kv: kv[1])
            y = np.arange(len(items))
            ax.barh(y, [v for _, v in items], color=color, height=0.55)
            ax.set_yticks(y, [k for k, _ in items])
            ax.set_ylim(-0.7, max(len(items), 2) - 0.3)
            ax.set_title(title, loc="left")
            ax.grid(axis="y", visible=False)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(0, max(counts.values()) * 1.25)
            for yi, (_, v) in zip(y, items):
                ax.annotate(f"{v:,}", (v, yi), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize=9, color=INK)
        return _svg(fig, "rejects")


def rounds(table: list[dict], metric_names: list[str]) -> str:
    """Masks per image per round (bars, left axis) and held-out metrics (lines, right axis)."""
    with rc_context(STYLE):
        fig, (ax,) = _figure(width=FULL, height=3.0)
        if not table:
            _empty(ax, "no rounds")
            return _svg(fig, "rounds")
        x = np.array([r["round"] for r in table])
        mpi = [r.get("masks_per_image") or 0.0 for r in table]
        ax.bar(x, mpi, width=0.35, color=GRID, edgecolor=MUTED, label="masks / image")
        ax.set_xlim(x.min() - 0.8, x.max() + 0.8)
        ax.set_xticks(x, [f"round {r}" for r in x])
        ax.set_ylabel("masks / image")
        ax.grid(axis="x", visible=False)
        handles, labels = ax.get_legend_handles_labels()
        if metric_names:
            right = ax.twinx()
            right.spines["right"].set_visible(True)
            right.grid(False)
            for name, color in zip(metric_names, SERIES):
                ys = [r["held_out"].get(name, np.nan) for r in table]
                right.plot(x, ys, marker="o", color=color, lw=2, label=f"held-out {name}")
            right.set_ylabel("held-out metric")
            top = max([v for r in table for v in r["held_out"].values()] + [0.0])
            right.set_ylim(0, 1.05 if top <= 1 else top * 1.15)  # scores in [0, 1] keep their scale
            h2, l2 = right.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        else:
            ax.text(0.99, 0.95, "no held-out metrics yet (rounds/<round>.json)", ha="right", va="top",
                    transform=ax.transAxes, color="#6b7a8f")
        fig.legend(handles, labels, loc="outside upper left", ncols=min(5, len(labels)))
        ax.set_ylim(0, max(mpi + [1.0]) * 1.15)
        return _svg(fig, "rounds")
