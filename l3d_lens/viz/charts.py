"""Small static charts as inline SVG (no JavaScript, no fonts, no network): a line chart, a
bar chart and a heat map. Coordinates are printed with fixed decimals, so the same numbers
always give the same bytes; non-finite values are left out (lines) or drawn as zero (bars)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .html import esc

PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#6e7781")


def _f(x: float) -> str:
    return f"{x:.1f}"


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.3g}" if a < 1 else f"{v:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step - 1e-9) * step
    out, t = [], start
    while t <= hi + 1e-9 * step:
        out.append(round(t, 12))
        t += step
    return out


def line_chart(xs: Sequence[float], series: Mapping[str, Sequence[float]], *, width: int = 440, height: int = 220,
               x_label: str = "", y_label: str = "", y_zero: bool = True, log_y: bool = False, title: str = "") -> str:
    """One polyline (with dots) per series; a legend when there is more than one."""
    pts = {name: [(float(x), float(y)) for x, y in zip(xs, ys)] for name, ys in series.items()}
    ok = lambda y: math.isfinite(y) and (y > 0 if log_y else True)  # noqa: E731
    ys_all = [y for p in pts.values() for _, y in p if ok(y)]
    xs_all = [float(x) for x in xs if math.isfinite(float(x))]
    legend = 16 if len(pts) > 1 else 0
    height += legend
    left, right, top, bottom = 56, 12, 18 if title else 8, 38 + legend
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" class="l3d-chart">']
    if title:
        parts.append(f'<text x="{left}" y="12" font-weight="bold">{esc(title)}</text>')
    if not ys_all or not xs_all:
        parts.append(f'<text x="{left}" y="{top + h / 2:.1f}">no finite values</text></svg>')
        return "".join(parts)
    tf = (lambda y: math.log10(y)) if log_y else (lambda y: y)  # noqa: E731
    y_lo, y_hi = min(map(tf, ys_all)), max(map(tf, ys_all))
    if y_zero and not log_y:
        y_lo = min(y_lo, 0.0)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    x_lo, x_hi = min(xs_all), max(xs_all)
    if x_hi - x_lo < 1e-12:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    sx = lambda x: left + (x - x_lo) / (x_hi - x_lo) * w  # noqa: E731
    sy = lambda y: top + h - (tf(y) - y_lo) / (y_hi - y_lo) * h  # noqa: E731
    parts.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#d0d7de"/>')
    for t in _ticks(y_lo, y_hi):
        y = top + h - (t - y_lo) / (y_hi - y_lo) * h
        label = _num(10 ** t) if log_y else _num(t)
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{_f(y)}" y2="{_f(y)}" stroke="#eaeef2"/>'
                     f'<text x="{left - 4}" y="{_f(y + 4)}" text-anchor="end">{label}</text>')
    for t in _ticks(x_lo, x_hi, 8):
        x = sx(t)
        parts.append(f'<text x="{_f(x)}" y="{top + h + 14}" text-anchor="middle">{_num(t)}</text>')
    if x_label:
        parts.append(f'<text x="{left + w / 2:.1f}" y="{height - legend - 4}" text-anchor="middle">{esc(x_label)}</text>')
    if y_label:
        parts.append(f'<text x="12" y="{top + h / 2:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 12 {top + h / 2:.1f})">{esc(y_label)}</text>')
    for i, (name, p) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        segs, cur = [], []
        for x, y in p:
            if ok(y) and math.isfinite(x):
                cur.append(f"{_f(sx(x))},{_f(sy(y))}")
            elif cur:
                segs.append(cur)
                cur = []
        if cur:
            segs.append(cur)
        for seg in segs:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(seg)}"/>')
        for x, y in p:
            if ok(y) and math.isfinite(x):
                parts.append(f'<circle cx="{_f(sx(x))}" cy="{_f(sy(y))}" r="2.5" fill="{color}">'
                             f"<title>{esc(name)}: {_num(x)} -> {_num(y)}</title></circle>")
        if len(pts) > 1:  # legend under the plot, one entry per series
            lx = left + 130 * i
            parts.append(f'<rect x="{lx}" y="{height - legend + 6}" width="12" height="3" fill="{color}"/>'
                         f'<text x="{lx + 16}" y="{height - legend + 11}">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, colors: Sequence[str] | None = None,
              width: int = 440, bar: int = 16, title: str = "", value_max: float | None = None) -> str:
    """Horizontal bars, one row per label, value printed at the end of the bar."""
    vals = [float(v) if math.isfinite(float(v)) else 0.0 for v in values]
    label_w = min(160, 12 + 7 * max((len(str(lab)) for lab in labels), default=1))
    top = 18 if title else 4
    height = top + len(vals) * (bar + 4) + 4
    vmax = value_max if value_max is not None else max([abs(v) for v in vals] + [1e-12])
    span = width - label_w - 60
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" class="l3d-chart">']
    if title:
        parts.append(f'<text x="0" y="12" font-weight="bold">{esc(title)}</text>')
    for i, (lab, v, raw) in enumerate(zip(labels, vals, values)):
        y = top + i * (bar + 4)
        length = max(0.0, min(1.0, abs(v) / vmax)) * span if vmax > 0 else 0.0
        color = colors[i] if colors else PALETTE[0]
        parts.append(f'<text x="{label_w - 6}" y="{y + bar - 4}" text-anchor="end">{esc(lab)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{_f(length)}" height="{bar}" fill="{color}">'
                     f"<title>{esc(lab)}: {_num(float(raw))}</title></rect>"
                     f'<text x="{_f(label_w + length + 4)}" y="{y + bar - 4}">{_num(float(raw))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cellnum(v: float) -> str:
    """A short cell label: 0.70, -0.27, 31.5, 158, 3e-5."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        if a < 1e5:
            return f"{v:.0f}"
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.2f}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def _blend(t: float) -> str:
    """White -> blue for t in [0, 1]."""
    t = max(0.0, min(1.0, t))
    r, g, b = (round(255 + (c - 255) * t) for c in (9, 105, 218))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str], *,
            cell: int = 40, title: str = "", vmax: float | None = None, signed: bool = False) -> str:
    """A [rows x cols] grid coloured white -> blue on [0, vmax], each cell printing its value;
    with ``signed``, the colour shows |value| and negative values print in italics. A NaN cell
    (no value, e.g. a head outside the decomposed slice) is grey and prints "–"; an infinite one
    takes the top colour and prints "inf"."""
    rows = [[float(v) for v in r] for r in matrix]
    colour = [[abs(v) if signed else v for v in r] for r in rows]
    top_m = (18 if title else 0) + 16
    left = 12 + 7 * max((len(str(lab)) for lab in row_labels), default=1)
    vm = vmax if vmax is not None else max([v for r in colour for v in r if math.isfinite(v)] + [1e-12])
    width = left + cell * max((len(r) for r in rows), default=1) + 4
    height = top_m + cell * len(rows) + 4
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" class="l3d-chart l3d-heatmap">']
    if title:
        parts.append(f'<text x="0" y="12" font-weight="bold">{esc(title)}</text>')
    for j, lab in enumerate(col_labels):
        parts.append(f'<text x="{left + j * cell + cell / 2:.1f}" y="{top_m - 4}" text-anchor="middle">{esc(lab)}</text>')
    for i, (lab, r) in enumerate(zip(row_labels, rows)):
        y = top_m + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{esc(lab)}</text>')
        for j, (v, cv) in enumerate(zip(r, colour[i])):
            t = 0.0 if math.isnan(cv) else 1.0 if math.isinf(cv) else cv / vm if vm > 0 else 0.0
            fill = "#ffffff" if t > 0.55 else "#1f2328"
            italic = ' font-style="italic"' if v < 0 else ""
            shown = "–" if math.isnan(v) else ("-" if v < 0 else "") + "inf" if math.isinf(v) else None
            parts.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{"#eaeef2" if math.isnan(v) else _blend(t)}" stroke="#d0d7de"><title>{esc(lab)} '
                         f'{esc(col_labels[j])}: {shown or _num(v)}</title></rect><text '
                         f'x="{left + j * cell + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" '
                         f'style="fill:{fill}"{italic}>{shown or _cellnum(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)
