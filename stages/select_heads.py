"""select-heads: propose label layers, heads and a sink rule for a model from samples with ground-truth boxes.

Dumps per-head response->image attention and hidden-state norms of every layer (or ``select_heads.layers``) for
the first ``select_heads.n_samples`` manifest samples that have a GT box and an answer, into a resumable work
store (``artifacts/.work/select-<key>.zarr``; the same shards and records as ``dump``), then ranks heads and sinks
and combines the best heads (:mod:`pipeline.teacher.head_selection`). OUT_DIR gets ``preset.yaml`` (for
``label: {preset_file: ...}`` once copied under ``presets/``), ``report.md``, ``heatmap.png`` (layers x heads,
fg precision) and ``selection.json``. The label settings it compares with are the project's own (params.yaml's
``label``, on the layers ``dump`` stores). One process.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ModelParams
from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.io.contracts import read_parquet
from pipeline.io.locks import publish_dir
from pipeline.io.resumable import job_key
from pipeline.models import load_adapter
from pipeline.models.geometry import gt_token_masks
from pipeline.report.selection import heatmap, metrics, preset_yaml, report_md
from pipeline.teacher.dump import dump_attention, max_visual_tokens, padding_masks, select_samples
from pipeline.teacher.head_selection import SelectParams, select_heads
from pipeline.teacher.params import DumpParams
from stages.common import fingerprints, model_fingerprint, params_option, progress_option, writes, writing
from stages.dump import MANIFEST_READ, response_columns
from stages.label import label_params
from stages.params import section
from stages.preflight import check_layers, probe_model

BOX = ["box_x0", "box_y0", "box_x1", "box_y1"]


def with_boxes(manifest: pa.Table, n: int) -> pa.Table:
    """The first ``n`` rows that have a ground-truth box (manifest order)."""
    has = pc.invert(pc.is_null(manifest.column("box_x0")))
    return manifest.filter(has).slice(0, n)


@click.command("select-heads")
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("responses_path", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@params_option
@progress_option
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default="artifacts/.work",
    show_default=True,
    help="where the selection's attention store is kept so a rerun resumes",
)
@writes("out_dir")
def select_heads_cmd(
    manifest_path: Path, responses_path: Path, out_dir: Path, params_path: Path, progress: bool, work_dir: Path
) -> None:
    """Write OUT_DIR (preset.yaml, report.md, heatmap.png, selection.json) from MANIFEST_PATH's boxed samples."""
    model = section(params_path, "model", ModelParams)
    params = section(params_path, "select_heads", SelectParams)
    dump = section(params_path, "dump", DumpParams)
    label = label_params(params_path)
    probe = probe_model(params_path, model)
    layers = params.layers if params.layers is not None else list(range(len(probe.decoder_layers)))
    check_layers(params_path, probe, "select_heads.layers", layers)
    manifest = read_parquet(manifest_path, "manifest", columns=[*MANIFEST_READ, *BOX])
    responses = read_parquet(responses_path, "responses", columns=response_columns(responses_path))
    try:
        manifest, _ = select_samples(probe, manifest, responses)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    manifest = with_boxes(manifest, params.n_samples)
    if manifest.num_rows == 0:
        raise click.ClickException(f"select-heads: no sample of {manifest_path} has a ground-truth box and an answer")
    sel_dump = replace(dump, layers=layers, per_head=True, batch_size=params.batch_size)
    inputs = fingerprints(manifest_path, responses_path)
    inputs[model.path] = model_fingerprint(model.path)
    work = Path(work_dir) / f"select-{job_key(inputs=inputs, params=asdict(sel_dump), n=manifest.num_rows)}.zarr"
    with writing(work_dirs=(work,)):
        adapter = None
        if work.exists() and AttentionStoreWriter.resumable(work):
            writer = AttentionStoreWriter.open_existing(work)
        else:
            adapter = load_adapter(model.path, model.device, model.dtype, **model.adapter_options())
            writer = AttentionStoreWriter.create(
                work,
                n_samples=manifest.num_rows,
                layers=layers,
                max_visual=max_visual_tokens(adapter, manifest),
                heads=list(range(adapter.attention_geometry[0])),
                attrs={"model_id": adapter.model_id, "params": {"dump": asdict(sel_dump)}, "inputs": inputs},
                chunk_samples=sel_dump.chunk_samples,
                known_bg=bool(padding_masks(adapter, manifest)),
            )
        if writer.pending_units():
            adapter = adapter or load_adapter(model.path, model.device, model.dtype, **model.adapter_options())
            click.echo(f"select-heads: dumping {len(layers)} layers x every head of {manifest.num_rows} samples")
            dump_attention(adapter, manifest, responses, sel_dump, writer, progress=progress)
        elif writer.attrs.get("complete") is not True:
            writer.finalize()
    store = open_attention_store(work)
    rows = manifest.to_pylist()
    spans = [probe.grid_span(tuple(r[k] for k in BOX), r["width"], r["height"]) for r in rows]
    masks, has_gt = gt_token_masks(spans, store.grid, store.max_visual)
    # the project's label settings on the layers its dump stores: what the proposal is compared with
    baseline = replace(label, layers=label.layers or (None if isinstance(label.heads, dict) else dump.layers))
    result = select_heads(store, masks, has_gt, label, baseline, params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp = Path(tmp) / "out"
        tmp.mkdir()
        (tmp / "preset.yaml").write_text(preset_yaml(result, probe.model_id))
        (tmp / "report.md").write_text(report_md(result, probe.model_id))
        (tmp / "selection.json").write_text(json.dumps(metrics(result), indent=2, default=float) + "\n")
        heatmap(result.mean["fg_precision"], result.layers, result.heads, "fg precision per (layer, head)").save(
            tmp / "heatmap.png"
        )
        publish_dir(tmp, out_dir)
    click.echo(
        f"select-heads: {result.preset} -> {out_dir}; label fg precision {result.precision:.3f} "
        f"({result.n_kept} kept) vs {result.baseline_precision:.3f} ({result.baseline_kept} kept) now"
    )
