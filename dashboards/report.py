"""Static HTML pages: one report per SAE run, and a comparison across runs (no server, no CDN).

The run report holds the summary metrics, training curves, the feature-density histogram and a
card per feature (top examples with the activating token highlighted, top logits, cluster and
nearest feature), most frequent first, `PAGE` cards a page, with a search box over every
feature (also from the URL: `#q=word&page=2`). The features travel as compact JSON rendered by
the page's script, so a dictionary of 262,144 features stays one file that opens offline: every
feature keeps `INDEX_EXAMPLES` examples, the `RICH` most frequent all of theirs. The
comparison page plots L0 against explained variance and against loss recovered, one point per
run. Plots are inline SVG: the pages open anywhere, offline, and are logged to MLflow as is.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

PAGE = 200
"""Feature cards a page of the report shows."""
RICH = 2000
"""The most frequent features keep all their top examples in the report; the others keep
`INDEX_EXAMPLES` (every example is in the SQL views)."""
INDEX_EXAMPLES = 2
"""Top examples the report keeps of each feature beyond the `RICH` most frequent."""

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table.m td{padding:2px 12px 2px 0}.plots{display:flex;gap:16px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:8px 0}
.card h3{font-size:14px;margin:0 0 4px}.ex{font-family:monospace;white-space:pre-wrap;
font-size:12px;margin:2px 0}mark{background:#fd6;font-weight:bold}.meta{color:#666;font-size:12px}
svg text{font-size:10px;fill:#444}#q{width:320px;padding:4px}
"""

_SEARCH = r"""
const rows = JSON.parse(document.getElementById('features').textContent);
const PAGE = PAGE_SIZE, q = document.getElementById('q'), box = document.getElementById('cards');
const count = document.getElementById('shown'), where = document.getElementById('page');
const hay = rows.map(r => ('feature ' + r[0] + ' ' + r[6].join(' ') + ' ' +
  r[7].map(e => e[1]).join(' ')).toLowerCase());
let hits = rows, page = 0;
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
  '"': '&quot;', "'": '&#39;'})[c]);
const mark = s => esc(s).replace(/\u00ab([\s\S]*?)\u00bb/g, '<mark>$1</mark>');
const g = v => String(Number(Number(v).toPrecision(3)));
function card(r) {
  const ex = r[7].map(e => `<div class="ex">${g(e[0])}  ${mark(e[1])}</div>`).join('');
  return `<div class="card" id="f${r[0]}"><h3>feature ${r[0]}</h3><div class="meta">freq ` +
    `${g(r[1])} · max ${g(r[2])} · cluster ${r[3] ?? '–'} · nearest ${r[4]} (cos ` +
    `${Number(r[5]).toFixed(2)})</div><div class="meta">top logits: ${r[6].map(esc).join(', ')}` +
    `</div>${ex || '<div class="meta">never active on the evaluation tokens</div>'}</div>`;
}
function render() {
  const pages = Math.max(1, Math.ceil(hits.length / PAGE));
  page = Math.min(Math.max(page, 0), pages - 1);
  box.innerHTML = hits.slice(page * PAGE, (page + 1) * PAGE).map(card).join('');
  count.textContent = hits.length;
  where.textContent = `page ${page + 1} of ${pages}`;
}
function filter() {
  const s = q.value.toLowerCase();
  hits = s ? rows.filter((r, i) => hay[i].includes(s)) : rows;
  page = 0; render();
}
q.addEventListener('input', filter);
document.getElementById('prev').onclick = () => { page -= 1; render(); };
document.getElementById('next').onclick = () => { page += 1; render(); };
const h = new URLSearchParams(location.hash.slice(1));
q.value = h.get('q') || '';
filter();
page = (parseInt(h.get('page')) || 1) - 1; render();
""".replace("PAGE_SIZE", str(PAGE))


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _e(value)


def _empty(w: int, h: int, text: str) -> str:
    return f"<svg width='{w}' height='{h}'><text x='10' y='20'>{_e(text)}</text></svg>"


