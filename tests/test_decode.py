"""Greedy decoding: batching does not change answers, positions match a teacher-forced forward, resumption."""

from __future__ import annotations

import pytest
import torch

import pipeline.teacher.decode as decode_mod
from pipeline.io.manifest import build_manifest, records_from_table
from pipeline.io.resumable import PartStore
from pipeline.teacher.decode import RESPONSE_COLUMNS, decode_batch, decode_manifest
from pipeline.teacher.params import DecodeParams
from tests.conftest import random_images

QUESTIONS = ["what is in the red box ?", "what is in the box ?", "a b c", "what colour is the shape ?"]


def test_batched_equals_one_by_one(adapter):
    images = random_images(4)
    batched = decode_batch(adapter, images, QUESTIONS, max_new_tokens=6)
    single = [decode_batch(adapter, [im], [q], max_new_tokens=6)[0] for im, q in zip(images, QUESTIONS, strict=True)]
    assert [r["response_token_ids"] for r in batched] == [r["response_token_ids"] for r in single]
    assert all(r["finish_reason"] in {"eos", "length"} for r in batched)


def test_teacher_forced_forward_reproduces_greedy_tokens(adapter):
    """The dump's forward (prompt + response, left padded) sees the same positions generate() saw."""
    images = random_images(4)
    rows = decode_batch(adapter, images, QUESTIONS, max_new_tokens=5)
    responses = [r["response_token_ids"] for r in rows]
    batch = adapter.build_batch(images, [adapter.render_prompt(q) for q in QUESTIONS], responses)
    with torch.no_grad():
        logits = adapter.model(**adapter.forward_inputs(batch)).logits
    seq = logits.shape[1]
    for i, resp in enumerate(responses):
        predicted = logits[i, seq - len(resp) - 1 : seq - 1].argmax(-1).tolist()
        assert predicted == resp


def test_decode_resumes_without_redoing_batches(adapter, records_jsonl, tmp_path, monkeypatch):
    manifest, _ = build_manifest(records_from_table(records_jsonl))
    params = DecodeParams(batch_size=2, max_new_tokens=3)
    parts = PartStore(tmp_path / "work", "decode", "k1")
    calls = []
    real = decode_mod.decode_batch

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_mod, "decode_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        decode_manifest(adapter, manifest, params, parts, progress=False)
    assert parts.n_done() == 1
    calls.clear()
    monkeypatch.setattr(decode_mod, "decode_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    table = decode_manifest(adapter, manifest, params, parts, progress=False)
    assert len(calls) == 2  # 3 batches, the first was already done
    assert table.column("sample_id").to_pylist() == manifest.column("sample_id").to_pylist()
    fresh = decode_manifest(adapter, manifest, params, PartStore(tmp_path / "w2", "decode", "k2"), progress=False)
    assert table.column("response_token_ids").to_pylist() == fresh.column("response_token_ids").to_pylist()
    assert table.schema.equals(RESPONSE_COLUMNS)
    assert table.to_pylist() == fresh.to_pylist()  # every column, not only the tokens: resuming changes nothing
    assert table.column("skip_reason").null_count == table.num_rows  # all six fit the context
    assert set(table.column("finish_reason").to_pylist()) <= {"eos", "length"}
    lengths = [len(t) for t in table.column("response_token_ids").to_pylist()]
    assert all(1 <= n <= params.max_new_tokens for n in lengths), lengths
