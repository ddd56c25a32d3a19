"""What every stage entry point shares: reading its params.yaml section and naming its inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from pipeline.io.contracts import fingerprint
from pipeline.models import adapter_options

T = TypeVar("T")

params_option = click.option(
    "--params",
    "params_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="parameters file (DVC's params.yaml)",
)
progress_option = click.option("--progress/--no-progress", default=True, help="show a progress bar")
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override one key of this stage's params section (VALUE is YAML), e.g. --set sink_method=none",
)


def apply_overrides(values: dict[str, Any], overrides: tuple[str, ...]) -> dict[str, Any]:
    """``values`` with ``KEY=VALUE`` overrides applied (how dvc.yaml runs a stage's ablation variants)."""
    out = dict(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(raw)
    return out


def load_section(params_path: Path, section: str) -> dict[str, Any]:
    """One top-level section of params.yaml (empty dict when absent)."""
    data = yaml.safe_load(params_path.read_text()) or {}
    value = data.get(section) or {}
    if not isinstance(value, dict):
        raise click.BadParameter(f"section {section!r} of {params_path} must be a mapping")
    return value


def to_dataclass(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build a params dataclass, refusing unknown keys so a typo in params.yaml is not silently ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise click.BadParameter(f"{where}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def fingerprints(*paths: str | Path) -> dict[str, str]:
    """{path: md5} for the inputs an artifact was made from."""
    return {str(p): fingerprint(p) for p in paths}


def model_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint directory: config, and the names and sizes of its weight files."""
    import hashlib

    d = Path(model_dir)
    h = hashlib.md5((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors*")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def stage2_adapter_options(model: dict[str, Any], evaluate: dict[str, Any]) -> dict[str, Any]:
    """Adapter options for stages running two-stage inference: the ``model`` section's and ``evaluate.crop_size``."""
    crop = evaluate.get("crop_size")
    return {**adapter_options(model), **({"crop_size": int(crop)} if crop is not None else {})}