def line_plot(points: list[tuple[float, float]], title: str, w: int = 360, h: int = 180) -> str:
    """An SVG line chart of (x, y) points with min/max labels."""
    pts = [(x, y) for x, y in points if math.isfinite(y)]
    if not pts:
        return (
            f"<svg width='{w}' height='{h}'><text x='10' y='20'>{_e(title)}: no data</text></svg>"
        )
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (w - 50) / ((x1 - x0) or 1)
    sy = (h - 40) / ((y1 - y0) or 1)
    path = " ".join(f"{40 + (x - x0) * sx:.1f},{h - 20 - (y - y0) * sy:.1f}" for x, y in pts)
    return (
        f"<svg width='{w}' height='{h}' class='plot'><text x='40' y='12'>{_e(title)}</text>"
        f"<text x='0' y='{h - 20}'>{y0:.3g}</text><text x='0' y='24'>{y1:.3g}</text>"
        f"<text x='40' y='{h - 4}'>{x0:.4g}</text><text x='{w - 40}' y='{h - 4}'>{x1:.4g}</text>"
        f"<polyline fill='none' stroke='#36c' stroke-width='1.5' points='{path}'/></svg>"
    )


def scatter_plot(
    points: list[tuple[float, float, str]], xlabel: str, ylabel: str, w: int = 420, h: int = 300
) -> str:
    """An SVG scatter of (x, y, label) with each point's label as its tooltip."""
    pts = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        return _empty(w, h, f"no runs with {xlabel}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (w - 70) / ((x1 - x0) or 1)
    sy = (h - 50) / ((y1 - y0) or 1)
    dots = "".join(
        f"<circle cx='{50 + (x - x0) * sx:.1f}' cy='{h - 30 - (y - y0) * sy:.1f}' r='4' "
        f"fill='#c33'><title>{_e(label)}: {xlabel}={x:.4g}, {ylabel}={y:.4g}</title></circle>"
        for x, y, label in pts
    )
    return (
        f"<svg width='{w}' height='{h}' class='plot'>"
        f"<text x='50' y='{h - 4}'>{_e(xlabel)} {x0:.3g} … {x1:.3g}</text>"
        f"<text x='0' y='12'>{_e(ylabel)} {y0:.3g} … {y1:.3g}</text>{dots}</svg>"
    )


def density_histogram(freqs: list[float], bins: int = 30, w: int = 420, h: int = 180) -> str:
    """SVG histogram of log10(feature frequency); dead features (freq 0) counted apart."""
    live = [math.log10(f) for f in freqs if f > 0]
    dead = len(freqs) - len(live)
    title = f"log10 feature density ({dead} dead)"
    if not live:
        return _empty(w, h, title)
    lo, hi = min(live), max(live)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in live:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    top = max(counts)
    bw = (w - 40) / bins
    bars = "".join(
        f"<rect x='{30 + i * bw:.1f}' y='{h - 20 - c / top * (h - 40):.1f}' width='{bw - 1:.1f}' "
        f"height='{c / top * (h - 40):.1f}' fill='#6a6'><title>{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (
        f"<svg width='{w}' height='{h}' class='plot'><text x='30' y='12'>{title}</text>{bars}"
        f"<text x='30' y='{h - 4}'>{lo:.2f}</text><text x='{w - 40}' y='{h - 4}'>{hi:.2f}</text>"
        "</svg>"
    )


def _highlight(text: str) -> str:
    """Escape the example and turn its «token» into <mark>token</mark>."""
    return re.sub(r"«(.*?)»", r"<mark>\1</mark>", _e(text), flags=re.S)


def feature_rows(features: pa.Table) -> list[list[Any]]:
    """The report's compact rows, most frequent first: [id, freq, max_act, cluster, nearest,
    nearest_cos, top logits, [[activation, example text], ...]]."""
    n = features.num_rows
    if n == 0:
        return []
    order = pc.sort_indices(features, [("freq", "descending"), ("feature_id", "ascending")])
    t = features.take(order)

    def col(name: str, default: Any) -> list[Any]:
        return t.column(name).to_pylist() if name in t.column_names else [default] * n

    ids, freq, top = col("feature_id", None), col("freq", 0.0), col("max_act", 0.0)
    cluster, near, cos = col("cluster_id", None), col("nearest_feature", -1), col("nearest_cos", 0)
    logits, examples = col("top_logits", []), col("top_examples", [])
    return [
        [ids[i], freq[i], top[i], cluster[i], near[i], cos[i], logits[i] or [],
         [[e["activation"], e["text"]] for e in (examples[i] or [])[: None if i < RICH else
                                                                    INDEX_EXAMPLES]]]
        for i in range(n)
    ]  # fmt: skip


def _json(value: Any) -> str:
    """JSON for a script element's text, which is not HTML-decoded: only "<" is escaped
    (\\u003c is the same character to a JSON parser), so no "</script>" or "<!--" ends it."""
    return json.dumps(value, default=str, separators=(",", ":")).replace("<", "\\u003c")


def run_report(
    run: dict[str, Any],
    metrics: dict[str, float],
    history: dict[str, list[tuple[float, float]]],
    features: pa.Table,
) -> str:
    """The HTML report of one SAE run: `run` holds id, name and params to show; `history` maps a
    metric name to its (step, value) points."""
    freqs = features.column("freq").to_pylist() if features.num_rows else []
    summary = "".join(
        f"<tr><td>{_e(k)}</td><td>{_num(v)}</td></tr>" for k, v in sorted(metrics.items())
    )
    params = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in run.items())
    curves = "".join(line_plot(points, name) for name, points in sorted(history.items()))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>saeflow · {_e(run.get('run_name', ''))}</title><style>{_STYLE}</style></head>"
        f"<body><h1>SAE run {_e(run.get('run_name', ''))} "
        f"<span class='meta'>{_e(run.get('run_id', ''))}</span></h1>"
        f"<h2>Summary</h2><div class='plots'><table class='m'>{params}</table>"
        f"<table class='m' id='metrics'>{summary}</table></div>"
        f"<h2>Training</h2><div class='plots'>{curves}</div>"
        f"<h2>Feature density</h2>{density_histogram(freqs)}"
        f"<h2>Features (<span id='shown'>{len(freqs)}</span> of {len(freqs)} match)</h2>"
        "<input id='q' placeholder='search examples, logits, feature ids'> "
        "<button id='prev'>‹ previous</button> <span id='page'></span> "
        "<button id='next'>next ›</button><div id='cards'></div>"
        "<script type='application/json' id='features'>"
        f"{_json(feature_rows(features))}</script><script>{_SEARCH}</script></body></html>"
    )


