"""world: render a split of the embedded synthetic VQA world (images + a JSONL of records)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.world.generator import WorldParams, write_world
from stages.common import load_section, params_option, to_dataclass


@click.command("world")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "eval"]), default="train", show_default=True)
@params_option
def world(out_dir: Path, split: str, params_path: Path) -> None:
    """Write OUT_DIR/world.jsonl and its PNGs for one split (seed and size from params.yaml `world`)."""
    p = load_section(params_path, "world")
    gen = {k: tuple(v) if isinstance(v, list) else v for k, v in (p.get("generator") or {}).items()}
    params = to_dataclass(WorldParams, gen, "world.generator")
    path = write_world(out_dir, n=int(p[f"n_{split}"]), seed=int(p[f"seed_{split}"]), params=params)
    click.echo(f"world: {p[f'n_{split}']} {split} samples -> {path}")
