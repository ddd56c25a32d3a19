"""Greedy, batched self-responses: the teacher answers each question about its own image.

A sample whose prompt does not fit the model's context is not decoded (past ``max_position_embeddings`` a model
answers nonsense, with no error): it keeps its row, with an empty response, ``finish_reason`` ``skipped`` and
the reason in ``skip_reason`` (:func:`context_skips` states the rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import torch

from pipeline.io.images import load_images
from pipeline.io.resumable import PartStore, run_parts
from pipeline.models.base import ModelAdapter
from pipeline.teacher.params import DecodeParams

RESPONSE_COLUMNS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("response_token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
        ("model_id", pa.string()),
        ("skip_reason", pa.string()),  # null: decoded; else why not (nothing was generated)
    ]
)


def context_skips(
    adapter: ModelAdapter,
    questions: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    new_tokens: int | Sequence[int],
    what: str = "new tokens",
) -> list[str | None]:
    """Why each sample cannot be run within the model's context, None where it fits.

    The rule: a sample runs only if its prompt (chat template, question and the image's visual tokens, counted
    by :meth:`~pipeline.models.base.ModelAdapter.prompt_lengths`) plus ``new_tokens`` (decode and evaluate:
    ``max_new_tokens``; dump: the response's own tokens) fits ``context_length`` (the text config's
    ``max_position_embeddings``). Nothing is truncated: a cut question would be answered as another question.
    """
    limit = adapter.context_length
    if limit is None or not questions:
        return [None] * len(questions)
    extra = [new_tokens] * len(questions) if isinstance(new_tokens, int) else list(new_tokens)
    lengths = adapter.prompt_lengths(questions, sizes)
    return [
        None
        if n + k <= limit
        else f"prompt past the model's context: {n} prompt tokens + {k} {what} > {limit} (max_position_embeddings)"
        for n, k in zip(lengths, extra, strict=True)
    ]


def skipped_row(adapter: ModelAdapter, question: str, reason: str) -> dict:
    """The responses row of a sample that was not decoded: no tokens, ``finish_reason`` ``skipped``."""
    return {
        "prompt": adapter.render_prompt(question),
        "response": "",
        "response_token_ids": [],
        "finish_reason": "skipped",
        "model_id": adapter.model_id,
        "skip_reason": reason,
    }


@torch.no_grad()
def decode_batch(adapter: ModelAdapter, images: list, questions: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers for one batch; returns response rows without sample ids."""
    prompts = [adapter.render_prompt(q) for q in questions]
    batch = adapter.build_batch(images, prompts).to(adapter.device)
    out = adapter.model.generate(
        **batch.inputs,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=adapter.pad_token_id,
        eos_token_id=adapter.eos_token_ids,
    )
    new = out[:, batch.inputs["input_ids"].shape[1] :].tolist()
    return [response_row(adapter, prompt, toks) for prompt, toks in zip(prompts, new, strict=True)]


def response_row(adapter: ModelAdapter, prompt: str, toks: list[int]) -> dict:
    """A responses row from generated ids: cut after the first EOS (kept), drop the padding after it."""
    eos = set(adapter.eos_token_ids)
    cut = next((i for i, t in enumerate(toks) if t in eos), None)
    ids = toks[: cut + 1] if cut is not None else toks
    return {
        "prompt": prompt,
        "response": adapter.tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "response_token_ids": ids,
        "finish_reason": "eos" if cut is not None else "length",
        "model_id": adapter.model_id,
    }


def decode_manifest(
    adapter: ModelAdapter, manifest: pa.Table, params: DecodeParams, parts: PartStore, progress: bool = True
) -> pa.Table | None:
    """Decode every manifest row in batches; finished batches in ``parts`` are not redone.

    Samples past the model's context (:func:`context_skips`) get a skipped row instead of an answer, and their
    images are not read. Under torchrun each rank decodes the batches ``parts`` says it owns; rank 0 returns the
    whole table once every batch is written, the other ranks None.
    """
    n_rows = manifest.num_rows
    n_batches = (n_rows + params.batch_size - 1) // params.batch_size

    def size(b: int) -> int:
        return min(params.batch_size, n_rows - b * params.batch_size)

    def decode_part(b: int) -> pa.Table:
        # one batch of the manifest in Python objects at a time: memory does not grow with the manifest
        batch = manifest.slice(b * params.batch_size, size(b)).to_pylist()
        questions = [r["question"] for r in batch]
        reasons = context_skips(adapter, questions, [(r["width"], r["height"]) for r in batch], params.max_new_tokens)
        run = [r for r, reason in zip(batch, reasons, strict=True) if reason is None]
        answers = []
        if run:
            images = load_images([r["image"] for r in run], [r["sample_id"] for r in run])
            answers = decode_batch(adapter, images, [r["question"] for r in run], params.max_new_tokens)
        answered = iter(answers)
        rows = []
        for r, reason in zip(batch, reasons, strict=True):
            row = next(answered) if reason is None else skipped_row(adapter, r["question"], reason)
            row["sample_id"] = r["sample_id"]
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=RESPONSE_COLUMNS)

    if not run_parts(parts, n_batches, decode_part, size, "decode", progress):
        return None
    if n_batches == 0:
        return RESPONSE_COLUMNS.empty_table()
    return parts.collect(n_batches)
