"""What ``select-heads`` writes besides its preset: the Markdown report, the layers x heads heatmap, the metrics."""

from __future__ import annotations

import math

import numpy as np
import yaml
from PIL import Image, ImageDraw

from pipeline.teacher.head_selection import Selection

CELL = 14  # heatmap cell side, px
MARGIN = 40


def _f(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def preset_yaml(sel: Selection, model_id: str) -> str:
    """The preset file ``label: {preset_file: ...}`` reads: label keys, with what chose them as comments."""
    head = [
        f"# sdrpn select-heads on {model_id}: {sel.n_samples} samples with a ground-truth box",
        f"# label fg precision {_f(sel.precision)} ({sel.n_kept} kept) vs {_f(sel.baseline_precision)} "
        f"({sel.baseline_kept} kept) for the label settings it was compared with",
        f"# dump must store: layers {sel.dump['layers']}, per_head: {str(sel.dump['per_head']).lower()}",
    ]
    body = yaml.safe_dump(sel.preset, sort_keys=False, default_flow_style=None)
    return "\n".join(head) + "\n" + body


def metrics(sel: Selection) -> dict:
    """The selection's figures as JSON-ready values (``dvc metrics``)."""
    return {
        "n_samples": sel.n_samples,
        "preset": sel.preset,
        "dump": sel.dump,
        "label_fg_precision": sel.precision,
        "label_n_kept": sel.n_kept,
        "baseline_label_fg_precision": sel.baseline_precision,
        "baseline_label_n_kept": sel.baseline_kept,
        "greedy": sel.trace,
        "sink_layers": [
            {"layer": s.layer, "threshold": s.threshold, "gap": s.gap, "sinks_per_sample": s.per_sample}
            for s in sel.sink_layers
        ],
    }


def report_md(sel: Selection, model_id: str, top: int = 20) -> str:
    """The Markdown report: the chosen preset, the head ranking with confidence intervals, sinks, the greedy trace."""
    mean, ci = sel.mean, sel.ci
    lines = [
        f"# Head selection: {model_id}",
        "",
        f"{sel.n_samples} samples with a ground-truth box; every (layer, head) map scored after sink removal with "
        "the labels' fg rule (95% bootstrap intervals over samples).",
        "",
        "## Chosen preset",
        "",
        "```yaml",
        yaml.safe_dump(sel.preset, sort_keys=False, default_flow_style=None).rstrip(),
        "```",
        "",
        f"Label fg precision {_f(sel.precision)} ({sel.n_kept} samples kept); the label settings it was compared "
        f"with: {_f(sel.baseline_precision)} ({sel.baseline_kept} kept). `dump` must store layers "
        f"{sel.dump['layers']} with `per_head: {str(sel.dump['per_head']).lower()}`.",
        "",
        f"## Label candidates (top {top} heads by fg precision)",
        "",
        "| layer | head | fg precision [95% CI] | fg recall [95% CI] | argmax in box [95% CI] |",
        "|---:|---:|---|---|---|",
    ]
    prec = mean["fg_precision"]
    order = np.argsort(-np.nan_to_num(prec, nan=-1.0), axis=None, kind="stable")[:top]
    for flat in order:
        li, hi = np.unravel_index(flat, prec.shape)
        cells = [
            f"{_f(mean[k][li, hi])} [{_f(ci[k][0][li, hi])}, {_f(ci[k][1][li, hi])}]"
            for k in ("fg_precision", "fg_recall", "argmax_in_box")
        ]
        lines.append(f"| {sel.layers[li]} | {sel.heads[hi]} | " + " | ".join(cells) + " |")
    lines += ["", "## Layers", "", "| layer | head-mean fg precision | massive-norm threshold | gap | sinks / sample |"]
    lines.append("|---:|---|---|---|---|")
    for li, s in enumerate(sel.sink_layers):
        thr = "none" if s.threshold is None else f"{s.threshold:.2f} x median"
        lines.append(f"| {s.layer} | {_f(sel.layer_precision[li])} | {thr} | {s.gap:.1f}x | {s.per_sample:.2f} |")
    lines += ["", "## Sink heads (attention that singles out the massive-norm tokens)", ""]
    sh = sel.sink_heads
    if sh is None:
        lines.append("No massive-norm tokens: the preset uses `sink_method: none`.")
    else:
        lines += ["| layer | head | AUROC | attention threshold |", "|---:|---:|---|---|"]
        best = np.argsort(-sh.auroc, axis=None, kind="stable")[:10]
        for flat in best:
            li, hi = np.unravel_index(flat, sh.auroc.shape)
            auroc, thr = sh.auroc[li, hi], sh.threshold[li, hi]
            lines.append(f"| {sel.layers[li]} | {sel.heads[hi]} | {auroc:.3f} | {thr:.2e} |")
    lines += ["", "## Greedy combination (flat mean of the heads kept so far)", ""]
    lines += ["| try | layer | head | label fg precision | kept samples | added |", "|---:|---:|---:|---|---:|---|"]
    for i, t in enumerate(sel.trace, 1):
        added = "yes" if t["kept"] else "no"
        lines.append(f"| {i} | {t['layer']} | {t['head']} | {_f(t['fg_precision'])} | {t['n_kept']} | {added} |")
    return "\n".join(lines) + "\n"


def _colour(x: float) -> tuple[int, int, int]:
    """A dark-blue -> teal -> yellow ramp for x in [0, 1]; grey for NaN."""
    if not math.isfinite(x):
        return (128, 128, 128)
    stops = [(0.0, (30, 20, 90)), (0.5, (30, 150, 140)), (1.0, (250, 230, 40))]
    x = min(max(x, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(stops[:-1], stops[1:], strict=True):
        if x <= x1:
            t = (x - x0) / (x1 - x0)
            return tuple(int(round(a + (b - a) * t)) for a, b in zip(c0, c1, strict=True))
    return stops[-1][1]


def heatmap(values: np.ndarray, layers: list[int], heads: list[int], title: str) -> Image.Image:
    """Layers (rows) x heads (columns), each cell the metric in colour (0 dark, 1 yellow), with axis labels and a
    colour scale; cells grow on small grids so a toy's 8 x 6 stays readable next to a 7B's 32 x 32."""
    n_l, n_h = values.shape
    cell = int(min(28, max(CELL, 448 // max(n_l, n_h))))
    left, top, bar_w = MARGIN, MARGIN + 12, 12
    grid_w, grid_h = n_h * cell, n_l * cell
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = int(probe.textlength(title)) + 8
    width = max(left + grid_w + 16 + bar_w + 30, title_w)
    img = Image.new("RGB", (width, top + grid_h + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    draw.text((left, top - 26), "head", fill="black")
    draw.text((4, top - 12), "layer", fill="black")
    step_l, step_h = max(1, math.ceil(n_l / 16)), max(1, math.ceil(n_h / 16))
    for li in range(n_l):
        y = top + li * cell
        if li % step_l == 0:
            draw.text((8, y + (cell - 10) // 2), str(layers[li]), fill="black")
        for hi in range(n_h):
            x = left + hi * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_colour(float(values[li, hi])))
    for hi in range(0, n_h, step_h):
        draw.text((left + hi * cell + 2, top - 13), str(heads[hi]), fill="black")
    bar_x = left + grid_w + 16
    for row in range(grid_h):
        draw.line((bar_x, top + row, bar_x + bar_w - 1, top + row), fill=_colour(1 - row / max(1, grid_h - 1)))
    draw.text((bar_x + bar_w + 3, top - 4), "1", fill="black")
    draw.text((bar_x + bar_w + 3, top + grid_h - 8), "0", fill="black")
    return img
