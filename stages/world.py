"""world: render a split of the embedded synthetic VQA world (images + a JSONL of records)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.world.generator import WorldSection, write_world
from stages.common import params_option, writes
from stages.params import section


@click.command("world")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "eval"]), default="train", show_default=True)
@params_option
@writes("out_dir")
def world(out_dir: Path, split: str, params_path: Path) -> None:
    """Write OUT_DIR/world.jsonl and its PNGs for one split (seed and size from params.yaml `world`)."""
    p = section(params_path, "world", WorldSection)
    n, seed = p.split(split)
    path = write_world(out_dir, n=n, seed=seed, params=p.generator)
    click.echo(f"world: {n} {split} samples -> {path}")
