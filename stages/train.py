"""train: the RPN on the label artifact (SPEC 2), to a safetensors checkpoint directory (resumable, DDP).

One process: ``sdrpn train ...``. Several GPUs or nodes: the same command under torchrun, e.g.
``torchrun --nproc_per_node 4 -m stages.cli train artifacts/manifest.parquet artifacts/labels.parquet ...``.
"""

from __future__ import annotations

import csv
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import click

from pipeline.config import ModelParams
from pipeline.distributed import finish, init_distributed
from pipeline.io.contracts import read_parquet
from pipeline.io.locks import atomic_path
from pipeline.io.resumable import job_key
from pipeline.models import load_adapter
from pipeline.student.params import TrainParams, resolve_train_params
from pipeline.student.train import PLOT_COLUMNS, join_samples, params_dict, train_rpn
from stages.common import (
    fingerprints,
    model_fingerprint,
    params_option,
    progress_option,
    set_option,
    write_text,
    writing,
)
from stages.params import apply_overrides, checked, raw_section, section
from stages.preflight import probe_model


def train_params(params_path: Path, overrides: tuple[str, ...] = ()) -> TrainParams:
    """The ``train`` section resolved against its preset (``train.preset``), every key listed and checked."""
    values = apply_overrides(raw_section(params_path, "train"), overrides)
    return checked(lambda: resolve_train_params(values, complete=True), params_path)


@click.command("train")
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("labels_path", type=click.Path(exists=True, path_type=Path))
@click.argument("ckpt_out", type=click.Path(path_type=Path))
@click.option("--metrics", "metrics_out", type=click.Path(path_type=Path), required=True, help="final metrics JSON")
@click.option("--plots", "plots_out", type=click.Path(path_type=Path), required=True, help="per-step loss/lr CSV")
@params_option
@progress_option
@set_option
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default="artifacts/.work",
    show_default=True,
    help="where training states are saved so a rerun resumes",
)
def train(
    manifest_path: Path,
    labels_path: Path,
    ckpt_out: Path,
    metrics_out: Path,
    plots_out: Path,
    params_path: Path,
    progress: bool,
    overrides: tuple[str, ...],
    work_dir: Path,
) -> None:
    """Write CKPT_OUT (RPN weights + rpn_config.json) trained on LABELS_PATH for the samples of MANIFEST_PATH."""
    # every params value is checked, also against the model's config, before weights load or a state dir exists
    model = section(params_path, "model", ModelParams)
    params = train_params(params_path, overrides)
    n_layers = len(probe_model(params_path, model).decoder_layers)
    if n_layers < params.B + params.R:  # the RPN copies layers B..B+R-1
        raise click.UsageError(
            f"{params_path}: train.B/train.R: the RPN copies layers B..B+R-1 = {params.B}..{params.B + params.R - 1}, "
            f"past the model's {n_layers} decoder layers (got B={params.B}, R={params.R})"
        )
    info = init_distributed()
    device = model.device
    if info.world > 1 and device in ("auto", "cuda"):
        import torch

        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    samples, n_skipped = join_samples(
        read_parquet(manifest_path, "manifest"), read_parquet(labels_path, "labels"), soft=params.objective == "mse"
    )
    inputs = fingerprints(manifest_path, labels_path)
    inputs[model.path] = model_fingerprint(model.path)
    state_dir = Path(work_dir) / f"train-{job_key(inputs=inputs, params=params_dict(params))}"
    # rank 0 alone writes the outputs and the training state, so it alone holds their locks for the whole run
    locks = writing(ckpt_out, metrics_out, plots_out, work_dirs=(state_dir,)) if info.is_main else nullcontext()
    with locks:
        # same adapter options (Qwen: resolution) as decode/dump, so the visual grid is the one the labels are on
        adapter = load_adapter(model.path, device, model.dtype, **model.adapter_options())
        result = train_rpn(adapter, samples, params, n_skipped=n_skipped, state_dir=state_dir, progress=progress)
        if info.is_main:
            result.rpn.save(ckpt_out, label_hash=inputs[str(labels_path)], extra={"train_params": params_dict(params)})
            write_text(metrics_out, json.dumps(result.metrics, indent=2) + "\n")
            with atomic_path(plots_out) as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=PLOT_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(result.records)
            shutil.rmtree(state_dir, ignore_errors=True)
            click.echo(f"train: {len(samples)} samples ({n_skipped} skipped), metrics {result.metrics} -> {ckpt_out}")
    finish(info)
