"""Interface layer: a run folder (or a sweep folder) as one self-contained HTML page, ``report.html``.

Open it with any web browser, by double-click or ``file://``; it needs no server and no network: the averages are
embedded as PNG data URIs, the plot is inline SVG, the style and the small sorting script are inline. It shows

- the class averages as a grid (the beautifier's ``beautify/class_averages.mrcs`` when present, else the run's
  ``class_averages.mrcs``), each with its class number, members, stable share, mean pixel error, resolution (when
  known) and score (``jisac.ranking``), in the run's order (similar averages side by side) or by score / members;
- the same numbers as a table sortable by each column (click a header);
- per-generation accounting (accounted particles and accepted classes per generation, plot and table);
- time and memory per stage, the input and every parameter of the run;
- the output files present, each with the programs that read it.

:func:`write_report` also works on a run in progress (no ``summary.json`` yet): it then shows the averages
accepted by the generations finished so far (``main001/generationNNN/``), the newest generation's other averages
and the accounting so far; it reads only those small files, so it is cheap to rewrite after every generation.
:func:`write_sweep_report` writes ``report.html`` in a sweep folder: one row per job, its averages side by side, a
link to the job's own report (written too). Command line: ``python -m jisac.report RUN_OR_SWEEP_DIR``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from pathlib import Path

import numpy as np

from jisac import ranking, sweep
from jisac.io.atomic import atomic_path

REPORT = "report.html"
# Every class image of a run report has this border colour and nothing else on the page uses it, so a
# screenshot shows where each class image landed (tests/test_report.py counts them).
CLASS_BORDER = "#008080"
THUMB_PX = 168  # display size of a class average in the grid (CSS px)

# (file name relative to the run folder, what it is, which programs read it)
FILES = [
    ("class_averages.mrcs", "the class averages, class k at index k (working frame)",
     "RELION (Import: 2D references; relion_display), cryoSPARC (Import Templates), any MRC viewer (IMOD, ChimeraX)"),
    ("class_averages.star", "RELION model table of the averages (rlnReferenceImage, rlnClassDistribution, "
     "jisacMembers)", "RELION (relion_display, Subset selection), starfile/pandas"),
    ("ordered_class_averages.hdf", "the averages with their members (EMAN.members, n_objects)",
     "SPHIRE (sp_pipe.py isac_substack, sp_compute_isac_avg.py), EMAN2 (e2display.py)"),
    ("particles.star", "every input particle: rlnClassNumber (0 = unaccounted), rlnAnglePsi, rlnOriginX/YAngst, "
     "jisacMirror, jisacPixelError", "RELION 3.1+ (any particle job), cryoSPARC (Import Particle Stack)"),
    ("accounted.star", "the accounted particles only", "RELION 3.1+, cryoSPARC (Import Particle Stack)"),
    ("selected_particles.star", "a substack chosen with python -m jisac.select",
     "RELION 3.1+, cryoSPARC (Import Particle Stack)"),
    ("class_averages.png", "a labelled montage of the averages", "any image viewer"),
    ("processed_images.txt", "0-based indices of the accounted particles", "SPHIRE (isac_substack)"),
    ("not_processed_images.txt", "0-based indices of the unaccounted particles", "SPHIRE"),
    ("all_parameters.txt", "alignment parameters per particle (angle, sx, sy, mirror; working frame)", "SPHIRE"),
    ("particle_classes.txt", "class number and pixel error per particle", "NumPy (np.loadtxt), any text tool"),
    ("summary.json", "counts per generation, times, memory, parameters", "scripts (JSON), jisac.sweep"),
    ("beautify/class_averages.mrcs", "the beautifier's averages at the input pixel size",
     "RELION, cryoSPARC, any MRC viewer"),
    ("beautify/class_averages.star", "the beautifier's class table", "RELION, starfile/pandas"),
    ("cli.log", "the run's log", "a text editor"),
    ("checkpoint/state.npz", "the state after the last finished generation", "jisac (restart)"),
]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em 2em;color:#222;background:#fff;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
.status{color:#555}.status b{color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}td.l,th.l{text-align:left}
th{background:#f2f2f2}table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.cls{margin:0;width:%(thumb)dpx;font-size:.78em;line-height:1.25}
img.avg{width:%(thumb)dpx;height:%(thumb)dpx;border:4px solid %(border)s;box-sizing:content-box;display:block}
img.other{width:%(thumb)dpx;height:%(thumb)dpx;border:4px solid #bbb;box-sizing:content-box;display:block}
img.thumb{width:64px;height:64px;margin:1px;border:1px solid #999}
figcaption b{font-size:1.1em}.muted{color:#888}.bad{color:#b00}
code{background:#f4f4f4;padding:0 3px}
""" % {"thumb": THUMB_PX - 8, "border": CLASS_BORDER}

