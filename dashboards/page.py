"""The report's HTML: one self-contained page (inline CSS, inline SVG figures, inline JPEG
thumbnails, no script to run, nothing fetched). Every figure is a <figure> with a stable id
(FIGURE_IDS); the numbers behind the page are in <script type="application/json"
id="report-data">, and each headline number also sits in a data-value attribute."""
from __future__ import annotations

import json
from html import escape

FIGURE_IDS = ("fig-masks-per-image", "fig-relative-size", "fig-centres", "fig-concavity", "fig-scores",
              "fig-funnel", "fig-rejects", "fig-rounds", "fig-gallery")

CSS = """
:root { --ink:#1f2633; --muted:#5d6878; --line:#e3e7ee; --bg:#f4f6fa; --card:#fff; --accent:#2f6fdb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
header { background:#16213a; color:#fff; padding:28px 40px 24px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:650; letter-spacing:.2px; }
header .meta { color:#b8c3d9; font-size:13px; }
header .meta code { color:#fff; background:rgba(255,255,255,.08); padding:1px 6px; border-radius:4px; }
main { max-width:1240px; margin:0 auto; padding:24px 40px 56px; }
.kpis { display:grid; grid-template-columns:repeat(auto-fit,minmax(150px,1fr)); gap:12px; margin:-44px 0 28px; }
.kpi { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px;
  box-shadow:0 1px 2px rgba(20,30,60,.06); }
.kpi .v { font-size:24px; font-weight:650; font-variant-numeric:tabular-nums; }
.kpi .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.5px; }
h2 { font-size:17px; margin:34px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(520px,1fr)); gap:16px; }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px 12px;
  box-shadow:0 1px 2px rgba(20,30,60,.06); }
figure h3 { margin:0 0 6px; font-size:14px; }
main > figure + figure { margin-top:16px; }
figure svg { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:12.5px; margin-top:6px; }
table { border-collapse:collapse; width:100%; max-width:900px; font-size:13px; margin-top:10px; font-variant-numeric:tabular-nums; }
th, td { text-align:right; padding:5px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
th { color:var(--muted); font-weight:600; font-size:12px; }
th.group { text-align:center; border-bottom:none; }
td code { font-size:12px; }
.tiles { display:grid; grid-template-columns:repeat(auto-fill,minmax(260px,1fr)); gap:14px; }
figure.tile { margin:0; border:none; padding:0; box-shadow:none; border-radius:0; }
.tile img { display:block; width:100%; aspect-ratio:4/3; object-fit:contain; border-radius:6px; background:#e9edf3; }
.tile .cap { color:var(--muted); font-size:12px; margin-top:4px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.note { color:var(--muted); font-size:12.5px; }
ul.method { color:var(--muted); font-size:13px; padding-left:18px; }
"""


