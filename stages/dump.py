"""dump: response->image attention at the configured layers and visual hidden-state norms, to zarr (resumable).

One process: ``sdrpn dump ...``. Several GPUs or nodes: the same command under torchrun, e.g. ``torchrun
--nproc_per_node 4 -m stages.cli dump artifacts/manifest.parquet artifacts/responses.parquet
artifacts/attention.zarr``. Every rank writes the store's shards it owns (shard ``s`` on rank ``s % world``)
into the one work store, each finished shard recorded in its own file; rank 0 creates the store first and,
once every rank is done, checks every shard, finalizes and publishes it: the same bytes at any world size. A
rerun after any rank died (with any world size) writes only the shards without a record.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ModelParams
from pipeline.distributed import DistInfo, barrier, finish, init_distributed
from pipeline.io.attention_store import AttentionStoreWriter
from pipeline.io.contracts import read_parquet
from pipeline.io.locks import publish_dir
from pipeline.io.resumable import job_key
from pipeline.models import load_adapter
from pipeline.teacher.dump import dump_attention, max_visual_tokens, padding_masks, select_samples
from pipeline.teacher.params import DumpParams
from stages.common import (
    fingerprints,
    model_fingerprint,
    params_option,
    progress_option,
    report_skips,
    writes,
    writing,
)
from stages.params import section
from stages.preflight import check_layers, probe_model

MANIFEST_READ = ["sample_id", "image", "question", "width", "height"]


def response_columns(path: Path) -> list[str] | None:
    """The responses columns dump reads; ``skip_reason`` only where the file has it (older ones do not)."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return None  # all: read_parquet then says what is wrong with the file, naming it
    return ["sample_id", "response_token_ids", *(["skip_reason"] if "skip_reason" in names else [])]


def rank_device(device: str, info: DistInfo) -> str:
    """The device of this rank: under torchrun ``auto``/``cuda`` mean the GPU of its local rank."""
    if info.world > 1 and device in ("auto", "cuda"):
        import torch

        return f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return device


@click.command("dump")
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("responses_path", type=click.Path(exists=True, path_type=Path))
@click.argument("store_out", type=click.Path(path_type=Path))
@params_option
@progress_option
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default="artifacts/.work",
    show_default=True,
    help="where an unfinished store is kept so a rerun resumes",
)
@writes("store_out")
def dump(
    manifest_path: Path, responses_path: Path, store_out: Path, params_path: Path, progress: bool, work_dir: Path
) -> None:
    """Write STORE_OUT (zarr 3) from the samples in MANIFEST_PATH and their RESPONSES_PATH."""
    # every params value is checked, also against the model's config, before weights load or a work store exists
    model = section(params_path, "model", ModelParams)
    params = section(params_path, "dump", DumpParams)
    probe = probe_model(params_path, model)
    check_layers(params_path, probe, "dump.layers", params.layers)
    # only the columns dump reads: the rest (answers, prompts, response texts) would grow its memory with the manifest
    manifest = read_parquet(manifest_path, "manifest", columns=MANIFEST_READ)
    responses = read_parquet(responses_path, "responses", columns=response_columns(responses_path))
    try:
        manifest, skipped = select_samples(probe, manifest, responses)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    info = init_distributed()
    if info.is_main:
        report_skips("dump", skipped, f"{store_out} (attrs.skipped)")
    if manifest.num_rows == 0:
        raise click.ClickException(f"dump: no sample to dump, all {len(skipped)} were left out (reasons above)")
    inputs = fingerprints(manifest_path, responses_path)
    inputs[model.path] = model_fingerprint(model.path)
    work = Path(work_dir) / f"dump-{job_key(inputs=inputs, params=asdict(params))}.zarr"
    # another dump of the same job (same inputs and params, any STORE_OUT) writes into the same store: one at a
    # time, checked before the model loads. Rank 0 locks the store, rank r > 0 a name of its own, so a second
    # job stops at once on every rank.
    mine = work if info.is_main else work.with_name(f"{work.name}.rank{info.rank}")
    with writing(work_dirs=(mine,)):
        barrier(info)  # every rank holds its lock before rank 0 touches the store
        adapter = load_adapter(model.path, rank_device(model.device, info), model.dtype, **model.adapter_options())
        if info.is_main:
            if work.exists() and AttentionStoreWriter.resumable(work):
                writer = AttentionStoreWriter.open_existing(work)
                done = writer.n_samples - sum(hi - lo for lo, hi in writer.pending_ranges())
                click.echo(f"dump: resuming {work}, {done} samples already written")
            else:
                if work.exists():
                    click.echo(f"dump: {work} has an older store layout; starting it again")
                writer = AttentionStoreWriter.create(
                    work,
                    n_samples=manifest.num_rows,
                    layers=params.layers,
                    max_visual=max_visual_tokens(adapter, manifest),
                    heads=list(range(adapter.attention_geometry[0])) if params.per_head else None,
                    attrs={
                        "model_id": adapter.model_id,
                        "include_eos": params.include_eos,
                        "params": {"model": model.to_dict(), "dump": asdict(params)},
                        "inputs": inputs,
                        "skipped": skipped,  # {sample_id: reason}: manifest samples the store leaves out
                    },
                    chunk_samples=params.chunk_samples,
                    known_bg=bool(padding_masks(adapter, manifest)),  # the view has padding: store which tokens
                )
        barrier(info)  # the store exists and its finished shards are checked before any other rank writes
        if not info.is_main:
            writer = AttentionStoreWriter.open_existing(work, check=False)
        dump_attention(adapter, manifest, responses, params, writer, progress=progress, info=info, finalize=False)
        barrier(info)  # every rank's shards are written and recorded
        if info.is_main:
            writer.finalize()
            publish_dir(work, store_out)  # the old store stays whole until the finished one replaces it
            click.echo(
                f"dump: {manifest.num_rows} samples ({len(skipped)} left out), layers {params.layers} -> {store_out}"
            )
    finish(info)