_JS = """
function sortTable(th){const table=th.closest('table'),body=table.tBodies[0],i=th.cellIndex;
const dir=th.dataset.dir==='asc'?'desc':'asc';table.querySelectorAll('th').forEach(h=>delete h.dataset.dir);
th.dataset.dir=dir;const key=r=>{const c=r.cells[i],v=(c.dataset.v!==undefined?c.dataset.v:c.textContent).trim();
const f=parseFloat(v);return v===''?null:(isNaN(f)?v:f);};
const rows=Array.from(body.rows).sort((a,b)=>{const x=key(a),y=key(b);if(x===null)return 1;if(y===null)return -1;
const c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));return dir==='asc'?c:-c;});
rows.forEach(r=>body.appendChild(r));}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortTable(th)));
const order=document.getElementById('order');
if(order){order.addEventListener('change',()=>{const grid=document.getElementById('classes-grid'),k=order.value;
const figs=Array.from(grid.children).sort((a,b)=>k==='class'?a.dataset.class-b.dataset.class:
(parseFloat(b.dataset[k])||-1)-(parseFloat(a.dataset[k])||-1));figs.forEach(f=>grid.appendChild(f));});}
"""


# ------------------------------------------------------------------------------------------------ small pieces


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(image: np.ndarray) -> str:
    """A 2D image as an 8-bit grey PNG data URI, contrast from its 0.5th to 99.5th percentile (row 0 at the
    top, as the montage and RELION's display show it)."""
    from PIL import Image  # Pillow: matplotlib's own PNG writer, installed with it

    img = np.asarray(image, np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    grey = np.round(255 * np.clip((img - lo) / (hi - lo), 0, 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _num(x, fmt: str = "{:.3g}", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, (int, np.integer)):
        return f"{x}{unit}"
    return fmt.format(x) + unit


def _kv_table(pairs, header=("", "")) -> str:
    rows = "".join(f"<tr><td class=l>{_e(k)}</td><td class=l>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table><thead><tr><th class=l>{_e(header[0])}</th><th class=l>{_e(header[1])}</th></tr></thead>" \
           f"<tbody>{rows}</tbody></table>"


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n<script>{_JS}</script></body></html>\n")


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ the run's data


def _generation_folders(run_dir: Path) -> list[Path]:
    """Finished generation folders (with a ``finished`` file), oldest first."""
    return [f for f in sorted((run_dir / "main001").glob("generation[0-9][0-9][0-9]")) if (f / "finished").is_file()]


def _history_from_folders(run_dir: Path) -> list[dict]:
    history = []
    for f in _generation_folders(run_dir):
        line = ranking.read_json(f / "finished")
        if isinstance(line, dict):
            history.append(line)
    return history


def _display_averages(run_dir: Path, k: int) -> tuple[np.ndarray | None, str]:
    """The averages to show and where they came from: the beautifier's when present with ``k`` images."""
    for path in (run_dir / "beautify" / "class_averages.mrcs", run_dir / "class_averages.mrcs"):
        if path.is_file():
            avgs = ranking.read_stack(path)
            if avgs is not None and len(avgs) == k:
                return avgs, path.relative_to(run_dir).as_posix()
    return None, ""


# ------------------------------------------------------------------------------------------------ sections


def _class_grid(avgs: np.ndarray, table) -> str:
    figs = []
    for i, row in enumerate(table.itertuples(index=False)):
        parts = [f"<b>#{row[0]}</b> &middot; {int(row.members)} members"]
        stable = _num(100 * row.stable_fraction, "{:.0f}", "&nbsp;%")  # (no line break inside a number)
        err = _num(row.mean_pixel_error, "{:.2f}", "&nbsp;px")
        parts.append(f"stable&nbsp;{stable} &middot; err&nbsp;{err}" if err else f"stable&nbsp;{stable}")
        res = _num(row.resolution_angst, "{:.1f}", "&nbsp;&Aring;")
        parts.append((f"{res} &middot; " if res else "") + f"score {row.score:.2f}")
        figs.append(
            f"<figure class=cls id=class-{row[0]} data-class={row[0]} data-score={row.score:.4f} "
            f"data-members={int(row.members)}><img class=avg alt='class {row[0]}' src='{png_data_uri(avgs[i])}'>"
            f"<figcaption>{'<br>'.join(parts)}</figcaption></figure>")
    return "<div class=grid id=classes-grid>" + "".join(figs) + "</div>"


def _class_table_html(table) -> str:
    head = ["class", "members", "stable (%)", "mean pixel error (px)", "resolution (&Aring;)", "score"]
    rows = []
    for row in table.itertuples(index=False):
        cells = [(row[0], str(row[0])), (int(row.members), str(int(row.members))),
                 (row.stable_fraction, _num(100 * row.stable_fraction, "{:.1f}")),
                 (row.mean_pixel_error, _num(row.mean_pixel_error, "{:.3f}")),
                 (row.resolution_angst, _num(row.resolution_angst, "{:.2f}")), (row.score, f"{row.score:.3f}")]
        tds = "".join(f"<td data-v='{'' if not np.isfinite(v) else v}'>{t}</td>" for v, t in cells)
        rows.append(f"<tr>{tds}</tr>")
    ths = "".join(f"<th>{h}</th>" for h in head)
    return f"<table class=sortable id=class-table><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def generations_svg(history: list[dict], total: int | None = None, width: int = 620, height: int = 240) -> str:
    """Inline SVG: accounted particles so far (bars, left axis) and accepted classes (line, right axis) per
    generation."""
    if not history:
        return "<p class=muted>no generation finished yet</p>"
    g = [h.get("generation", i + 1) for i, h in enumerate(history)]
    acc = [h.get("accounted_total", 0) for h in history]
    cls = [h.get("accepted_classes", 0) for h in history]
    left, right, top, bottom = 60, 50, 20, 40
    w, h = width - left - right, height - top - bottom
    ymax = max(total or 0, max(acc), 1)
    cmax = 4 * max(math.ceil(max(cls) * 1.25 / 4), 1)  # headroom above the line; whole-number ticks
    step = w / len(g)
    out = [f"<svg id=generations-plot width={width} height={height} viewBox='0 0 {width} {height}' role=img "
           "aria-label='accounted particles and accepted classes per generation' font-size=11 "
           "font-family='sans-serif'>"]
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + h * (1 - frac)
        out.append(f"<line x1='{left}' x2='{left + w}' y1='{y:.1f}' y2='{y:.1f}' stroke='#e5e5e5'/>")
        out.append(f"<text x={left - 5} y={y + 4:.1f} text-anchor=end fill='#3182bd'>{ymax * frac:.0f}</text>")
        out.append(f"<text x={left + w + 5} y={y + 4:.1f} fill='#d62728'>{cmax * frac:.0f}</text>")
    pts = []
    for i, (gi, a, c) in enumerate(zip(g, acc, cls)):
        x = left + step * i
        bh = h * a / ymax
        out.append(f"<rect x={x + step * 0.15:.1f} y={top + h - bh:.1f} width={step * 0.7:.1f} height={bh:.1f} "
                   f"fill='#9ecae1'><title>generation {gi}: {a} accounted</title></rect>")
        out.append(f"<text x={x + step / 2:.1f} y={top + h + 15} text-anchor=middle>{gi}</text>")
        pts.append(f"{x + step / 2:.1f},{top + h * (1 - c / cmax):.1f}")
    # (every attribute quoted: an unquoted value before "/>" would swallow the slash and leave the tag open)
    out.append(f"<polyline points='{' '.join(pts)}' fill='none' stroke='#d62728' stroke-width='2'/>")
    out += [f"<circle cx='{p.split(',')[0]}' cy='{p.split(',')[1]}' r='3.5' fill='#d62728'/>" for p in pts]
    out.append(f"<text x={left + w / 2} y={height - 5} text-anchor=middle>generation</text>")
    out.append(f"<text x={left + 5} y={top - 6} fill='#3182bd'>&#9632; accounted particles so far</text>"
               f"<text x={left + w - 5} y={top - 6} text-anchor=end fill='#d62728'>&#9679; accepted classes</text>")
    out.append(f"<text x=12 y={top + h / 2} text-anchor=middle fill='#3182bd' transform='rotate(-90 12 {top + h / 2})'>"
               "accounted particles (total)</text>")
    out.append(f"<text x={width - 8} y={top + h / 2} text-anchor=middle fill='#d62728' "
               f"transform='rotate(90 {width - 8} {top + h / 2})'>accepted classes</text>")
    out.append("</svg>")
    return "".join(out)


def _generations_table(history: list[dict]) -> str:
    cols = [("generation", "generation"), ("particles", "particles in"), ("classes", "classes"),
            ("accepted_classes", "accepted"), ("accounted", "accounted"), ("accounted_total", "accounted so far"),
            ("sac_rounds", "SAC rounds"), ("seconds", "seconds")]
    head = "".join(f"<th>{_e(t)}</th>" for _, t in cols)
    rows = "".join("<tr>" + "".join(f"<td>{_e(_num(h.get(k), '{:.1f}'))}</td>" for k, _ in cols) + "</tr>"
                   for h in history)
    return f"<table class=sortable id=generation-table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _resources(summary: dict) -> str:
    parts = []
    seconds = summary.get("seconds") or {}
    if seconds:
        parts.append("<h3>Time per stage</h3>" + _kv_table(
            [(k, _num(v, "{:.2f}", " s")) for k, v in seconds.items()], ("stage", "wall time")))
    memory = summary.get("memory") or {}
    stages = memory.get("stages") or {}
    if stages:
        keys = list(dict.fromkeys(k for s in stages.values() for k in (s or {})))
        head = "<th class=l>after stage</th>" + "".join(f"<th>{_e(k.replace('_mb', ' (MB)'))}</th>" for k in keys)
        rows = "".join(f"<tr><td class=l>{_e(name)}</td>"
                       + "".join(f"<td>{_e(_num((s or {}).get(k), '{:.1f}'))}</td>" for k in keys) + "</tr>"
                       for name, s in stages.items())
        parts.append("<h3>Memory</h3>"
                     f"<p>{_e(memory.get('devices', '?'))} device(s), {_e(memory.get('processes', '?'))} process(es)"
                     f"; peak resident memory {_e(_num(summary.get('peak_rss_mb'), '{:.1f}', ' MB'))}</p>"
                     f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    elif summary.get("peak_rss_mb") is not None:
        parts.append(f"<p>peak resident memory {_e(_num(summary['peak_rss_mb'], '{:.1f}', ' MB'))}</p>")
    return "".join(parts) or "<p class=muted>not recorded yet</p>"


def _files(run_dir: Path) -> str:
    rows = []
    for name, what, readers in FILES:
        if (run_dir / name).exists():
            rows.append(f"<tr><td class=l><a href='{_e(name)}'>{_e(name)}</a></td><td class=l>{_e(what)}</td>"
                        f"<td class=l>{_e(readers)}</td></tr>")
    folders = _generation_folders(run_dir)
    if folders:
        rows.append(f"<tr><td class=l><a href='main001/'>main001/</a></td><td class=l>each generation's averages "
                    f"(all: class_averages.mrcs, accepted: good_class_averages.mrcs); {len(folders)} finished"
                    "</td><td class=l>any MRC viewer, RELION</td></tr>")
    return ("<table><thead><tr><th class=l>file</th><th class=l>what</th><th class=l>read by</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _parameters(summary: dict) -> str:
    pairs = [("input", summary.get("input", "?"))]
    cache = summary.get("cache") or {}
    if cache:
        pairs.append(("preprocessing cache", f"{cache.get('status', '?')} {cache.get('key', '')}".strip()))
    params = summary.get("parameters") or {}
    return _kv_table(pairs + sorted(params.items()), ("parameter", "value"))


# ------------------------------------------------------------------------------------------------ the pages


def _finished_body(run_dir: Path, summary: dict) -> str:
    table = ranking.class_table(run_dir)
    k = len(table)
    avgs, source = _display_averages(run_dir, k)
    n, accounted = summary.get("particles", 0), summary.get("accounted", 0)
    head = (f"<p class=status><b>finished</b>: {k} classes, {accounted}/{n} particles accounted "
            f"({100 * summary.get('accounted_fraction', 0):.1f} %), median pixel error "
            f"{_e(_num(summary.get('median_pixel_error'), '{:.3f}', ' px'))}, "
            f"{len(summary.get('generations') or [])} generation(s), "
            f"{_e(_num((summary.get('seconds') or {}).get('total'), '{:.0f}', ' s'))} in all</p>")
    if k and avgs is not None:
        classes = (f"<p>From <code>{_e(source)}</code>, in the run's order (each average beside the most similar "
                   "ones). <label>Order by <select id=order><option value=class>class number</option>"
                   "<option value=score>score</option><option value=members>members</option></select></label>. "
                   "<i>stable</i>: the share of the class's candidates that passed the stability test; "
                   "<i>error</i>: its members' mean pixel error; <i>score</i>: 0 to 1, see "
                   "<a href='#score'>below</a>.</p>" + _class_grid(avgs, table)
                   + "<h3>Class table (click a column to sort)</h3>" + _class_table_html(table)
                   + "<p id=score class=muted>Score: the weighted mean of the stable share (0.4), the signal kept "
                   "at half Nyquist under the class's pixel-error spread (0.3), Nyquist over the resolution when "
                   "known (0.2) and size n/(n + img_per_grp/2) (0.1); see jisac/ranking.py.</p>")
    elif k:
        classes = "<p class=bad>class_averages.mrcs is missing or unreadable</p>"
    else:
        classes = "<p class=bad>no class was accepted</p>"
    return head + "<h2>Class averages</h2>" + classes + _common_sections(run_dir, summary,
                                                                          summary.get("generations") or [], n)


def _in_progress_body(run_dir: Path) -> str:
    history = _history_from_folders(run_dir)
    folders = _generation_folders(run_dir)
    n = history[0]["particles"] if history else None
    if not history:
        return ("<p class=status><b>in progress</b>: no generation finished yet</p>"
                + _common_sections(run_dir, {}, history, n))
    last = history[-1]
    head = (f"<p class=status><b>in progress</b>: {len(history)} generation(s) finished, "
            f"{last.get('accounted_total', 0)}/{n} particles accounted so far; this page is rewritten after "
            "every generation</p>")
    figs = []
    for folder in folders:
        good = ranking.read_stack(folder / "good_class_averages.mrcs")
        for j, img in enumerate(good if good is not None else []):
            g = int(folder.name[len("generation"):])
            figs.append(f"<figure class=cls id=class-g{g}-{j + 1}><img class=avg alt='generation {g} class {j + 1}' "
                        f"src='{png_data_uri(img)}'><figcaption><b>generation {g}</b>, accepted {j + 1}"
                        "</figcaption></figure>")
    body = (f"<h2>Accepted so far ({len(figs)})</h2><p class=muted>class numbers are given when the run ends "
            "(ordered by similarity)</p><div class=grid id=classes-grid>" + "".join(figs) + "</div>")
    newest = ranking.read_stack(folders[-1] / "class_averages.mrcs")
    good = ranking.read_stack(folders[-1] / "good_class_averages.mrcs")
    if newest is not None:
        rejected = [img for img in newest if good is None or not any(np.array_equal(img, x) for x in good)]
        if rejected:
            body += (f"<h3>Not accepted in generation {last.get('generation')} ({len(rejected)})</h3>"
                     "<div class=grid>" + "".join(
                         f"<figure class=cls><img class=other alt='not accepted' src='{png_data_uri(img)}'>"
                         "</figure>" for img in rejected) + "</div>")
    return head + body + _common_sections(run_dir, {}, history, n)


def _common_sections(run_dir: Path, summary: dict, history: list, n) -> str:
    return ("<h2>Generations</h2>" + generations_svg(history, n) + _generations_table(history)
            + "<h2>Time and memory</h2>" + _resources(summary)
            + "<h2>Input and parameters</h2>" + (_parameters(summary) if summary else
                                                 "<p class=muted>in summary.json when the run ends</p>")
            + "<h2>Files</h2>" + _files(run_dir))


def write_report(run_dir) -> Path:
    """Writes ``run_dir/report.html`` (atomically) for a finished run or one in progress; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    summary = ranking.read_json(run_dir / "summary.json")
    title = f"jisac run {run_dir.resolve().name}"
    body = _finished_body(run_dir, summary) if isinstance(summary, dict) else _in_progress_body(run_dir)
    return _write(run_dir / REPORT, _page(title, f"<h1>{_e(title)}</h1><p class=muted>{_e(run_dir.resolve())}</p>"
                                          + body))


# ------------------------------------------------------------------------------------------------ sweeps


def write_sweep_report(sweep_dir, max_averages: int = 60) -> Path:
    """Writes ``sweep_dir/report.html``: a row per job (swept values, status, classes, accounted share, a link
    to the job's ``report.html``, written here too) with the job's averages side by side (the first
    ``max_averages``)."""
    sweep_dir = Path(sweep_dir)
    table, swept, common = sweep.collect(sweep_dir)
    if table.empty:
        raise FileNotFoundError(f"{sweep_dir}: no sweep job folders (with .hydra/overrides.yaml) found")
    rows = []
    for _, r in table.iterrows():
        job = sweep_dir / r["job"]
        link = ""
        if (job / "summary.json").is_file() or _generation_folders(job):
            write_report(job)
            link = f"<a href='{_e(r['job'])}/{REPORT}'>report</a>"
        avgs = ranking.read_stack(job / "class_averages.mrcs") if r["status"] == "ok" else None
        thumbs = "".join(f"<img class=thumb alt='job {_e(r['job'])} class {i + 1}' title='class {i + 1}' "
                         f"src='{png_data_uri(a)}'>" for i, a in enumerate(avgs[:max_averages])) if avgs is not None \
            else f"<span class=bad>{_e(r['status'])}: {_e(r['error'])}</span>" if r["status"] != "ok" else ""
        acc = r["accounted_fraction"]
        cells = [f"<td class=l>{_e(r['job'])}</td>", *(f"<td>{_e(r[k])}</td>" for k in swept),
                 f"<td class=l>{_e(r['status'])}</td>", f"<td>{_e(_num(r['classes']))}</td>",
                 f"<td data-v='{'' if acc is None or acc != acc else acc}'>"
                 f"{'' if acc is None or acc != acc else f'{100 * acc:.1f} %'}</td>",
                 f"<td>{_e(_num(r['wall_s'], '{:.0f}'))}</td>", f"<td class=l>{link}</td>",
                 f"<td class=l style='min-width:300px'>{thumbs}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = ["job", *swept, "status", "classes", "accounted", "wall (s)", "report", "averages"]
    common_text = (", ".join(f"<code>{_e(k)}={_e(v)}</code>" for k, v in common.items()) or "none")
    body = (f"<h1>jisac sweep {_e(sweep_dir.resolve().name)}</h1><p class=muted>{_e(sweep_dir.resolve())}</p>"
            f"<p>{len(table)} runs, {int((table['status'] == 'ok').sum())} ok. Common to all runs: {common_text}.</p>"
            "<table class=sortable id=sweep-table><thead><tr>"
            + "".join(f"<th class=l>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")
    for name in (sweep.CSV, sweep.MARKDOWN, sweep.PLOT):
        if (sweep_dir / name).exists():
            body += f"<p><a href='{name}'>{name}</a></p>"
    return _write(sweep_dir / REPORT, _page(f"jisac sweep {sweep_dir.resolve().name}", body))


class SweepReport(sweep.SweepSummary):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): when a multirun ends, the sweep summary
    (``sweep.SweepSummary``) and then the sweep's ``report.html`` (each job's report linked, averages side by side).
    A report that cannot be written never changes the sweep's exit status."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            super().on_multirun_end(config, **kwargs)
        finally:
            try:
                write_sweep_report(sweep_dir)
            except Exception as err:  # noqa: BLE001
                print(f"jisac: could not write {sweep_dir / 'report.html'}: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m jisac.report DIR``: writes DIR/report.html for a run folder or a sweep folder."""
    parser = argparse.ArgumentParser(prog="python -m jisac.report", description=main.__doc__)
    parser.add_argument("folder", help="a run folder (output_dir of python -m jisac) or a sweep folder (-m)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        is_sweep = not (folder / "summary.json").is_file() and bool(sweep.job_folders(folder))
        path = write_sweep_report(folder) if is_sweep else write_report(folder)
    except (OSError, ValueError) as err:
        print(f"jisac.report: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
