"""label-report: how well raw attention and the labels localise, where ground-truth boxes exist."""

from __future__ import annotations

import json
from pathlib import Path

import click
import polars as pl

from pipeline.config import ModelParams
from pipeline.io.attention_store import open_attention_store
from pipeline.io.contracts import read_parquet
from pipeline.io.locks import atomic_path
from pipeline.models.geometry import gt_token_masks
from pipeline.teacher.label_report import label_quality
from stages.common import params_option, write_text, writes
from stages.label import label_params
from stages.params import section
from stages.preflight import probe_model


@click.command("label-report")
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("store_path", type=click.Path(exists=True, path_type=Path))
@click.argument("metrics_out", type=click.Path(path_type=Path))
@click.argument("fig3_out", type=click.Path(path_type=Path))
@params_option
@writes("metrics_out", "fig3_out")
def label_report(manifest_path: Path, store_path: Path, metrics_out: Path, fig3_out: Path, params_path: Path) -> None:
    """Write METRICS_OUT (JSON, DVC metrics) and FIG3_OUT (TSV, DVC plot) for samples with a GT box."""
    params = label_params(params_path)
    model = section(params_path, "model", ModelParams)
    adapter = probe_model(params_path, model, device=False)  # geometry only: from the config, no weights
    store = open_attention_store(store_path)
    manifest = read_parquet(manifest_path, "manifest")
    rows = {r["sample_id"]: r for r in manifest.to_pylist()}
    missing = [s for s in store.sample_ids if s not in rows]
    if missing:
        raise click.ClickException(f"{store_path}: samples {missing[:5]} are not in {manifest_path}")
    spans = []
    for sid in store.sample_ids:
        r = rows[sid]
        box = (r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"])
        spans.append(None if None in box else adapter.grid_span(box, r["width"], r["height"]))
    masks, has_gt = gt_token_masks(spans, store.grid, store.max_visual)
    metrics, hist = label_quality(store, params, masks, has_gt)
    for out in (metrics_out, fig3_out):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_text(metrics_out, json.dumps(metrics, indent=2) + "\n")
    with atomic_path(fig3_out) as tmp:
        pl.DataFrame(hist).write_csv(tmp, separator="\t")
    click.echo(json.dumps(metrics, indent=2))
