"""What every stage entry point shares: its CLI options and naming the inputs an artifact was made from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from pipeline.io.contracts import fingerprint

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


def report_skips(stage: str, skipped: dict[str, str], where: str | Path, shown: int = 5) -> None:
    """Name the first skipped samples and why on stderr; every one is recorded in ``where``."""
    for sid, reason in list(skipped.items())[:shown]:
        click.echo(f"{stage}: skipped {sid}: {reason}", err=True)
    if len(skipped) > shown:
        click.echo(f"{stage}: ... and {len(skipped) - shown} more, each with its reason in {where}", err=True)


def fingerprints(*paths: str | Path) -> dict[str, str]:
    """{path: md5} for the inputs an artifact was made from."""
    return {str(p): fingerprint(p) for p in paths}


def model_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint directory: config, and the names and sizes of its weight files."""
    d = Path(model_dir)
    h = hashlib.md5((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors*")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