COMPARED = ["run_name", "run_id", "sae_arch", "sae_d_sae", "eval_l0",
            "eval_explained_variance", "eval_loss_recovered", "eval_dead_frac"]  # fmt: skip
"""The comparison table's columns (runs_table names), after any `extra` ones."""


def comparison(runs: list[dict[str, Any]], title: str = "Runs compared", extra: tuple = ()) -> str:
    """The HTML comparison of runs: dicts with run_id, run_name and eval_* metrics."""

    def points(y: str) -> list[tuple[float, float, str]]:
        return [
            (float(r["eval_l0"]), float(r[y]), f"{r.get('run_name')} ({r['run_id'][:8]})")
            for r in runs
            if r.get("eval_l0") is not None and r.get(y) is not None
        ]

    cols = [*extra, *COMPARED]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_num(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in runs
    )
    data = _json([{c: r.get(c) for c in cols} for r in runs])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>saeflow · runs</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)} ({len(runs)})</h1>"
        "<div class='plots'>"
        f"{scatter_plot(points('eval_explained_variance'), 'L0', 'explained variance')}"
        f"{scatter_plot(points('eval_loss_recovered'), 'L0', 'loss recovered')}</div>"
        f"<h2>Table</h2><table class='m' id='runs'><tr>{head}</tr>{body}</table>"
        f"<script type='application/json' id='data'>{data}</script></body></html>"
    )


Layer = tuple[str, list[tuple[float, float, str]]]  # (colour, [(x, y, tooltip)])


