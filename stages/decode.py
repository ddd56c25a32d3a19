"""decode: greedy self-responses of the model for every manifest sample (resumable)."""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow.compute as pc

from pipeline.config import ModelParams
from pipeline.distributed import finish, init_distributed
from pipeline.io.contracts import read_parquet, write_parquet
from pipeline.io.resumable import PartStore, job_key
from pipeline.models import load_adapter
from pipeline.teacher.decode import decode_manifest
from pipeline.teacher.params import DecodeParams
from stages.common import fingerprints, model_fingerprint, params_option, progress_option, report_skips, writes
from stages.params import section
from stages.preflight import probe_model


@click.command("decode")
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("responses_out", type=click.Path(path_type=Path))
@params_option
@progress_option
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default="artifacts/.work",
    show_default=True,
    help="where unfinished batches are kept so a rerun resumes",
)
@writes("responses_out")
def decode(manifest_path: Path, responses_out: Path, params_path: Path, progress: bool, work_dir: Path) -> None:
    """Write RESPONSES_OUT: the model's greedy answer to each question in MANIFEST_PATH."""
    # every params value is checked, also against the model's config, before weights load or a work dir exists
    model = section(params_path, "model", ModelParams)
    params = section(params_path, "decode", DecodeParams)
    probe_model(params_path, model)
    manifest = read_parquet(manifest_path, "manifest")
    inputs = fingerprints(manifest_path)
    inputs[model.path] = model_fingerprint(model.path)
    info = init_distributed()  # under torchrun: this rank's share of the batches (pipeline/distributed.py)
    # the parts' directory is locked while open: a second decode of the same job stops before the model loads
    with PartStore(work_dir, "decode", job_key(inputs=inputs, params=vars(params)), info.rank, info.world) as parts:
        if parts.n_done() and info.is_main:
            click.echo(f"decode: resuming, {parts.n_done()} finished batches found in {parts.dir}")
        adapter = load_adapter(model.path, model.device, model.dtype, **model.adapter_options())
        table = decode_manifest(adapter, manifest, params, parts, progress=progress)
        if table is not None:  # rank 0, every batch written
            params_used = {"model": model.to_dict(), "decode": vars(params)}
            write_parquet(table, responses_out, "responses", params=params_used, inputs=inputs)
            parts.cleanup()
    finish(info)
    if table is None:
        return
    rows = table.filter(pc.is_valid(table.column("skip_reason")))
    skipped = dict(zip(rows.column("sample_id").to_pylist(), rows.column("skip_reason").to_pylist(), strict=True))
    report_skips("decode", skipped, f"{responses_out} (skip_reason)")
    click.echo(f"decode: {table.num_rows - len(skipped)} responses, {len(skipped)} skipped -> {responses_out}")
