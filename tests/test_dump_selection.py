"""Which samples ``dump`` runs (``select_samples``): responses joined by sample id whatever their order, decode's
skips and responses past the context left out under the right id, the same answer in chunks of any size, and a
missing response named. Mutation testing found this join covered only by the subprocess pipeline tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import pipeline.teacher.dump as dump
from pipeline.io.manifest import MANIFEST_COLUMNS
from pipeline.teacher.decode import RESPONSE_COLUMNS
from pipeline.teacher.dump import padding_masks, response_index, select_samples

CONTEXT = 2048  # the conftest toy LLaVA's max_position_embeddings
N = 7
LONG = {"s5"}  # made with another context: prompt + response no longer fits
DECODE_SKIPPED = {"s2": "prompt past the model's context: (made up)"}


def _manifest(sizes=None) -> pa.Table:
    sizes = sizes or [(64, 64)] * N
    rows = [
        {
            "sample_id": f"s{i}",
            "image": f"{i}.png",
            "question": "what is in the red box ?",
            "answer": "a",
            "width": w,
            "height": h,
            "source": "unit",
        }
        for i, (w, h) in enumerate(sizes)
    ]
    return pa.Table.from_pylist(rows, schema=MANIFEST_COLUMNS)


def _responses(order, with_skip_column=True) -> pa.Table:
    rows = []
    for i in order:
        sid = f"s{i}"
        row = {"sample_id": sid, "prompt": "p", "response": "r", "model_id": "toy", "finish_reason": "eos"}
        row["response_token_ids"] = [5] * (CONTEXT if sid in LONG else 2 + i)
        if sid in DECODE_SKIPPED:
            row.update(response_token_ids=[], finish_reason="skipped", skip_reason=DECODE_SKIPPED[sid])
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=RESPONSE_COLUMNS)
    return table if with_skip_column else table.drop_columns(["skip_reason"])


def test_response_index_follows_sample_ids():
    manifest = _manifest()
    index = response_index(manifest, _responses([3, 0, 6, 1, 5, 2, 4, 9]))
    assert index.to_pylist() == [1, 3, 5, 0, 6, 4, 2]


def test_a_missing_response_is_named():
    with pytest.raises(ValueError, match=r"^responses: no response for sample\(s\) \['s1', 's4'\] \(2 in all\)"):
        response_index(_manifest(), _responses([0, 2, 3, 5, 6]))


@pytest.mark.parametrize("chunk", [1, 2, 3, 1024])
def test_select_samples_in_chunks_of_any_size(adapter, monkeypatch, chunk):
    monkeypatch.setattr(dump, "SELECT_ROWS", chunk)
    manifest = _manifest()
    kept, skipped = select_samples(adapter, manifest, _responses([6, 5, 4, 3, 2, 1, 0]))
    assert kept.column("sample_id").to_pylist() == ["s0", "s1", "s3", "s4", "s6"]
    assert set(skipped) == {"s2", "s5"}
    assert skipped["s2"] == f"decode: {DECODE_SKIPPED['s2']}"
    assert (
        skipped["s5"].startswith("prompt past the model's context:") and f"+ {CONTEXT} response tokens" in skipped["s5"]
    )


def test_responses_without_the_skip_column_have_no_decode_skips(adapter):
    manifest = _manifest()
    kept, skipped = select_samples(adapter, manifest, _responses(range(N), with_skip_column=False))
    assert sorted(skipped) == ["s5"] and kept.num_rows == N - 1


def test_everything_kept_is_the_manifest_itself(adapter):
    manifest = _manifest().filter(pa.array([i not in (2, 5) for i in range(N)]))
    kept, skipped = select_samples(adapter, manifest, _responses(range(N)))
    assert kept is manifest and skipped == {}


def test_padding_masks_are_flat_per_size():
    class Padded:
        def padding_tokens(self, width, height):
            return None if width == height else np.eye(2, dtype=np.int8)  # a (grid_h, grid_w) mask

    masks = padding_masks(Padded(), _manifest([(64, 64), (80, 40), (80, 40), (40, 80)]))
    assert sorted(masks) == [(40, 80), (80, 40)]
    for mask in masks.values():
        assert mask.dtype == bool and mask.tolist() == [True, False, False, True]
    assert padding_masks(object(), _manifest()) == {}
