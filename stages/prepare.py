"""prepare: build the manifest (and the list of skipped samples) from LLaVA's mix JSON or plain records."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.io.contracts import write_parquet
from pipeline.io.manifest import build_manifest, records_from_llava_mix, records_from_table
from stages.common import fingerprints, load_section, params_option


@click.command("prepare")
@click.argument("manifest_out", type=click.Path(path_type=Path))
@click.argument("skips_out", type=click.Path(path_type=Path))
@params_option
@click.option("--section", default="prepare", show_default=True, help="params.yaml section to read")
def prepare(manifest_out: Path, skips_out: Path, params_path: Path, section: str) -> None:
    """Write MANIFEST_OUT (samples with readable images) and SKIPS_OUT (samples skipped, with reasons)."""
    p = load_section(params_path, section)
    fmt = p.get("format", "records")
    source = p["input"]
    if fmt == "llava_mix":
        records = records_from_llava_mix(source, p.get("image_root"), p.get("sources"), p.get("n"), p.get("seed", 42))
    elif fmt == "records":
        records = records_from_table(source, p.get("image_root"))
        if p.get("n"):
            records = records[: p["n"]]
    else:
        raise click.BadParameter(f"{section}.format must be 'llava_mix' or 'records', got {fmt!r}")
    manifest, skips = build_manifest(records)
    inputs = fingerprints(source)
    write_parquet(manifest, manifest_out, "manifest", params=p, inputs=inputs)
    write_parquet(skips, skips_out, "manifest_skips", params=p, inputs=inputs)
    click.echo(f"prepare: {manifest.num_rows} samples -> {manifest_out}; {skips.num_rows} skipped -> {skips_out}")
    for row in skips.slice(0, 10).to_pylist():
        click.echo(f"  skipped {row['sample_id']}: {row['reason']} ({row['image']})", err=True)
