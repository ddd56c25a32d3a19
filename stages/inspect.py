"""inspect: PNGs of what the pipeline sees for chosen samples (maps, sinks, labels, RPN map, crops, answers)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import click
import numpy as np

from pipeline.config import ModelParams
from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.params import InferenceSettings
from pipeline.inference.two_stage import two_stage_batch
from pipeline.io.attention_store import open_attention_store
from pipeline.io.contracts import read_parquet
from pipeline.io.images import load_image
from pipeline.report.inspect_view import SampleView, model_view, render
from pipeline.student.rpn import RPN
from pipeline.teacher.decode import context_skips, decode_batch
from pipeline.teacher.labels import LabelParams, label_block
from stages.common import params_option
from stages.evaluate import check_against_model, stage2_adapter
from stages.evaluate_params import eval_params
from stages.label import label_params
from stages.params import section

_UNSAFE = re.compile(r"(?:[^A-Za-z0-9._-]|\.{2,})+")  # runs of unsafe characters and of dots ('..')
MAX_NAME = 120  # characters of the id kept in a file name (file systems allow 255 bytes)


def output_name(sample_id: str) -> str:
    """A file name for ``sample_id`` inside the output folder: the id itself when it is safe, else readable and unique.

    Ids are data and may hold '/', '..' or anything else: each run of characters outside ``[A-Za-z0-9._-]``
    or of dots becomes one '_', leading '.' and '_' are dropped (no hidden files), and an id changed or
    shortened so gets 8 hex digits of its hash, so two ids never share a file.
    """
    safe = _UNSAFE.sub("_", sample_id).lstrip("._")[:MAX_NAME]
    if safe != sample_id or not safe:
        safe = f"{safe or 'sample'}-{hashlib.sha256(sample_id.encode()).hexdigest()[:8]}"
    return f"{safe}.png"


def _teacher_maps(store_path: Path, sample_id: str, params: LabelParams) -> dict | None:
    """Raw attention, sinks and labels of one sample, recomputed from the store exactly as `label` does."""
    if not store_path.exists():
        return None
    store = open_attention_store(store_path)
    where = np.flatnonzero(store.sample_ids == sample_id)
    if not len(where):
        return None
    i = int(where[0])
    block = store.read(i, i + 1)
    out = label_block(store, block, params, return_maps=True)
    h, w = (int(v) for v in block.grid[0])
    return {
        "raw_attention": np.asarray(out["raw_map"][0][: h * w], dtype=np.float64).reshape(h, w),
        "sinks": out["sink"][0][: h * w].reshape(h, w),
        "labels": out["labels"][0][: h * w].reshape(h, w),
    }


@click.command("inspect")
@click.argument("sample_ids", nargs=-1, required=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default="artifacts/inspect", show_default=True)
@click.option(
    "--manifest",
    "manifests",
    multiple=True,
    type=click.Path(path_type=Path),
    default=["artifacts/manifest.parquet", "artifacts/eval/manifest.parquet"],
    show_default=True,
)
@click.option(
    "--store", "store_path", type=click.Path(path_type=Path), default="artifacts/attention.zarr", show_default=True
)
@click.option("--rpn", "rpn_dir", type=click.Path(path_type=Path), default="artifacts/rpn", show_default=True)
@params_option
def inspect(
    sample_ids: tuple[str, ...],
    out_dir: Path,
    manifests: tuple[Path, ...],
    store_path: Path,
    rpn_dir: Path,
    params_path: Path,
) -> None:
    """Write OUT_DIR/SAMPLE_ID.png for each sample: image + GT box + crops, raw attention, sinks, labels, RPN map.

    An id with characters unsafe in a file name ('/', '..', spaces, ...) is written under a sanitised name with
    a short hash (see :func:`output_name`); the name is printed.
    """
    # every params section it uses is checked, also against the model's config, before weights load
    model = section(params_path, "model", ModelParams)
    evaluate = eval_params(params_path)
    labels = label_params(params_path)
    check_against_model(params_path, model, evaluate)
    rows = {}
    for m in manifests:
        if m.exists():
            rows.update({r["sample_id"]: r for r in read_parquet(m, "manifest").to_pylist()})
    missing = [s for s in sample_ids if s not in rows]
    if missing:
        raise click.ClickException(f"samples {missing} are in none of {list(map(str, manifests))}")
    adapter = stage2_adapter(model, evaluate)
    rpn = RPN.load(adapter, rpn_dir).eval() if rpn_dir.exists() else None
    # a release records the settings evaluate ran it with; train's checkpoint takes them from params.yaml
    settings = (InferenceSettings.of_checkpoint(rpn_dir) if rpn is not None else None) or InferenceSettings.from_eval(
        evaluate
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    max_new = settings.max_new_tokens
    for sid in sample_ids:
        r = rows[sid]
        image = load_image(r["image"], sid)
        box = (r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"])
        view = SampleView(sid, image, r["question"], r.get("answer"), None if None in box else box)
        skip = context_skips(adapter, [r["question"]], [(r["width"], r["height"])], max_new)[0]
        if skip is not None:  # the model would answer nonsense: show why there is no answer instead
            click.echo(f"inspect: {sid}: not answered, {skip}", err=True)
            view.answers["baseline"] = f"(not answered: {skip})"
        else:
            view.answers["baseline"] = decode_batch(adapter, [image], [r["question"]], max_new)[0]["response"]
        if rpn is not None and skip is None:
            maps = rpn_maps(rpn)([image], [r["question"]]).maps
            rows2, _ = two_stage_batch(adapter, [image], [r["question"]], maps, settings.roi, max_new)
            view.rpn_map, view.crop_boxes = maps[0], rows2[0]["crop_boxes"]
            view.answers[f"SD-RPN ({settings.roi.mode})"] = rows2[0]["response"]
        for key, value in (_teacher_maps(store_path, sid, labels) or {}).items():
            setattr(view, key, value)
        ip = adapter.processor.image_processor
        pixels = adapter.build_batch([image], [adapter.render_prompt(r["question"])]).inputs["pixel_values"][0]
        if pixels.ndim == 3:  # (3, H, W): the processor's own view, exactly as the model sees it
            base = model_view(pixels.float().cpu(), ip.image_mean, ip.image_std)
        else:  # patch-flattened (Qwen2.5-VL): the image it patches, padded as the view pads
            base = adapter.view_image(image)
        picture = render(view, base)
        target = out_dir / output_name(sid)
        picture.save(target)
        click.echo(f"inspect: {sid} -> {target}")
