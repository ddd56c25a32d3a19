"""The evaluate stage's work: baseline vs SD-RPN (and the ablation ladder) on one manifest, in one run.

Every method answers the same batches, so accuracy, localisation and throughput relative to the
baseline are measured side by side: the baseline (original view), SD-RPN with masked and box
upscaling, RoI from the teacher's raw attention (no RPN), and any further RPNs (ablations).

A sample whose prompt plus ``max_new_tokens`` does not fit the model's context (the rule of
:func:`~pipeline.teacher.decode.context_skips`) is answered by no method: each method gets a row with an empty
response, score 0 and the reason in ``skip_reason``, so accuracy stays over the whole manifest and the metrics
count them (``n_skipped``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.inference.params import EvalParams
from pipeline.inference.roi import RoI
from pipeline.inference.scoring import score
from pipeline.inference.two_stage import Stage1Output, two_stage_batch
from pipeline.io.images import load_images
from pipeline.io.resumable import PartStore, run_parts
from pipeline.models.base import ModelAdapter
from pipeline.models.geometry import gt_token_masks
from pipeline.student.rpn import RPN
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import context_skips, decode_batch
from pipeline.teacher.labels import LabelParams, attention_map, label_plan

PREDICTION_COLUMNS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("method", pa.string()),
        ("response", pa.string()),
        ("score", pa.float64()),
        ("found", pa.bool_()),
        ("crop_boxes", pa.list_(pa.list_(pa.int32()))),
        ("n_crop_tokens", pa.int32()),
        ("roi_precision", pa.float64()),
        ("box_recall", pa.float64()),
        ("iou", pa.float64()),
        ("skip_reason", pa.string()),  # null: answered as the method intends
    ]
)


def check_crop_size(adapter: ModelAdapter, crop_size: int | None) -> None:
    """Refuse an adapter not built with the ``crop_size`` the parameters ask for (the metrics would lie)."""
    built = getattr(adapter, "crop_size", None)
    if crop_size is not None and built != crop_size:
        raise ValueError(
            f"evaluate.crop_size is {crop_size} but the {adapter.family} adapter encodes crops at "
            f"{built or 'the base view'}; build it with load_adapter(..., crop_size={crop_size})"
        )


def rpn_maps(rpn: RPN, reuse_prefix: bool = False) -> Callable[[list[Image.Image], list[str]], Stage1Output]:
    """Stage 1: one partial forward (frozen B layers + RPN) -> a :class:`Stage1Output` of sigmoid maps.

    With ``reuse_prefix`` the output also carries what stage 2 can take over: the prefix cache (LLaVA, and any
    family with ``supports_prefix_reuse``), else the original views' visual tokens (``supports_feature_reuse``,
    Qwen2.5-VL); without it, or for a family with neither, only the maps.
    """
    adapter = rpn.adapter
    reuse_cache = reuse_prefix and adapter.supports_prefix_reuse
    reuse_features = reuse_prefix and not reuse_cache and adapter.supports_feature_reuse

    @torch.no_grad()
    def maps(images: list[Image.Image], questions: list[str]) -> Stage1Output:
        batch = adapter.build_batch(images, [adapter.render_prompt(q) for q in questions]).to(adapter.device)
        prefix = features = None
        if reuse_cache:
            logits, prefix = rpn.stage1(batch)
        elif reuse_features:
            with adapter.capture_image_features() as features:
                logits = rpn(batch)
        else:
            logits = rpn(batch)
        prob = torch.sigmoid(logits.float()).cpu().numpy()
        out = [p[: h * w].reshape(h, w) for p, (h, w) in zip(prob, batch.grids, strict=True)]
        return Stage1Output(out, prefix, features)

    return maps


def raw_attention_maps(
    adapter: ModelAdapter,
    images: list[Image.Image],
    questions: list[str],
    responses: list[list[int]],
    layers: list[int],
    include_last_prompt: bool = False,
) -> list[np.ndarray]:
    """The teacher's own answer->image attention (head and layer mean), divided by its max, on each grid.

    The map is the label stage's aggregation (:func:`attention_map`, :func:`label_plan` with these layers) over
    the captured per-layer head-means: one layer gives the captured float32 values, several their float64 mean.
    """
    batch = adapter.build_batch(images, [adapter.render_prompt(q) for q in questions], responses)
    cap = capture_attention(adapter, batch, layers, include_last_prompt=include_last_prompt)
    plan = label_plan(LabelParams(layers=list(layers), sink_method="none"), layers, None)  # head-mean: no heads axis
    att = attention_map(cap.attention.cpu().numpy(), plan.select)  # (B, L, V) -> (B, V)
    out = []
    for a, (h, w) in zip(att, batch.grids, strict=True):
        a = a[: h * w]
        out.append((a / a.max() if a.max() > 0 else a).reshape(h, w))
    return out


def _localisation(adapter: ModelAdapter, row: dict, roi: RoI, man: dict) -> tuple[float, float, float]:
    """(share of RoI tokens inside the GT box, GT centre inside a crop, IoU of the crops' hull with the GT box)."""
    box = (man["box_x0"], man["box_y0"], man["box_x1"], man["box_y1"])
    if None in box:
        return float("nan"), float("nan"), float("nan")
    if not roi.found:
        return float("nan"), 0.0, 0.0
    h, w = roi.mask.shape
    span = adapter.grid_span(box, man["width"], man["height"])
    gt, _ = gt_token_masks([span], np.array([[h, w]]), h * w)
    inside = float((roi.mask.ravel() & gt[0]).sum() / max(roi.mask.sum(), 1))
    crops = row["crop_boxes"]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    recall = float(any(c[0] <= cx < c[2] and c[1] <= cy < c[3] for c in crops))
    if not crops:
        return inside, recall, 0.0
    hull = (min(c[0] for c in crops), min(c[1] for c in crops), max(c[2] for c in crops), max(c[3] for c in crops))
    ix = max(0.0, min(hull[2], box[2]) - max(hull[0], box[0]))
    iy = max(0.0, min(hull[3], box[3]) - max(hull[1], box[1]))
    inter = ix * iy
    union = (hull[2] - hull[0]) * (hull[3] - hull[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inside, recall, inter / union if union > 0 else 0.0


def method_names(rpns: dict[str, RPN], params: EvalParams, main: str = "sdrpn") -> list[str]:
    """The methods evaluate runs, in table order: the baseline, each RPN's upscaling modes, raw attention."""
    methods = ["baseline"]
    for name in rpns:
        methods += [f"{name}_{mode}" for mode in (params.modes if name == main else ["masked"])]
    return methods + (["raw_attention"] if params.raw_attention else [])


def evaluate_manifest(
    adapter: ModelAdapter,
    manifest: pa.Table,
    rpns: dict[str, RPN],
    params: EvalParams,
    main: str = "sdrpn",
    progress: bool = True,
) -> tuple[pa.Table, dict]:
    """Answer every manifest question with every method; returns (per-sample predictions, metrics).

    ``rpns`` maps a method name to an RPN; ``main`` gets every upscaling mode in ``params.modes``,
    the others (ablations) masked upscaling only.
    """
    check_crop_size(adapter, params.crop_size)
    rows_man = manifest.to_pylist()
    seconds: dict[str, float] = defaultdict(float)
    out: list[dict] = []
    bar = tqdm(total=len(rows_man), desc="evaluate", unit="sample", disable=not progress)
    for start in range(0, len(rows_man), params.batch_size):
        batch = rows_man[start : start + params.batch_size]
        out += predict_batch(adapter, batch, rpns, params, seconds, main)
        bar.update(len(batch))
    bar.close()
    table = pa.Table.from_pylist(out, schema=PREDICTION_COLUMNS)
    return table, summarize(table, seconds)


Scorer = Callable[[dict, str], float]
SECONDS_COLUMN = "seconds"  # in parts only: a row's share of its method's time on its batch


class TableRows(Sequence):
    """A table's rows as dicts, converted slice by slice when asked: a manifest of any length costs Arrow memory
    only, never a list of Python dicts."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int | slice) -> dict | list[dict]:  # type: ignore[override]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("TableRows slices take no step")
            return self.table.slice(start, max(stop - start, 0)).to_pylist()
        return self.table.slice(index, 1).to_pylist()[0]


def predict_parts(
    adapter: ModelAdapter,
    rows: Sequence[dict],
    rpns: dict[str, RPN],
    params: EvalParams,
    parts: PartStore,
    main: str = "sdrpn",
    scorer: Scorer | None = None,
    progress: bool = True,
    desc: str = "evaluate",
) -> tuple[pa.Table, dict[str, float]] | None:
    """:func:`predict_batch` over the manifest rows ``rows``, one part per batch (finished parts are not redone;
    under torchrun each rank answers the batches ``parts`` says it owns). Rank 0 returns the predictions (batch
    order, each batch method by method) and the seconds each method spent, summed over every batch and rank;
    the other ranks return None. ``rows`` may be a :class:`TableRows` (only the current batch becomes dicts)."""
    check_crop_size(adapter, params.crop_size)
    n_batches = (len(rows) + params.batch_size - 1) // params.batch_size

    def span(b: int) -> list[dict]:
        return rows[b * params.batch_size : (b + 1) * params.batch_size]

    def answer_part(b: int) -> pa.Table:
        batch = span(b)
        seconds: dict[str, float] = defaultdict(float)
        out = predict_batch(adapter, batch, rpns, params, seconds, main, scorer)
        # each row carries its share of its method's time on the batch, so the parts alone give the totals
        shares = pa.array([seconds[r["method"]] / len(batch) for r in out], pa.float64())
        return pa.Table.from_pylist(out, schema=PREDICTION_COLUMNS).append_column(SECONDS_COLUMN, shares)

    if not run_parts(parts, n_batches, answer_part, lambda b: len(span(b)), desc, progress):
        return None
    if n_batches == 0:
        return PREDICTION_COLUMNS.empty_table(), {}
    done = parts.collect(n_batches)
    totals: dict[str, float] = defaultdict(float)
    for method, share in zip(done.column("method").to_pylist(), done.column(SECONDS_COLUMN).to_pylist(), strict=True):
        totals[method] += share
    return done.drop_columns([SECONDS_COLUMN]), dict(totals)


def predict_batch(
    adapter: ModelAdapter,
    batch: list[dict],
    rpns: dict[str, RPN],
    params: EvalParams,
    seconds: dict[str, float],
    main: str = "sdrpn",
    scorer: Scorer | None = None,
) -> list[dict]:
    """Prediction rows (:data:`PREDICTION_COLUMNS`) of every method for the manifest rows ``batch``, method by
    method, each in ``batch``'s order; adds each method's time to ``seconds``.

    ``scorer(manifest_row, response)`` scores one answer; by default :func:`score` with ``params.scoring``.
    """
    if scorer is None:

        def scorer(man: dict, response: str) -> float:
            try:
                return score(response, man.get("answer"), man.get("answers"), params.scoring)
            except ValueError as err:
                raise ValueError(f"sample {man.get('sample_id')!r}: {err}") from None

    methods = method_names(rpns, params, main)
    reasons = context_skips(
        adapter, [r["question"] for r in batch], [(r["width"], r["height"]) for r in batch], params.max_new_tokens
    )
    chunk = [man for man, reason in zip(batch, reasons, strict=True) if reason is None]
    results = _answer(adapter, chunk, rpns, params, main, seconds) if chunk else {m: ([], []) for m in methods}
    out = []
    for method in methods:  # the batch's samples in manifest order, skipped ones in place
        answered = zip(chunk, *results[method], strict=True)
        for entry, reason in zip(batch, reasons, strict=True):
            if reason is not None:
                out.append(_skipped_prediction(entry["sample_id"], method, reason))
                continue
            man, row, roi = next(answered)
            loc = _localisation(adapter, row, roi, man) if roi is not None else (float("nan"),) * 3
            out.append(
                {
                    "sample_id": man["sample_id"],
                    "method": method,
                    "response": row["response"],
                    "score": float(scorer(man, row["response"])),
                    # stage 2 dropped the crops (past the context): the answer is the original view's
                    "found": bool(roi is not None and roi.found and row.get("skip_reason") is None),
                    "crop_boxes": row.get("crop_boxes", []),
                    "n_crop_tokens": int(row.get("n_crop_tokens", 0)),
                    "roi_precision": loc[0],
                    "box_recall": loc[1],
                    "iou": loc[2],
                    "skip_reason": row.get("skip_reason"),
                }
            )
    return out


def _answer(
    adapter: ModelAdapter,
    chunk: list[dict],
    rpns: dict[str, RPN],
    params: EvalParams,
    main: str,
    seconds: dict[str, float],
) -> dict[str, tuple[list[dict], list[RoI | None]]]:
    """Every method's answer rows and RoIs for the manifest rows ``chunk``; adds each method's time to ``seconds``."""
    images = load_images([r["image"] for r in chunk], [r["sample_id"] for r in chunk])
    questions = [r["question"] for r in chunk]
    t0 = time.perf_counter()
    base = decode_batch(adapter, images, questions, params.max_new_tokens)
    t_base = time.perf_counter() - t0
    seconds["baseline"] += t_base
    results: dict[str, tuple[list[dict], list[RoI | None]]] = {"baseline": (base, [None] * len(chunk))}
    for name, rpn in rpns.items():
        for mode in params.modes if name == main else ["masked"]:
            method = f"{name}_{mode}"
            roi_params = params.roi_params(mode)
            t0 = time.perf_counter()
            results[method] = two_stage_batch(
                adapter, images, questions, rpn_maps(rpn, params.reuse_prefix), roi_params, params.max_new_tokens
            )
            seconds[method] += time.perf_counter() - t0
    if params.raw_attention:
        t0 = time.perf_counter()
        maps = raw_attention_maps(
            adapter,
            images,
            questions,
            [r["response_token_ids"] for r in base],
            params.raw_attention_layers,
            params.raw_attention_last_prompt,
        )
        roi_params = params.roi_params("masked", tau=params.raw_attention_tau)
        results["raw_attention"] = two_stage_batch(adapter, images, questions, maps, roi_params, params.max_new_tokens)
        # it needs the baseline answer first, so its cost includes the baseline's
        seconds["raw_attention"] += time.perf_counter() - t0 + t_base
    return results


def _skipped_prediction(sample_id: str, method: str, reason: str) -> dict:
    """The row of a sample no method answers: empty response, score 0 (unanswered is wrong), the reason."""
    nan = float("nan")
    row = {"sample_id": sample_id, "method": method, "response": "", "score": 0.0, "found": False}
    return {
        **row,
        "crop_boxes": [],
        "n_crop_tokens": 0,
        "roi_precision": nan,
        "box_recall": nan,
        "iou": nan,
        "skip_reason": reason,
    }


def summarize(predictions: pa.Table, seconds: dict[str, float]) -> dict:
    """Per-method accuracy, localisation and throughput relative to the baseline."""
    import polars as pl

    df = pl.from_arrow(predictions)
    metrics: dict = {}
    for method in df["method"].unique(maintain_order=True).to_list():
        d = df.filter(pl.col("method") == method)
        skipped = d["skip_reason"].is_not_null().sum()
        m = {"accuracy": float(d["score"].mean()), "n": d.height, "n_skipped": int(skipped)}
        if method != "baseline":
            m["region_found"] = float(d["found"].mean())
            for col in ("roi_precision", "box_recall", "iou"):
                vals = d[col].fill_nan(None).drop_nulls()
                m[col] = float(vals.mean()) if len(vals) else None
        if seconds.get(method):
            m["throughput_vs_baseline"] = seconds["baseline"] / seconds[method]
        metrics[method] = m
    return metrics
