"""label: sink removal and tri-state RoI pseudo-labels from the attention store, to Parquet."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.teacher.label_presets import check_dump_covers, resolve_label_params
from pipeline.teacher.labels import label_store
from pipeline.teacher.params import DumpParams
from stages.common import fingerprints, params_option, progress_option, set_option, writes
from stages.params import apply_overrides, checked, raw_section, section


@click.command("label")
@click.argument("store_path", type=click.Path(exists=True, path_type=Path))
@click.argument("labels_out", type=click.Path(path_type=Path))
@params_option
@progress_option
@set_option
@writes("labels_out")
def label(store_path: Path, labels_out: Path, params_path: Path, progress: bool, overrides: tuple[str, ...]) -> None:
    """Write LABELS_OUT from the attention store STORE_PATH."""
    params = label_params(params_path, overrides)
    counts = label_store(store_path, params, labels_out, inputs=fingerprints(store_path), progress=progress)
    click.echo(f"label: {counts} -> {labels_out}")


def label_params(params_path: Path, overrides: tuple[str, ...] = ()):
    """The ``label`` section resolved against its preset, checked against what ``dump`` stores."""
    values = apply_overrides(raw_section(params_path, "label"), overrides)
    params = checked(lambda: resolve_label_params(values, complete=True), params_path)
    dump = section(params_path, "dump", DumpParams)
    checked(lambda: check_dump_covers(params, dump.layers, dump.per_head), params_path)
    return params
