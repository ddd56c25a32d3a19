"""benchmarks: the paper's benchmarks from local copies, baseline vs SD-RPN, scored as lmms-eval scores them.

For each benchmark configured in ``params.yaml: benchmarks.sets`` (none by default: the stage then only writes a
table saying so) it writes ``OUT_DIR/<name>/``: ``manifest.parquet`` (the documents), ``manifest_skips.parquet``,
``predictions.parquet`` and ``metrics.json``; then ``OUT_DIR/table.md`` (the paper's two tables) and ``--metrics``
(every benchmark's metrics). Each benchmark's answers are kept batch by batch under the work dir
(``benchmark-<name>-<key>/``, a few KB per batch; the key hashes the prompts, images, model, RPN and settings) and
stay there, so an interrupted run, or adding a benchmark to ``sets``, redoes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import pyarrow as pa

from pipeline.benchmarks.formats import read_benchmark
from pipeline.benchmarks.params import BenchmarkSet, BenchmarksParams
from pipeline.benchmarks.run import DOC_COLUMNS, answer_benchmark, benchmark_params, prompt_rows, score_benchmark
from pipeline.benchmarks.table import markdown_tables
from pipeline.config import ModelParams
from pipeline.distributed import DistInfo, finish, init_distributed
from pipeline.inference.params import EvalParams
from pipeline.io.contracts import write_parquet
from pipeline.io.locks import atomic_path
from pipeline.io.manifest import SKIP_COLUMNS
from pipeline.io.resumable import PartStore, job_key
from pipeline.models import ModelAdapter
from pipeline.student.rpn import RPN
from stages.common import (
    fingerprints,
    model_fingerprint,
    params_option,
    progress_option,
    report_skips,
    write_text,
    writes,
)
from stages.evaluate import check_against_model, stage2_adapter
from stages.evaluate_params import eval_params
from stages.params import section


@click.command("benchmarks")
@click.argument("rpn_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--metrics", "metrics_out", type=click.Path(path_type=Path), required=True, help="metrics JSON")
@click.option(
    "--image-dir",
    type=click.Path(path_type=Path),
    default="artifacts/benchmark_images",
    show_default=True,
    help="where images embedded in a benchmark's files are written (once, content-addressed)",
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default="artifacts/.work",
    show_default=True,
    help="where finished batches are kept so a rerun resumes",
)
@params_option
@progress_option
@writes("out_dir", "metrics_out")
def benchmarks(
    rpn_dir: Path,
    out_dir: Path,
    metrics_out: Path,
    image_dir: Path,
    work_dir: Path,
    params_path: Path,
    progress: bool,
) -> None:
    """Run every configured benchmark with RPN_DIR; write OUT_DIR/<name>/, OUT_DIR/table.md and --metrics."""
    config = section(params_path, "benchmarks", BenchmarksParams)
    sets = config.selected()
    info = init_distributed()  # under torchrun: every rank answers its share, rank 0 writes (pipeline/distributed.py)
    answered: list[Answered] = []
    if sets:
        model = section(params_path, "model", ModelParams)
        params = eval_params(params_path)
        check_against_model(params_path, model, params)
        adapter = stage2_adapter(model, params)
        rpn = RPN.load(adapter, rpn_dir).eval()
        for bench in sets:
            got = answer_one(
                adapter,
                rpn,
                model,
                rpn_dir,
                bench,
                run_params(bench.name, adapter.family, params, config),
                image_dir,
                work_dir,
                info,
                progress,
            )
            answered += [got] if got is not None else []
    if info.is_main:
        write_outputs(answered, out_dir, metrics_out, adapter.family if sets else "")
    finish(info)


def run_params(name: str, family: str, params: EvalParams, config: BenchmarksParams) -> EvalParams:
    """The benchmark's settings, or a usage error naming the key to set."""
    try:
        return benchmark_params(name, family, params, config.batch_size, config.max_new_tokens)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@dataclass
class Answered:
    """One benchmark's documents, skipped records, predictions and timings, and what made them."""

    bench: BenchmarkSet
    docs: list[dict]
    skips: list[dict]
    predictions: pa.Table
    seconds: dict[str, float]
    params_used: dict
    inputs: dict[str, str]


def answer_one(
    adapter: ModelAdapter,
    rpn: RPN,
    model: ModelParams,
    rpn_dir: Path,
    bench: BenchmarkSet,
    params: EvalParams,
    image_dir: Path,
    work_dir: Path,
    info: DistInfo,
    progress: bool,
) -> Answered | None:
    """Read and answer one benchmark (this rank's batches); rank 0 gets everything to write, the others None."""
    name = bench.name
    root = None if bench.image_root is None else Path(bench.image_root)
    docs, skips = read_benchmark(name, Path(bench.path), image_dir / name, image_root=root, n=bench.n)
    if info.is_main:
        report_skips(name, {s["sample_id"]: s["reason"] for s in skips}, f"{name}/manifest_skips.parquet")
    if not docs:
        raise click.ClickException(f"{name}: no usable question in {bench.path}: every record was skipped (above)")
    inputs = fingerprints(bench.path, rpn_dir)
    inputs[model.path] = model_fingerprint(model.path)
    # the parts depend on the prompts and images actually fed, the model, the RPN and the settings
    prompts = json.dumps(prompt_rows(name, docs, adapter.family), sort_keys=True).encode()
    key = job_key(prompts=hashlib.sha256(prompts).hexdigest(), inputs=inputs, params=asdict(params))
    with PartStore(work_dir, f"benchmark-{name}", key, info.rank, info.world) as parts:
        if parts.n_done() and info.is_main:
            click.echo(f"{name}: resuming, {parts.n_done()} finished batches found in {parts.dir}")
        done = answer_benchmark(adapter, name, docs, rpn, params, parts, progress)
    if done is None:
        return None
    params_used = {"benchmarks": asdict(bench), "model": model.to_dict(), "evaluate": asdict(params)}
    return Answered(bench, docs, skips, *done, params_used, inputs)


def write_outputs(answered: list[Answered], out_dir: Path, metrics_out: Path, family: str) -> None:
    """Score every benchmark and write OUT_DIR (built aside, then replacing it whole) and the metrics file."""
    results: dict[str, dict] = {}
    with atomic_path(out_dir, directory=True) as tmp:
        for a in answered:
            name, dest = a.bench.name, tmp / a.bench.name
            dest.mkdir(parents=True)
            meta = {"params": a.params_used, "inputs": a.inputs}
            write_parquet(
                pa.Table.from_pylist(a.docs, schema=DOC_COLUMNS),
                dest / "manifest.parquet",
                "benchmark_manifest",
                **meta,
            )
            write_parquet(
                pa.Table.from_pylist(a.skips, schema=SKIP_COLUMNS),
                dest / "manifest_skips.parquet",
                "manifest_skips",
                **meta,
            )
            write_parquet(a.predictions, dest / "predictions.parquet", "predictions", **meta)
            results[name] = score_benchmark(name, family, a.docs, a.predictions, a.seconds)
            write_text(dest / "metrics.json", json.dumps(results[name], indent=2) + "\n")
            click.echo(f"{name}: " + ", ".join(f"{m} {v['score']}" for m, v in results[name].items()))
        table = markdown_tables(results)
        write_text(tmp / "table.md", table)
        # the writers' sibling lock files inside this private directory guard nothing once it is published, and
        # would make the output's bytes differ from run to run (they hold a pid)
        for lock in tmp.rglob(".*.lock"):
            lock.unlink()
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    write_text(metrics_out, json.dumps(results, indent=2) + "\n")
    click.echo(table)
