"""label: sink removal and tri-state RoI pseudo-labels from the attention store, to Parquet."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.label_presets import resolve_label_params
from pipeline.labels import label_store
from stages.common import fingerprints, load_section, params_option, progress_option


@click.command("label")
@click.argument("store_path", type=click.Path(exists=True, path_type=Path))
@click.argument("labels_out", type=click.Path(path_type=Path))
@params_option
@progress_option
def label(store_path: Path, labels_out: Path, params_path: Path, progress: bool) -> None:
    """Write LABELS_OUT from the attention store STORE_PATH."""
    try:
        params = resolve_label_params(load_section(params_path, "label"))
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(f"label: {exc}") from exc
    counts = label_store(store_path, params, labels_out, inputs=fingerprints(store_path), progress=progress)
    click.echo(f"label: {counts} -> {labels_out}")
