"""evaluate: baseline vs SD-RPN two-stage inference (and the ablation ladder) on an evaluation manifest."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
import polars as pl

from pipeline.config import ModelParams
from pipeline.distributed import finish, init_distributed
from pipeline.inference.evaluate import TableRows, predict_parts, summarize
from pipeline.inference.params import EvalParams
from pipeline.io.contracts import read_parquet, write_parquet
from pipeline.io.locks import atomic_path
from pipeline.io.resumable import PartStore, job_key
from pipeline.models import ModelAdapter, load_adapter
from pipeline.student.rpn import RPN
from stages.common import fingerprints, model_fingerprint, params_option, progress_option, write_text, writes
from stages.evaluate_params import eval_params
from stages.params import section
from stages.preflight import check_layers, probe_model


def stage2_adapter(model: ModelParams, params: EvalParams) -> ModelAdapter:
    """The model as two-stage inference runs it: the ``model`` options and ``evaluate.crop_size``."""
    crop = {} if params.crop_size is None else {"crop_size": params.crop_size}
    return load_adapter(model.path, model.device, model.dtype, **model.adapter_options(), **crop)


def check_against_model(params_path: Path, model: ModelParams, params: EvalParams) -> None:
    """What only the model can tell about the ``evaluate`` values (crop size vs its patch, the raw-attention
    layers vs its depth), from its config alone: before any weights load."""
    crop = {} if params.crop_size is None else {"crop_size": params.crop_size}
    probe = probe_model(params_path, model, **crop)
    if params.raw_attention:
        key = "evaluate.raw_attention_layers (from label.layers/label.heads/dump.layers)"
        check_layers(params_path, probe, key, params.raw_attention_layers)


def _named_dir(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=DIR, got {value!r}")
    return name, Path(path)


@click.command("evaluate")
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("rpn_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("predictions_out", type=click.Path(path_type=Path))
@click.option("--metrics", "metrics_out", type=click.Path(path_type=Path), required=True, help="metrics JSON")
@click.option("--plots", "plots_out", type=click.Path(path_type=Path), required=True, help="per-method table (CSV)")
@click.option("--ablation", "ablations", multiple=True, help="NAME=DIR: another RPN checkpoint to evaluate")
@params_option
@progress_option
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default="artifacts/.work",
    show_default=True,
    help="where finished batches are kept so a rerun resumes",
)
@writes("predictions_out", "metrics_out", "plots_out")
def evaluate(
    manifest_path: Path,
    rpn_dir: Path,
    predictions_out: Path,
    metrics_out: Path,
    plots_out: Path,
    ablations: tuple[str, ...],
    params_path: Path,
    progress: bool,
    work_dir: Path,
) -> None:
    """Answer MANIFEST_PATH with every method; write PREDICTIONS_OUT, --metrics and --plots."""
    # every params value is checked, also against the model's config, before weights load or an output exists
    model = section(params_path, "model", ModelParams)
    params = eval_params(params_path)
    check_against_model(params_path, model, params)
    manifest = read_parquet(manifest_path, "manifest")
    inputs = fingerprints(manifest_path, rpn_dir, *(p for _, p in map(_named_dir, ablations)))
    inputs[model.path] = model_fingerprint(model.path)
    params_used = {"model": model.to_dict(), "evaluate": asdict(params)}
    info = init_distributed()  # under torchrun: this rank's share of the batches (pipeline/distributed.py)
    with PartStore(work_dir, "evaluate", job_key(inputs=inputs, params=params_used), info.rank, info.world) as parts:
        adapter = stage2_adapter(model, params)
        rpns = {"sdrpn": RPN.load(adapter, rpn_dir).eval()}
        for name, path in map(_named_dir, ablations):
            rpns[name] = RPN.load(adapter, path).eval()
        done = predict_parts(adapter, TableRows(manifest), rpns, params, parts, progress=progress)
        if done is not None:  # rank 0, every batch written; the other ranks' work ends with their batches
            table, seconds = done
            metrics = summarize(table, seconds)
            write_parquet(table, predictions_out, "predictions", params=params_used, inputs=inputs)
            for out in (metrics_out, plots_out):
                out.parent.mkdir(parents=True, exist_ok=True)
            write_text(metrics_out, json.dumps(metrics, indent=2) + "\n")
            rows = [{"method": m, **{k: v for k, v in d.items() if k != "n"}} for m, d in metrics.items()]
            with atomic_path(plots_out) as tmp:
                pl.DataFrame(rows).write_csv(tmp)
            parts.cleanup()
            click.echo(json.dumps(metrics, indent=2))
    finish(info)
