"""label: sink removal and tri-state RoI pseudo-labels from the attention store, to Parquet."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.teacher.label_presets import resolve_label_params
from pipeline.teacher.labels import label_store
from stages.common import apply_overrides, fingerprints, load_section, params_option, progress_option, set_option


@click.command("label")
@click.argument("store_path", type=click.Path(exists=True, path_type=Path))
@click.argument("labels_out", type=click.Path(path_type=Path))
@params_option
@progress_option
@set_option
def label(store_path: Path, labels_out: Path, params_path: Path, progress: bool, overrides: tuple[str, ...]) -> None:
    """Write LABELS_OUT from the attention store STORE_PATH."""
    try:
        params = resolve_label_params(apply_overrides(load_section(params_path, "label"), overrides))
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(f"label: {exc}") from exc
    counts = label_store(store_path, params, labels_out, inputs=fingerprints(store_path), progress=progress)
    click.echo(f"label: {counts} -> {labels_out}")
