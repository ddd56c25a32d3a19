"""One benchmark end to end: its documents as a manifest with lmms-eval's prompts, every method's answers batch
by batch (each batch a resumable part), and each method's score by the benchmark's lmms-eval rules.

The methods are evaluate's (:func:`~pipeline.inference.evaluate.method_names` with one RPN and no raw-attention
ablation): the baseline and SD-RPN in each upscaling mode, answering the same batches so throughput relative to
the baseline is measured side by side. ``max_new_tokens`` is the lmms-eval task's, not evaluate's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pyarrow as pa

from pipeline.benchmarks.prompts import build_prompt, final_answer, generation_kwargs
from pipeline.benchmarks.scorers import SCORERS
from pipeline.inference.evaluate import predict_parts
from pipeline.inference.params import EvalParams
from pipeline.io.resumable import PartStore
from pipeline.models.base import ModelAdapter
from pipeline.student.rpn import RPN

# schemas/benchmark_manifest.v1.json: the documents as the stage records them
DOC_COLUMNS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("question_id", pa.string()),
        ("image", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("options", pa.list_(pa.string())),
        ("category", pa.string()),
        ("subset", pa.string()),
        ("source", pa.string()),
    ]
)


def benchmark_params(
    name: str, family: str, params: EvalParams, batch_size: int, max_new_tokens: int | None = None
) -> EvalParams:
    """evaluate's settings as benchmark ``name`` runs them on a ``family`` model: the lmms-eval task's
    ``max_new_tokens`` (at most ``max_new_tokens`` when given), no raw-attention ablation."""
    task = generation_kwargs(name, family)["max_new_tokens"]
    if task is None and max_new_tokens is None:
        raise ValueError(
            f"{name}: lmms-eval gives no max_new_tokens for a {family} model; set benchmarks.max_new_tokens"
        )
    limit = min(x for x in (task, max_new_tokens) if x is not None)
    return replace(params, batch_size=batch_size, max_new_tokens=int(limit), raw_attention=False)


def prompt_rows(name: str, docs: list[dict], family: str) -> list[dict]:
    """Manifest rows for two-stage inference: ``question`` is lmms-eval's prompt for ``family``, no GT box."""
    rows = []
    for doc in docs:
        row = {k: doc[k] for k in ("sample_id", "image", "width", "height", "answer", "answers", "source")}
        row.update(question=build_prompt(name, doc, family), box_x0=None, box_y0=None, box_x1=None, box_y1=None)
        rows.append(row)
    return rows


def answer_benchmark(
    adapter: ModelAdapter,
    name: str,
    docs: list[dict],
    rpn: RPN,
    params: EvalParams,
    parts: PartStore,
    progress: bool = True,
) -> tuple[pa.Table, dict[str, float]] | None:
    """Every method's answer to every document (predictions in batch order, each batch method by method) and the
    seconds each method spent; batches already in ``parts`` (an earlier, interrupted run) are not redone. Under
    torchrun each rank answers its own batches and rank 0 alone gets the result (the others None)."""
    scorer = SCORERS[name]
    by_id = {doc["sample_id"]: doc for doc in docs}

    def score_one(row: dict, response: str) -> float:
        return scorer.process(by_id[row["sample_id"]], final_answer(name, adapter.family, response))["score"]

    rows = prompt_rows(name, docs, adapter.family)
    return predict_parts(adapter, rows, {"sdrpn": rpn}, params, parts, scorer=score_one, progress=progress, desc=name)


def score_benchmark(name: str, family: str, docs: list[dict], predictions: pa.Table, seconds: dict[str, float]) -> dict:
    """Per method: lmms-eval's aggregate metrics (``score`` on the paper's scale), ``n``, ``n_skipped`` (questions
    past the model's context: left out of the aggregate, as lmms-eval cannot score an answer never given),
    ``seconds`` and ``throughput_vs_baseline``."""
    scorer = SCORERS[name]
    by_id = {doc["sample_id"]: doc for doc in docs}
    records: dict[str, list[dict]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in predictions.select(["sample_id", "method", "response", "skip_reason"]).to_pylist():
        counts[row["method"]][0] += 1
        if row["skip_reason"] is not None and not row["response"]:
            counts[row["method"]][1] += 1
            continue
        answer = final_answer(name, family, row["response"])
        records[row["method"]].append(scorer.process(by_id[row["sample_id"]], answer))
    metrics = {}
    for method, (n, n_skipped) in counts.items():
        m = dict(scorer.aggregate(records[method])) if records[method] else {"score": None}
        m.update(n=n, n_skipped=n_skipped, seconds=seconds.get(method, 0.0))
        if seconds.get(method) and seconds.get("baseline"):
            m["throughput_vs_baseline"] = seconds["baseline"] / seconds[method]
        metrics[method] = m
    return metrics
