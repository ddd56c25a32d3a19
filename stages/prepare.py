"""prepare: build the manifest (and the list of skipped samples) from LLaVA's mix JSON, plain records or a
benchmark's distributed files."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from pipeline.benchmarks import BENCHMARKS
from pipeline.benchmarks.formats import benchmark_records
from pipeline.io.contracts import write_parquet
from pipeline.io.manifest import InputError, PrepareParams, build_manifest, records_from_params
from stages.common import fingerprints, params_option, writes
from stages.params import section

SHOWN_SKIPS = 10  # skips echoed on the console; the skips artifact lists them all


@click.command("prepare")
@click.argument("manifest_out", type=click.Path(path_type=Path))
@click.argument("skips_out", type=click.Path(path_type=Path))
@params_option
@click.option("--section", "section_name", default="prepare", show_default=True, help="params.yaml section to read")
@writes("manifest_out", "skips_out")
def prepare(manifest_out: Path, skips_out: Path, params_path: Path, section_name: str) -> None:
    """Write MANIFEST_OUT (samples with readable images) and SKIPS_OUT (samples skipped, with reasons)."""
    p = section(params_path, section_name, PrepareParams)
    try:
        if p.format in BENCHMARKS:
            # embedded images (Parquet bytes, base64) are written once, next to the manifest
            records = benchmark_records(p, manifest_out.parent / "images")
        else:
            records = records_from_params(p)
        manifest, skips = build_manifest(records)
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    if manifest.num_rows == 0:
        # an empty manifest only fails later, far from the cause (dump: "max() arg is an empty sequence")
        first = f" (first: {skips.column('reason')[0].as_py()})" if skips.num_rows else ""
        raise click.ClickException(f"{p.input}: no usable record: all {skips.num_rows} skipped{first}")
    inputs = fingerprints(p.input)
    write_parquet(manifest, manifest_out, "manifest", params=asdict(p), inputs=inputs)
    write_parquet(skips, skips_out, "manifest_skips", params=asdict(p), inputs=inputs)
    click.echo(f"prepare: {manifest.num_rows} samples -> {manifest_out}; {skips.num_rows} skipped -> {skips_out}")
    for row in skips.slice(0, SHOWN_SKIPS).to_pylist():
        image = f" ({row['image']})" if row["image"] else ""
        click.echo(f"  skipped {row['sample_id'] or '?'}: {row['reason']}{image}", err=True)
    if skips.num_rows > SHOWN_SKIPS:
        click.echo(f"  ... and {skips.num_rows - SHOWN_SKIPS} more in {skips_out}", err=True)