def loglog_plot(
    layers: list[Layer],
    xlabel: str,
    ylabel: str,
    fit: tuple[float, float] | None = None,
    mark: tuple[float, float] | None = None,
    w: int = 440,
    h: int = 300,
) -> str:
    """An SVG log-log scatter: layers of dots, the line y = coef·x^exponent of `fit` across the
    x range, and a star at `mark` (an extrapolation, which widens the range)."""
    pts = [(x, y) for _, layer in layers for x, y, _ in layer if x > 0 and y > 0]
    if mark:
        pts.append(mark)
    if not pts:
        return _empty(w, h, f"no points of {ylabel}")
    lx, ly = [math.log10(x) for x, _ in pts], [math.log10(y) for _, y in pts]
    (x0, x1), (y0, y1) = _padded(min(lx), max(lx)), _padded(min(ly), max(ly))
    sx, sy = (w - 70) / (x1 - x0), (h - 50) / (y1 - y0)

    def at(x: float, y: float) -> str:
        return f"{50 + (math.log10(x) - x0) * sx:.1f}' cy='{h - 30 - (math.log10(y) - y0) * sy:.1f}"

    parts = []
    if fit:
        coef, exponent = fit
        ends = [10**x0, 10**x1]
        xy = [(50 + (math.log10(x) - x0) * sx, h - 30 - (math.log10(coef * x**exponent) - y0) * sy)
              for x in ends]  # fmt: skip
        parts.append(
            f"<line x1='{xy[0][0]:.1f}' y1='{xy[0][1]:.1f}' x2='{xy[1][0]:.1f}' "
            f"y2='{xy[1][1]:.1f}' stroke='#36c' stroke-dasharray='4 3'/>"
        )
    for colour, layer in layers:
        parts += [
            f"<circle cx='{at(x, y)}' r='4' fill='{colour}'><title>{_e(tip)}: "
            f"{xlabel}={x:.4g}, {ylabel}={y:.4g}</title></circle>"
            for x, y, tip in layer
            if x > 0 and y > 0
        ]
    if mark:
        parts.append(
            f"<circle cx='{at(*mark)}' r='7' fill='none' stroke='#36c' stroke-width='2'>"
            f"<title>extrapolated: {xlabel}={mark[0]:.4g}, {ylabel}={mark[1]:.4g}</title></circle>"
        )
    # the frame and ticks as paths: the fit is the plot's only <line>
    bottom = h - 30
    axes = [f"<path d='M50,20 V{bottom} H{w - 20}' fill='none' stroke='#999'/>"]
    for t in _log_ticks(x0, x1):
        x = 50 + (t - x0) * sx
        axes.append(f"<path d='M{x:.1f},{bottom} v4' stroke='#999'/><text x='{x:.1f}' "
                    f"y='{bottom + 14}' text-anchor='middle'>{_tick(t)}</text>")  # fmt: skip
    for t in _log_ticks(y0, y1):
        y = bottom - (t - y0) * sy
        axes.append(f"<path d='M50,{y:.1f} h-4' stroke='#999'/><text x='44' y='{y + 3:.1f}' "
                    f"text-anchor='end'>{_tick(t)}</text>")  # fmt: skip
    return (
        f"<svg width='{w}' height='{h}' class='plot'>"
        f"<text x='50' y='{h - 2}'>{_e(xlabel)} (log)</text>"
        f"<text x='0' y='12'>{_e(ylabel)} (log)</text>"
        f"{''.join(parts)}{''.join(axes)}</svg>"
    )


