"""One compact, human-readable summary of a pipeline run, from the metrics the stages write.

``dvc metrics show`` prints every metric of every file on one row per file (wide, for tools); this module
puts the figures a researcher reads first into small tables: per method, accuracy, GT-centre recall, the
share of RoI tokens inside the GT box and throughput against the baseline; then label quality (raw
attention vs the labels) and the RPN's held-out fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# How evaluate names its methods -> what a reader calls them (unknown names are shown as they are).
METHOD_NAMES = {
    "baseline": "baseline (base view only)",
    "sdrpn_masked": "SD-RPN, masked upscaling",
    "sdrpn_box": "SD-RPN, box upscaling",
    "raw_attention": "RoI from raw attention (no RPN)",
    "no_sink_removal_masked": "RPN without sink removal",
    "no_label_assignment_masked": "RPN without label assignment",
}

METHOD_HEADER = ("method", "accuracy", "GT centre in crop", "RoI tokens in GT box", "throughput", "n")
LABEL_HEADER = ("map", "fg precision", "fg recall", "argmax in box")


def _fmt(value: Any, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, columns padded to fit."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def method_rows(evaluate: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per evaluated method: accuracy, GT-centre recall, RoI precision, throughput vs the baseline."""
    rows = []
    for method, m in evaluate.items():
        throughput = 1.0 if method == "baseline" else m.get("throughput_vs_baseline")
        rows.append(
            [
                METHOD_NAMES.get(method, method),
                _fmt(m.get("accuracy")),
                _fmt(m.get("box_recall"), 2),
                _fmt(m.get("roi_precision"), 2),
                _fmt(throughput, 2, "x"),
                _fmt(m.get("n")),
            ]
        )
    return rows


def label_rows(quality: dict[str, Any]) -> list[list[str]]:
    """Raw attention vs the labels: fg precision, fg recall and argmax inside the GT box."""
    rows = []
    for key, name in (("raw_attention", "raw attention"), ("labels", "labels (after sink removal)")):
        q = quality.get(key) or {}
        rows.append([name, *(_fmt(q.get(k), 2) for k in ("fg_precision", "fg_recall", "argmax_in_box"))])
    return rows


def label_caption(quality: dict[str, Any]) -> str:
    """How many samples the label-quality figures cover, and the sinks found per sample."""
    sinks = quality.get("sinks") or {}
    return (
        f"{quality.get('n_samples_with_gt')} samples with a GT box, "
        f"{quality.get('n_kept')} kept; sinks per sample {_fmt(sinks.get('per_sample'), 2)}, "
        f"{_fmt(sinks.get('share_inside_gt_box'), 3)} of them inside a GT box"
    )


def train_caption(train: dict[str, Any]) -> str:
    """The RPN's held-out fit in one line."""
    return (
        f"held-out loss {_fmt(train.get('holdout_loss'), 4)}, "
        f"fg accuracy {_fmt(train.get('holdout_fg_acc'), 3)}, bg accuracy {_fmt(train.get('holdout_bg_acc'), 3)} "
        f"({train.get('n_train')} train / {train.get('n_holdout')} held-out samples, "
        f"{_fmt(train.get('steps'))} steps)"
    )


def summary(
    evaluate: dict[str, dict[str, Any]] | None,
    label_quality: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> str:
    """The run's summary as text; any part whose metrics are missing (None) is left out."""
    parts = []
    if evaluate:
        n = next(iter(evaluate.values())).get("n")
        parts.append(f"evaluation ({n} samples)")
        parts.append(table(METHOD_HEADER, method_rows(evaluate)))
    if label_quality:
        parts.append(f"label quality ({label_caption(label_quality)})")
        parts.append(table(LABEL_HEADER, label_rows(label_quality)))
    if train:
        parts.append(f"RPN training: {train_caption(train)}")
    return "\n\n".join(parts)
