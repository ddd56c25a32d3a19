"""report: one compact summary of a run (methods, label quality, RPN fit) from the metrics the stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.report.summary import summary


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


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
def report(evaluate_path: Path, labels_path: Path, train_path: Path) -> None:
    """Print per-method accuracy, GT-centre recall, RoI precision and throughput, label quality and the RPN's fit."""
    found = {p: _read(p) for p in (evaluate_path, labels_path, train_path)}
    if not any(found.values()):
        raise click.ClickException(f"none of {[str(p) for p in found]} exists yet: run `dvc repro` first")
    for path, value in found.items():
        if value is None:
            click.echo(f"(no {path}: that part is left out)", err=True)
    click.echo(summary(found[evaluate_path], found[labels_path], found[train_path]))
