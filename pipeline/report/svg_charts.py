"""Small inline SVG charts drawn by hand (a line chart and a horizontal bar chart), so the HTML report needs no
plotting library and loads nothing: a loss curve, paper Fig. 3's bins and accuracy per method need no more."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 460, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 48
COLOURS = ("#4c78a8", "#e45756", "#54a24b", "#b279a2", "#f58518", "#72b7b2")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"ticks need finite bounds (got {lo}, {hi})")
    if hi <= lo:  # one value: give it some room
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(count + 1)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """One format for a whole axis: as many decimals as the step needs, or powers of ten for tiny or huge values."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    biggest = max(abs(t) for t in ticks)
    if biggest >= 1e5 or step < 1e-3:
        return ["0" if t == 0 else f"{t:.1e}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{t:.{decimals}f}" for t in ticks]


def _finite(v) -> bool:
    return v is not None and isinstance(v, int | float) and math.isfinite(v)


def _frame(title: str, x_label: str, y_label: str, width: int, height: int, plot: tuple[float, float]) -> list[str]:
    """The svg element, the title and the axis titles; ``plot`` is the plot area's (top, bottom)."""
    cx, cy = (LEFT + width - RIGHT) / 2, sum(plot) / 2
    return [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="sans-serif" font-size="11" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<text x="{cx}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="14" y="{cy}" text-anchor="middle" transform="rotate(-90 14 {cy})">{escape(y_label)}</text>',
    ]


def _runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Consecutive points with a finite value: each is drawn as one line, so a gap stays a gap."""
    runs: list[list[tuple[float, float]]] = [[]]
    for px, v in points:
        if _finite(v):
            runs[-1].append((px, v))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def line_chart(
    x: Sequence[float | str],
    series: dict[str, Sequence[float | None]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """One line per series over ``x`` (numbers on a linear axis, or labels spaced evenly in their order).

    Missing or non-finite values break the line; with labels on x, or a single point, each point gets a dot.
    Several series get a legend between the title and the plot; labels too long for their slot are slanted.
    """
    categorical = any(isinstance(v, str) for v in x)
    legend = len(series) > 1
    top = TOP + (16 if legend else 0)
    x0, x1 = LEFT, width - RIGHT
    slant = categorical and max((len(str(v)) for v in x), default=0) * 6.5 > (x1 - x0) / max(len(x), 1)
    extra = int(max(len(str(v)) for v in x) * 4.5) if slant else 0  # room for labels at -40 degrees
    height += extra
    y0 = height - BOTTOM - extra // 2 if slant else height - BOTTOM
    values = [v for ys in series.values() for v in ys if _finite(v)]
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    ylo, yhi = y_ticks[0], y_ticks[-1]

    def py(v: float) -> float:
        return y0 - (v - ylo) / (yhi - ylo) * (y0 - top)

    if categorical:
        slot = (x1 - x0) / max(len(x), 1)
        xs = [x0 + slot * (i + 0.5) for i in range(len(x))]
        x_ticks = list(zip(xs, map(str, x), strict=True))
    else:
        nums = [float(v) for v in x]
        ticks = nice_ticks(min(nums, default=0.0), max(nums, default=1.0), 6)
        xlo, xhi = ticks[0], ticks[-1]
        xs = [x0 + (v - xlo) / (xhi - xlo) * (x1 - x0) for v in nums]
        x_ticks = [
            (x0 + (t - xlo) / (xhi - xlo) * (x1 - x0), text) for t, text in zip(ticks, tick_labels(ticks), strict=True)
        ]

    out = _frame(title, x_label, y_label, width, height, (top, y0))
    for t, text in zip(y_ticks, tick_labels(y_ticks), strict=True):
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{text}</text>')
    for px, text in x_ticks:
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y0}" y2="{y0 + 4}" stroke="#555"/>')
        if slant:
            ty = y0 + 14
            out.append(
                f'<text x="{px:.1f}" y="{ty}" text-anchor="end" transform="rotate(-40 {px:.1f} {ty})">'
                f"{escape(text)}</text>"
            )
        else:
            out.append(f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{escape(text)}</text>')
    out.append(f'<polyline points="{x0},{top} {x0},{y0} {x1},{y0}" fill="none" stroke="#555"/>')
    legend_x = x0
    for k, (name, ys) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        for run in _runs(list(zip(xs, ys, strict=True))):
            points = " ".join(f"{px:.1f},{py(v):.1f}" for px, v in run)
            out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
            if categorical or len(run) == 1:
                out += [f'<circle cx="{px:.1f}" cy="{py(v):.1f}" r="2.8" fill="{colour}"/>' for px, v in run]
        if legend:
            out.append(f'<rect x="{legend_x}" y="{TOP - 4}" width="14" height="3" fill="{colour}"/>')
            out.append(f'<text x="{legend_x + 18}" y="{TOP}">{escape(name)}</text>')
            legend_x += 30 + 6.5 * len(name)
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    title: str,
    x_label: str,
    label_width: int = 190,
    width: int = WIDTH + 120,
    bar_height: int = 22,
) -> str:
    """Horizontal bars from zero, one per label, each with its value written at its end ('-' when missing)."""
    finite = [v for v in values if _finite(v)]
    ticks = nice_ticks(min(0.0, *finite) if finite else 0.0, max(finite, default=1.0))
    lo, hi = ticks[0], ticks[-1]
    height = TOP + BOTTOM + bar_height * len(labels) + 8
    x0, x1, y0 = label_width, width - RIGHT - 40, height - BOTTOM

    def px(v: float) -> float:
        return x0 + (v - lo) / (hi - lo) * (x1 - x0)

    out = _frame(title, x_label, "", width, height, (TOP, y0))
    for t, text in zip(ticks, tick_labels(ticks), strict=True):
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{TOP}" y2="{y0}" stroke="#ddd"/>')
        out.append(f'<text x="{px(t):.1f}" y="{y0 + 16}" text-anchor="middle">{text}</text>')
    for i, (name, v) in enumerate(zip(labels, values, strict=True)):
        top = TOP + 4 + i * bar_height
        mid = top + bar_height / 2 + 4
        out.append(f'<text x="{x0 - 6}" y="{mid:.1f}" text-anchor="end">{escape(name)}</text>')
        if _finite(v):
            left, right = sorted((px(0.0), px(v)))
            out.append(
                f'<rect x="{left:.1f}" y="{top + 3}" width="{right - left:.1f}" height="{bar_height - 6}" '
                f'fill="{COLOURS[0]}"/>'
            )
            out.append(f'<text x="{right + 4:.1f}" y="{mid:.1f}">{v:.3f}</text>')
        else:
            out.append(f'<text x="{x0 + 4}" y="{mid:.1f}">-</text>')
    out.append(f'<polyline points="{x0},{TOP} {x0},{y0} {x1},{y0}" fill="none" stroke="#555"/>')
    out.append("</svg>")
    return "\n".join(out)