def _fixed(v: float) -> str:
    """Three decimals, with no "-0.000" for an exponent that rounds to zero."""
    text = f"{v:.3f}"
    return "0.000" if text == "-0.000" else text


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """A log10 range with 5% room at each end, and half a decade around a single value (a
    flat series, such as the same best lr at every budget, then sits mid-plot)."""
    if hi - lo < 1e-9:
        return lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of ticks in [lo, hi]: the decades, or 1-2-5 steps in a narrow range."""
    steps = (
        (1,),
        (1, 3),
        (1, 2, 5),
        (1, 1.5, 2, 3, 5, 7),
        (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
    )
    for mantissas in steps:
        ticks = [
            math.log10(m) + e
            for e in range(math.floor(lo), math.ceil(hi) + 1)
            for m in mantissas
            if lo <= math.log10(m) + e <= hi
        ]
        if len(ticks) >= 3:
            return ticks
    return ticks


def _tick(t: float) -> str:
    """A tick label: 0.003, 20, 5e+09, 1.5e+09."""
    v = 10**t
    return f"{v:.4g}" if 1e-3 <= v < 1e4 else f"{v:.2g}"


def scaling_page(
    points: list[dict[str, Any]],
    fits: list[dict[str, Any]],
    budget: float,
    families: list[dict[str, Any]],
    arch: str,
) -> str:
    """The scaling study's HTML: loss and FVU vs compute (every SAE, the compute-efficient
    ones, the fit), the best d_sae, tokens and lr vs compute with their fits, the fitted
    exponents, the recommendation at `budget`, and split families with top examples."""
    law = {f["quantity"]: f for f in fits}

    def layer(y: str, pick: str | None, colour: str) -> Layer:
        return (
            colour,
            [
                (
                    p["compute"],
                    float(p[y]),
                    f"d_sae={p['d_sae']} tokens={p['tokens']} lr={p['lr']:g}",
                )
                for p in points
                if pick is None or p[pick]
            ],
        )

    def plot(y: str, pick: str, label: str) -> str:
        f = law[y]
        layers = (
            [layer(y, None, "#bbb"), layer(y, pick, "#c33")]
            if y in ("loss", "fvu")
            else [layer(y, pick, "#c33")]
        )
        return loglog_plot(
            layers, "compute (FLOPs)", label, (f["coef"], f["exponent"]), (budget, f["at_budget"])
        )

    rows = "".join(
        f"<tr><td>{_e(f['quantity'])}</td><td>{_fixed(f['exponent'])}</td>"
        f"<td>[{_fixed(f['exponent_lo'])}, {_fixed(f['exponent_hi'])}]</td><td>{f['coef']:.4g}</td>"
        f"<td>{f['n_points']}</td><td>{f['at_budget']:.4g}</td></tr>"
        for f in fits
    )
    cards = []
    for fam in families:
        kids = "".join(
            f"<div class='meta'>child {child} (cos {cos:.2f})</div>"
            + "".join(f"<div class='ex'>{_highlight(t)}</div>" for t in ex)
            for (child, cos), ex in zip(fam["children"], fam["child_examples"], strict=True)
        )
        cards.append(
            f"<div class='card'><h3>feature {fam['parent']} of d_sae={fam['small_d_sae']} → "
            f"{len(fam['children'])} features of d_sae={fam['large_d_sae']}</h3>"
            + "".join(f"<div class='ex'>{_highlight(t)}</div>" for t in fam["parent_examples"])
            + kids
            + "</div>"
        )
    rec = (
        f"At {budget:.3g} FLOPs the fits recommend d_sae ≈ {law['d_sae']['at_budget']:,.0f}, "
        f"≈ {law['tokens']['at_budget']:,.0f} training tokens and "
        f"lr ≈ {law['lr']['at_budget']:.3g}, "
        f"for a loss of ≈ {law['loss']['at_budget']:.4g}."
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>saeflow · scaling</title>"
        f"<style>{_STYLE}</style></head><body><h1>Scaling study ({len(points)} {_e(arch)} "
        "SAEs)</h1>"
        f"<p id='recommendation'>{_e(rec)}</p>"
        + (
            f"<p class='meta'>The best lr is at the edge of the grid in "
            f"{law['lr']['at_grid_edge']:.0%} of the cells: its fit only bounds the optimum "
            "(widen scaling.lr).</p>"
            if (law["lr"].get("at_grid_edge") or 0) > 0.5
            else ""
        )
        + "<p class='meta'>grey: every SAE; red: the least-loss SAE of each compute budget "
        "(or each size × tokens cell's best lr); dashed: the power-law fit; ring: the "
        "extrapolation.</p><div class='plots'>"
        f"{plot('loss', 'frontier', 'final training loss')}"
        f"{plot('fvu', 'fvu_frontier', 'held-out FVU')}"
        f"{plot('d_sae', 'frontier', 'compute-optimal d_sae')}"
        f"{plot('tokens', 'frontier', 'compute-optimal tokens')}"
        f"{plot('lr', 'best_lr', 'best learning rate')}</div>"
        "<h2>Fits (y ≈ coef · C^exponent, 90% bootstrap interval)</h2><table class='m' "
        "id='fits'><tr><th>quantity</th><th>exponent</th><th>interval</th><th>coef</th>"
        f"<th>points</th><th>at {budget:.3g}</th></tr>{rows}</table>"
        f"<h2>Feature splitting ({len(families)} families shown)</h2>{''.join(cards)}"
        "</body></html>"
    )
