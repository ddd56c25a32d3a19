"""report: one compact summary of a run (methods, label quality, RPN fit) from the metrics the stages wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from pipeline.report.summary import summary

MAX_PICTURES = 3  # inspect pictures are ~1,300 px wide PNGs: a few show the method, more only weigh the page


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value: str) -> float | str | None:
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _read_table(path: Path) -> list[dict] | None:
    """A plot table the stages write (CSV, or TSV by its suffix), numbers as floats; None when it is not there."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        return [{k: _cell(v) for k, v in row.items()} for row in reader]


def _write_html(
    target: Path, metrics: list[dict | None], notes: list[str], train_steps: Path, fig3: Path, inspect_dir: Path
) -> None:
    from pipeline.report.html_page import Picture, page

    tables = {path: _read_table(path) for path in (train_steps, fig3)}
    notes = notes + [f"no {path}: its plot is left out" for path, rows in tables.items() if not rows]
    pngs = sorted(inspect_dir.glob("*.png"))[:MAX_PICTURES] if inspect_dir.is_dir() else []
    html = page(
        *metrics,
        train_steps=tables[train_steps],
        fig3=tables[fig3],
        pictures=[Picture(p.stem, p.read_bytes()) for p in pngs],
        notes=notes,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(html, encoding="utf-8")
    click.echo(f"report: wrote {target} ({len(pngs)} inspect pictures)", err=True)


@click.command("report")
@click.option(
    "--evaluate",
    "evaluate_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="artifacts/metrics/evaluate.json",
    show_default=True,
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="artifacts/metrics/label_quality.json",
    show_default=True,
)
@click.option(
    "--train", "train_path", type=click.Path(dir_okay=False, path_type=Path), default="artifacts/train_metrics.json"
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write one self-contained HTML page (tables, plots as inline SVG, a few inspect pictures) here.",
)
@click.option(
    "--train-steps",
    type=click.Path(dir_okay=False, path_type=Path),
    default="artifacts/train_steps.csv",
    show_default=True,
    help="With --html: train's loss / lr table.",
)
@click.option(
    "--fig3",
    type=click.Path(dir_okay=False, path_type=Path),
    default="artifacts/plots/label_fig3.tsv",
    show_default=True,
    help="With --html: label_report's paper Fig. 3 table.",
)
@click.option(
    "--inspect-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="artifacts/inspect",
    show_default=True,
    help=f"With --html: the first {MAX_PICTURES} `sdrpn inspect` pictures found here (by name) go on the page.",
)
def report(
    evaluate_path: Path,
    labels_path: Path,
    train_path: Path,
    html_path: Path | None,
    train_steps: Path,
    fig3: Path,
    inspect_dir: Path,
) -> None:
    """Print per-method accuracy, GT-centre recall, RoI precision and throughput, label quality and the RPN's fit."""
    found = {p: _read(p) for p in (evaluate_path, labels_path, train_path)}
    if not any(found.values()):
        raise click.ClickException(f"none of {[str(p) for p in found]} exists yet: run `dvc repro` first")
    missing = [f"no {path}: that part is left out" for path, value in found.items() if value is None]
    for line in missing:
        click.echo(f"({line})", err=True)
    metrics = list(found.values())
    click.echo(summary(*metrics))
    if html_path is not None:
        _write_html(html_path, metrics, missing, train_steps, fig3, inspect_dir)
