"""One self-contained HTML page of a run: the summary's tables, the plots as inline SVG and a few inspect pictures.

Everything is inside the page (charts drawn as SVG, pictures as ``data:`` URIs, no script, no stylesheet to fetch),
and its Content-Security-Policy forbids any other load, so it opens the same offline, from a mail or a CI artifact.
The figures are the text summary's own (``pipeline/report/summary.py``), formatted by the same functions.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from pipeline.report.summary import (
    LABEL_HEADER,
    METHOD_HEADER,
    METHOD_NAMES,
    label_caption,
    label_rows,
    method_rows,
    train_caption,
)
from pipeline.report.svg_charts import bar_chart, line_chart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# nothing but the page itself: inline styles and data: images, no script, no connection
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0 0 16px; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #666; }
"""


@dataclass(frozen=True)
class Picture:
    """One inspect picture: its caption (the sample id) and its PNG bytes."""

    caption: str
    png: bytes


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _column(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return [r.get(key) for r in rows]


def charts(
    evaluate: dict[str, dict[str, Any]] | None,
    train_steps: Sequence[dict[str, Any]] | None,
    fig3: Sequence[dict[str, Any]] | None,
) -> list[str]:
    """The plots `dvc plots show` draws, as SVG: loss and learning rate per step, paper Fig. 3, accuracy per method.

    ``train_steps`` are the rows of train's plot table (``step``, ``loss``, ``lr``), ``fig3`` those of label_report's
    (``bin``, ``raw_inside_gt``, ``denoised_inside_gt``); a chart whose columns are missing is left out.
    """
    out = []
    if train_steps and all(k in train_steps[0] for k in ("step", "loss")):
        steps = _column(train_steps, "step")
        out.append(
            line_chart(
                steps, {"loss": _column(train_steps, "loss")}, title="RPN training loss", x_label="step", y_label="loss"
            )
        )
        if "lr" in train_steps[0]:
            out.append(
                line_chart(
                    steps, {"lr": _column(train_steps, "lr")}, title="learning rate", x_label="step", y_label="lr"
                )
            )
    if fig3 and "bin" in fig3[0]:
        series = {
            name: _column(fig3, key)
            for key, name in (("raw_inside_gt", "raw attention"), ("denoised_inside_gt", "after sink removal"))
            if key in fig3[0]
        }
        out.append(
            line_chart(
                [str(b) for b in _column(fig3, "bin")],
                series,
                title="share of tokens inside the GT box (paper Fig. 3)",
                x_label="bin of a / a_max",
                y_label="share inside the GT box",
            )
        )
    if evaluate:
        names = [METHOD_NAMES.get(m, m) for m in evaluate]
        accuracy = [m.get("accuracy") for m in evaluate.values()]
        out.append(bar_chart(names, accuracy, title="accuracy per method", x_label="accuracy"))
    return out


def page(
    evaluate: dict[str, dict[str, Any]] | None,
    label_quality: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    *,
    train_steps: Sequence[dict[str, Any]] | None = None,
    fig3: Sequence[dict[str, Any]] | None = None,
    pictures: Sequence[Picture] = (),
    notes: Sequence[str] = (),
    title: str = "sdrpn run report",
) -> str:
    """The report page as one HTML string; parts whose inputs are None or empty are left out, ``notes`` say why."""
    for p in pictures:
        if not p.png.startswith(PNG_SIGNATURE):
            raise ValueError(f"inspect picture {p.caption!r} is not a PNG")
    body = [f"<h1>{escape(title)}</h1>"]
    body += [f'<p class="note">{escape(n)}</p>' for n in notes]
    if evaluate:
        n = next(iter(evaluate.values())).get("n")
        body += [f"<h2>Evaluation ({escape(str(n))} samples)</h2>", _table(METHOD_HEADER, method_rows(evaluate))]
    if label_quality:
        body += [
            "<h2>Label quality</h2>",
            f"<p>{escape(label_caption(label_quality))}</p>",
            _table(LABEL_HEADER, label_rows(label_quality)),
        ]
    if train:
        body += ["<h2>RPN training</h2>", f"<p>{escape(train_caption(train))}</p>"]
    svgs = charts(evaluate, train_steps, fig3)
    if svgs:
        body += ["<h2>Plots</h2>", '<div class="charts">', *svgs, "</div>"]
    body.append("<h2>Inspect</h2>")
    if pictures:
        for p in pictures:
            data = base64.b64encode(p.png).decode()
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{escape(p.caption)}">'
                f"<figcaption>{escape(p.caption)}</figcaption></figure>"
            )
    else:
        body.append(
            '<p class="note">No inspect pictures: <code>sdrpn inspect SAMPLE_ID ...</code> writes them '
            "(artifacts/inspect/), then the report includes a few.</p>"
        )
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
