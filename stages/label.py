"""label: sink removal and tri-state RoI pseudo-labels from the attention store, to Parquet."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

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
    preset_file = apply_overrides(raw_section(params_path, "label"), overrides).get("preset_file")
    inputs = fingerprints(store_path, *([preset_file] if preset_file else []))
    counts = label_store(store_path, params, labels_out, inputs=inputs, progress=progress)
    click.echo(f"label: {counts} -> {labels_out}")


def label_params(params_path: Path, overrides: tuple[str, ...] = ()):
    """The ``label`` section resolved against its preset, checked against what ``dump`` stores."""
    values = apply_overrides(raw_section(params_path, "label"), overrides)
    from_file = read_preset_file(params_path, values.get("preset_file"))
    params = checked(lambda: resolve_label_params(values, complete=True, preset_file=from_file), params_path)
    dump = section(params_path, "dump", DumpParams)
    checked(lambda: check_dump_covers(params, dump.layers, dump.per_head), params_path)
    return params


def read_preset_file(params_path: Path, path: str | None) -> dict | None:
    """The label keys of ``label.preset_file`` (a YAML mapping; relative to the working directory, as every path
    in params.yaml), or None when none is set. Keep preset files under ``presets/``: dvc.yaml's label stages
    depend on that folder, so editing one reruns them."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise click.UsageError(f"{params_path}: label.preset_file: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise click.UsageError(f"{params_path}: label.preset_file: {path} must hold a mapping of label keys")
    return data