def _num(v, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def _figure(fig_id: str, title: str, svg: str, caption: str) -> str:
    return (f'<figure id="{fig_id}" data-figure="{fig_id}"><h3>{escape(title)}</h3>{svg}'
            f"<figcaption>{caption}</figcaption></figure>")


def _kpi(key: str, label: str, value, digits: int = 0) -> str:
    return (f'<div class="kpi" id="kpi-{key}" data-value="{value if value is not None else ""}">'
            f'<div class="v">{_num(value, digits)}</div><div class="k">{escape(label)}</div></div>')


def _calibration(c: dict | None) -> str:
    """The automatic stage's calibrated thresholds of a round (engine.calibrate), or a dash."""
    if not c:
        return "–"
    return escape(f"IoU > {c['pred_iou_thresh']:.2f}, stability ≥ {c['stability_score_thresh']:.2f} "
                  f"(precision {c['precision']:.2f} of target {c['target_precision']:.2f})")


def _table(headers: list[str], rows: list[list[str]], table_id: str,
           groups: list[tuple[str, int]] | None = None) -> str:
    """groups: (label, columns spanned) of a header row above the column names."""
    top = ("<tr>" + "".join(f'<th colspan="{n}" class="group">{escape(g)}</th>' for g, n in groups) + "</tr>"
           if groups else "")
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead>{top}<tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _runs(d: dict) -> str:
    """Runs in this version: the version's own images and masks of each run beside the
    whole-run totals of its summary, and which runs the version holds only part of."""
    rows = [[f"<code>{escape(r['run_id'])}</code>", "–" if r["round"] is None else escape(str(r["round"])),
             escape(r["stage"] or "–"), _num(r["images"]),
             _num(r["masks"]), _num(r.get("processed")),
             _num(r.get("annotated")), _num(r.get("duplicate")), _num(r.get("quarantined")),
             _num(r.get("run_masks")), _num(r.get("seconds"), 1), "part" if r["part"] else "all"]
            for r in d["runs"]]
    if not rows:
        return '<p class="note">No runs recorded for this version.</p>'
    table = _table(["run", "round", "stage", "images", "masks", "inputs", "annotated", "duplicate", "quarantined",
                    "masks", "seconds", "in this version"], rows, "runs-table",
                   groups=[("", 3), ("this version", 2), ("whole run (runs/<run_id>.json)", 6), ("", 1)])
    notes = [f"<code>{escape(r['run_id'])}</code>: only part of this run is in version {d['version']}: "
             f"{escape(r['part'])}." for r in d["runs"] if r["part"]]
    if d["images_without_run"]:
        notes.append(f"{d['images_without_run']:,} image(s) of this version carry no run id "
                     "(in none of the rows above).")
    return table + "".join(f'<p class="note">{n}</p>' for n in notes)


def render(data: dict, svgs: dict[str, str], tiles: list[dict]) -> str:
    d = data
    s = d["sample"]
    kpis = "".join([
        _kpi("images", "images", d["images"]), _kpi("masks", "masks", d["masks"]),
        _kpi("masks-per-image", "masks / image", d["mean_masks_per_image"], 1),
        _kpi("duplicates", "duplicates", sum(d["duplicates"].values())),
        _kpi("quarantined", "quarantined", sum(d["quarantine"].values())),
        _kpi("runs", "runs", len(d["runs"])),
    ])
    stages = sorted({st for r in d["rounds"] for st in r["masks_by_stage"]})
    rounds_rows = [[escape(str(r["round"])), _num(r["images"]), _num(r["masks"]),
                    *[_num(r["masks_by_stage"].get(st, 0)) for st in stages], _num(r["masks_per_image"], 2),
                    *[_num(r["held_out"].get(m), 3) if r["held_out"].get(m) is not None else "–"
                      for m in d["held_out_metrics"]],
                    _calibration(r.get("auto_calibration")),
                    {True: "yes", False: "no"}.get(r.get("promoted"), "–")] for r in d["rounds"]]
    tiles_html = "".join(
        f'<figure class="tile" data-image-id="{escape(t["image_id"])}"><img alt="{escape(t["uri"])}" src="{t["src"]}">'
        f'<div class="cap" title="{escape(t["uri"])}">{t["masks"]} masks · {t["width"]}×{t["height"]} · '
        f'{escape(t["uri"].rsplit("/", 1)[-1])}</div></figure>' for t in tiles if "src" in t)
    skipped = [t for t in tiles if "skipped" in t]
    skipped_note = (f'<p class="note">{len(skipped)} sampled image(s) skipped: '
                    + "; ".join(escape(f'{t["uri"].rsplit("/", 1)[-1]} ({t["skipped"]})') for t in skipped) + "</p>"
                    if skipped else "")
    steps, first = d["funnel_steps"], d["funnel_steps"][0][1]
    funnel_rows = [[escape(label), _num(v), f"{v / first:.1%}" if first else "–",
                    _num(steps[i - 1][1] - v) if i else ""] for i, (label, v) in enumerate(steps)]
    # How the version was pinned, unless the version number says it all.
    pinned = "" if d["pinned_by"] == f"version {d['version']}" else f" ({escape(d['pinned_by'])})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>samengine data-quality report · version {d['version']}</title>
<style>{CSS}</style></head>
<body>
<header><h1>Data-quality report</h1>
<div class="meta">dataset <code>{escape(d['root'])}</code> · version <code id="version" data-value="{d['version']}">{d['version']}</code>{pinned}
· generated {escape(d['generated_at'])}</div></header>
<main>
<section class="kpis">{kpis}</section>

<h2>Masks</h2>
<div class="grid">
{_figure("fig-masks-per-image", "Masks per image", svgs["masks_per_image"],
         f"Every image of the version ({d['images']:,}), including {d['images_without_masks']:,} with no mask.")}
{_figure("fig-relative-size", "Relative mask size", svgs["relative_size"],
         f"√(mask area / image area) of every mask ({d['masks']:,}, of which {d['empty_masks']:,} empty); "
         f"mean {_num(d['mean_relative_size'], 3)}. Share of masks per bin.")}
{_figure("fig-centres", "Mask centres", svgs["centres"],
         "Centres of the masks' bounding boxes (not of the masks themselves), in image-relative "
         f"coordinates, {d['centres_bins']}×{d['centres_bins']} cells; every non-empty mask "
         f"({d['masks'] - d['empty_masks']:,}).")}
{_figure("fig-concavity", "Mask concavity", svgs["concavity"],
         f"1 − area / convex-hull area of decoded RLE masks: <b>a sample</b> of {len(d['concavity']['mask_ids']):,} "
         f"masks from {d['concavity']['images']:,} randomly chosen images (at most {s['max_concavity_masks']:,} masks). "
         "Empty masks are left out; 0 is convex.")}
</div>

<h2>Model scores</h2>
{_figure("fig-scores", "Predicted IoU and stability score", svgs["scores"],
         f"Every mask ({d['masks']:,}); values outside [0, 1] are counted in the end bins"
         + "".join(f"; {n:,} without {k.replace('_', ' ')}" for k, n in d["scores_missing"].items() if n)
         + ". Dashed lines: the filter thresholds of this version's runs (where a filter was on).")}

<h2>Automatic stage yield</h2>
{_figure("fig-funnel", "Candidate masks left after each filter", svgs["funnel"],
         f"<b>Whole-run totals</b>, summed over the run summaries (<code>runs/&lt;run_id&gt;.json</code>) of the "
         f"{len(d['funnel_runs'])} run(s) found for this version"
         + (f"; {len(d['partial_runs'])} of them only partly in this version (see the runs below), so these "
            f"counts include masks this version does not hold (it holds {d['masks']:,})" if d["partial_runs"] else "")
         + ". NMS and small-region cleanup act together between the crop-edge "
         "filter and the kept masks." + _table(["step", "masks", "of candidates", "dropped by this step"], funnel_rows, "funnel-table"))}
<figure id="runs"><h3>Runs in this version</h3>{_runs(d)}
<figcaption>Images and masks: the rows of this version each run wrote (the <code>run_id</code> of the annotations
table). The whole-run columns are each run's own totals from its summary, also counting images committed after
this version or no longer in it.</figcaption></figure>

<h2>Rejected inputs</h2>
{_figure("fig-rejects", "Duplicates and quarantine", svgs["rejects"],
         "Rows of the <code>duplicates</code> and <code>quarantine</code> tables from " + escape(d["side_scope"])
         + "; reasons are the text before the first ':' of the stored reason.")}

<h2>Data-engine rounds</h2>
{_figure("fig-rounds", "Masks per image and held-out metrics by round", svgs["rounds"],
         "Images of a round = those holding a mask tagged with that round, plus those its runs committed "
         "without a mask (as the data engine counts them); masks / image = the round's masks ÷ its images. "
         "Held-out metrics come from <code>rounds/&lt;round&gt;.json</code> (written by the data engine) "
         "where present."
         + _table(["round", "images", "masks", *[f"{st} masks" for st in stages], "masks / image", *[f"held-out {m}" for m in d["held_out_metrics"]],
                   "automatic filters",
                   "promoted"], rounds_rows, "rounds-table"))}

<h2>Sample gallery</h2>
<figure id="fig-gallery" data-figure="fig-gallery"><div class="tiles">{tiles_html or '<p class="note">No image could be shown.</p>'}</div>
<figcaption>The first {len(tiles)} of the randomly sampled images, every mask drawn in its own colour
(largest first, outlines on top).</figcaption>{skipped_note}</figure>

<h2>How this page was computed</h2>
<ul class="method">
<li>One pass over all {d['images']:,} images of version {d['version']}, a row group at a time, reading only the small
mask columns (no RLE): masks per image, sizes, centres and scores are exact.</li>
<li>Random sample: the {s['images']:,} images with the smallest SHA-256 of their <code>image_id</code>
(uniform, the same on every report of this version). Concavity and the gallery use it; only the row groups
holding it were read with their RLE.</li>
<li>Funnel and the run table's whole-run columns: the run summaries in <code>runs/</code> (whole runs); each run's
images and masks in this version: the pass above; rounds: <code>rounds/*.json</code>.</li>
</ul>
<script type="application/json" id="report-data">{_json_for_html(data)}</script>
</main></body></html>
"""


def _json_for_html(data: dict) -> str:
    # "</" would end the script element early; JSON allows the escaped form.
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
