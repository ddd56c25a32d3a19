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
    results: dict[str, dict] = {}
    # the directory is built aside and replaces OUT_DIR whole, so DVC never hashes a half-written one
    with atomic_path(out_dir, directory=True) as tmp:
        if sets:
            model = section(params_path, "model", ModelParams)
            params = eval_params(params_path)
            check_against_model(params_path, model, params)
            adapter = stage2_adapter(model, params)
            rpn = RPN.load(adapter, rpn_dir).eval()
            run = Run(adapter, rpn, model, rpn_dir, tmp, out_dir, image_dir, work_dir, progress)
            for bench in sets:
                results[bench.name] = run.benchmark(bench, run_params(bench.name, adapter.family, params, config))
        table = markdown_tables(results)
        write_text(tmp / "table.md", table)
        # the writers' sibling lock files inside this private directory guard nothing once it is published, and
        # would make the output's bytes differ from run to run (they hold a pid)
        for lock in tmp.rglob(".*.lock"):
            lock.unlink()
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    write_text(metrics_out, json.dumps(results, indent=2) + "\n")
    click.echo(table)


def run_params(name: str, family: str, params: EvalParams, config: BenchmarksParams) -> EvalParams:
    """The benchmark's settings, or a usage error naming the key to set."""
    try:
        return benchmark_params(name, family, params, config.batch_size, config.max_new_tokens)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@dataclass
class Run:
    """What every benchmark of one stage run shares: the model and RPN, and where things go."""

    adapter: ModelAdapter
    rpn: RPN
    model: ModelParams
    rpn_dir: Path
    out_dir: Path  # where the outputs are written: a temp directory that then becomes ``published``
    published: Path
    image_dir: Path
    work_dir: Path
    progress: bool

    def benchmark(self, bench: BenchmarkSet, params: EvalParams) -> dict:
        """Read, answer and score one benchmark; write its directory under ``out_dir``; return its metrics."""
        name = bench.name
        root = None if bench.image_root is None else Path(bench.image_root)
        docs, skips = read_benchmark(name, Path(bench.path), self.image_dir / name, image_root=root, n=bench.n)
        inputs = fingerprints(bench.path, self.rpn_dir)
        inputs[self.model.path] = model_fingerprint(self.model.path)
        params_used = {"benchmarks": asdict(bench), "model": self.model.to_dict(), "evaluate": asdict(params)}
        dest = self.out_dir / name
        dest.mkdir(parents=True, exist_ok=True)
        manifest = pa.Table.from_pylist(docs, schema=DOC_COLUMNS)
        write_parquet(manifest, dest / "manifest.parquet", "benchmark_manifest", params=params_used, inputs=inputs)
        skipped = pa.Table.from_pylist(skips, schema=SKIP_COLUMNS)
        write_parquet(skipped, dest / "manifest_skips.parquet", "manifest_skips", params=params_used, inputs=inputs)
        report_skips(
            name, {s["sample_id"]: s["reason"] for s in skips}, self.published / name / "manifest_skips.parquet"
        )
        if not docs:
            raise click.ClickException(f"{name}: no usable question in {bench.path}: every record was skipped (above)")
        # the parts depend on the prompts and images actually fed, the model, the RPN and the settings
        prompts = json.dumps(prompt_rows(name, docs, self.adapter.family), sort_keys=True).encode()
        key = job_key(prompts=hashlib.sha256(prompts).hexdigest(), inputs=inputs, params=asdict(params))
        with PartStore(self.work_dir, f"benchmark-{name}", key) as parts:
            if parts.n_done():
                click.echo(f"{name}: resuming, {parts.n_done()} finished batches found in {parts.dir}")
            predictions, seconds = answer_benchmark(self.adapter, name, docs, self.rpn, params, parts, self.progress)
            write_parquet(predictions, dest / "predictions.parquet", "predictions", params=params_used, inputs=inputs)
            metrics = score_benchmark(name, self.adapter.family, docs, predictions, seconds)
            write_text(dest / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        click.echo(f"{name}: " + ", ".join(f"{m} {v['score']}" for m, v in metrics.items()))
        return metrics
