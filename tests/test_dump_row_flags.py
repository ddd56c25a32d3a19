"""dump_attention passes include_eos and include_last_prompt on as themselves: the store holds what
capture_attention gives with those flags by keyword, on the same batch (issue 20, mutant 1)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.dump import dump_attention, max_visual_tokens
from pipeline.teacher.params import DumpParams
from tests.conftest import random_images

EOS = -7  # replaced by the adapter's EOS id
# uneven lengths, with and without a final EOS, one single-token answer: the row sets differ per flag
RESPONSES = [[20, 21, EOS], [22], [20, 21, 22, 23, EOS], [24, 25]]
QUESTIONS = ["what is in the red box ?", "a b", "what colour is the shape ?", "box"]
LAYERS = [1, 3]


@pytest.fixture(scope="module")
def inputs(adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("dump-flags")
    images = random_images(len(RESPONSES), seed=5)
    refs = []
    for i, im in enumerate(images):
        refs.append(str(root / f"{i}.png"))
        im.save(refs[-1])
    ids = [f"s{i}" for i in range(len(images))]
    manifest = pa.table(
        {
            "sample_id": ids,
            "image": refs,
            "question": QUESTIONS,
            "width": pa.array([im.size[0] for im in images], pa.int32()),
            "height": pa.array([im.size[1] for im in images], pa.int32()),
        }
    )
    eos = adapter.eos_token_ids[0]
    tokens = [[eos if t == EOS else t for t in r] for r in RESPONSES]
    responses = pa.table({"sample_id": ids, "response_token_ids": tokens})
    # the batch the dump builds (one batch of all four samples), for the reference capture
    batch = adapter.build_batch(images, [adapter.render_prompt(q) for q in QUESTIONS], tokens)
    return root, manifest, responses, batch


def _dump(adapter, inputs, per_head, include_eos, include_last_prompt):
    root, manifest, responses, _ = inputs
    params = DumpParams(
        layers=LAYERS,
        per_head=per_head,
        include_eos=include_eos,
        include_last_prompt=include_last_prompt,
        batch_size=len(RESPONSES),
    )
    heads = list(range(adapter.attention_geometry[0])) if per_head else None
    path = root / f"store-{int(per_head)}{int(include_eos)}{int(include_last_prompt)}.zarr"
    n = manifest.num_rows
    writer = AttentionStoreWriter.create(path, n, LAYERS, max_visual_tokens(adapter, manifest), heads=heads)
    dump_attention(adapter, manifest, responses, params, writer, progress=False)
    return open_attention_store(path).read(0, n)


@pytest.mark.parametrize("per_head", [False, True], ids=["head-mean", "per-head"])
@pytest.mark.parametrize(
    ("include_eos", "include_last_prompt"), [(True, False), (False, True)], ids=["eos", "last-prompt"]
)
def test_dump_stores_the_capture_of_its_own_flags(adapter, inputs, per_head, include_eos, include_last_prompt):
    batch = inputs[3]
    block = _dump(adapter, inputs, per_head, include_eos, include_last_prompt)
    want = capture_attention(
        adapter, batch, LAYERS, per_head=per_head, include_eos=include_eos, include_last_prompt=include_last_prompt
    )
    # rows by hand: the response tokens but the last, plus the last one (include_eos) or the last prompt token
    lengths = [len(r) for r in RESPONSES]
    assert block.n_response.tolist() == want.n_rows.tolist() == lengths
    np.testing.assert_array_equal(block.attention, want.attention.numpy())
    np.testing.assert_array_equal(block.hidden_norm, want.hidden_norm.numpy())
    # the two flag settings give the same row counts but different rows: the maps tell them apart
    swapped = capture_attention(
        adapter, batch, LAYERS, per_head=per_head, include_eos=include_last_prompt, include_last_prompt=include_eos
    )
    assert swapped.n_rows.tolist() == lengths
    gap = np.abs(block.attention - swapped.attention.numpy()).max(axis=tuple(range(1, block.attention.ndim)))
    assert (gap > 1e-4).all(), gap  # every sample's map moves when the flags are swapped


def test_default_flags_are_the_reference_rows(adapter, inputs):
    """Neither flag (the reference): every response token but the last; the single-token answer has no row."""
    block = _dump(adapter, inputs, False, False, False)
    want = capture_attention(adapter, inputs[3], LAYERS, per_head=False, include_eos=False, include_last_prompt=False)
    assert block.n_response.tolist() == [len(r) - 1 for r in RESPONSES]
    np.testing.assert_array_equal(block.attention, want.attention.numpy())
    assert (block.attention[1] == 0).all()
    assert torch.equal(want.n_rows, torch.tensor([2, 0, 4, 1]))


def test_dump_runs_batches_of_batch_size(adapter, inputs, monkeypatch):
    """batch_size 3 over 4 samples: two forwards (3 + 1), and the store holds what one batch of 4 gives."""
    import pipeline.teacher.dump as dump

    root, manifest, responses, _ = inputs
    sizes = []

    def counting(adapter, batch, *args, **kwargs):
        sizes.append(batch.inputs["input_ids"].shape[0])
        return capture_attention(adapter, batch, *args, **kwargs)

    monkeypatch.setattr(dump, "capture_attention", counting)
    path = root / "store-batch3.zarr"
    writer = AttentionStoreWriter.create(path, manifest.num_rows, LAYERS, max_visual_tokens(adapter, manifest))
    dump_attention(adapter, manifest, responses, DumpParams(layers=LAYERS, batch_size=3), writer, progress=False)
    assert sizes == [3, 1]
    block = open_attention_store(path).read(0, manifest.num_rows)
    whole = _dump(adapter, inputs, False, False, False)
    assert block.n_response.tolist() == whole.n_response.tolist()
    np.testing.assert_allclose(block.attention, whole.attention, atol=1e-5)
