"""Reading params.yaml for a stage: one section into its typed dataclass, errors as CLI usage errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from pipeline.config import ParamsError, parse_section

T = TypeVar("T")


def read_params(params_path: Path) -> dict[str, Any]:
    """The whole params.yaml as a mapping."""
    data = yaml.safe_load(Path(params_path).read_text()) or {}
    if not isinstance(data, dict):
        raise click.UsageError(f"{params_path}: expected a mapping of sections")
    return data


def raw_section(params_path: Path, name: str) -> dict[str, Any]:
    """One section as written (a missing section is an error naming it)."""
    data = read_params(params_path)
    if name not in data:
        raise click.UsageError(f"{params_path}: no section {name!r}")
    value = data[name]
    if not isinstance(value, dict):
        raise click.UsageError(f"{params_path}: section {name!r} must be a mapping")
    return value


def apply_overrides(values: dict[str, Any], overrides: tuple[str, ...]) -> dict[str, Any]:
    """``values`` with ``KEY=VALUE`` overrides applied (how dvc.yaml runs a stage's ablation variants)."""
    out = dict(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(raw)
    return out


def section(params_path: Path, name: str, cls: type[T], overrides: tuple[str, ...] = ()) -> T:
    """Parse section ``name`` into ``cls``: every key listed, none unknown, every value valid."""
    values = apply_overrides(raw_section(params_path, name), overrides)
    return checked(lambda: parse_section(cls, values, name, complete=True), params_path)


def checked(build, params_path: Path):
    """Run ``build()``, turning a :class:`ParamsError` into a usage error that names params.yaml."""
    try:
        return build()
    except ParamsError as exc:
        raise click.UsageError(f"{params_path}: {exc}") from None
