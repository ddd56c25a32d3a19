"""Greedy, batched self-responses: the teacher answers each question about its own image."""

from __future__ import annotations

import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.io.images import load_images
from pipeline.io.resumable import PartStore
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
    ]
)


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
) -> pa.Table:
    """Decode every manifest row in batches; finished batches in ``parts`` are not redone."""
    ids = manifest.column("sample_id").to_pylist()
    refs = manifest.column("image").to_pylist()
    questions = manifest.column("question").to_pylist()
    n_batches = (len(ids) + params.batch_size - 1) // params.batch_size
    bar = tqdm(total=len(ids), desc="decode", unit="sample", disable=not progress, dynamic_ncols=True)
    for b in range(n_batches):
        lo, hi = b * params.batch_size, min((b + 1) * params.batch_size, len(ids))
        if parts.done(b):
            bar.update(hi - lo)
            continue
        images = load_images(refs[lo:hi], ids[lo:hi])
        rows = decode_batch(adapter, images, questions[lo:hi], params.max_new_tokens)
        for sid, row in zip(ids[lo:hi], rows, strict=True):
            row["sample_id"] = sid
        parts.write(b, pa.Table.from_pylist(rows, schema=RESPONSE_COLUMNS))
        bar.update(hi - lo)
    bar.close()
    if n_batches == 0:
        return RESPONSE_COLUMNS.empty_table()
    return parts.collect()
