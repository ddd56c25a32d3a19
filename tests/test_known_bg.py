"""Known-background tokens (the padding of a square view): the store's optional known_bg array, written by dump
from the adapter's padding_tokens, and passed to assign_labels by label_block when the preset sets mask_known_bg."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zarr

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.io.contracts import ContractError
from pipeline.teacher.dump import dump_attention, known_bg_block, max_visual_tokens, padding_masks
from pipeline.teacher.label_presets import PRESETS, resolve_label_params
from pipeline.teacher.labels import assign_labels, label_block
from pipeline.teacher.params import DumpParams
from tests.conftest import random_images

SIDE = 24
V = SIDE * SIDE


def _store_rows(n, seed=0, heads=24, layers=(16, 19, 9, 22, 23)):
    """Per-head maps on a 24 x 24 grid with a bright square, sinks planted at sink heads, and padding rows/cols."""
    rng = np.random.default_rng(seed)
    att = rng.random((n, len(layers), heads, V), dtype=np.float32) * 1e-3
    known = np.zeros((n, V), bool)
    for i in range(n):
        y, x = rng.integers(2, SIDE - 6, 2)
        g = att[i].reshape(len(layers), heads, SIDE, SIDE)
        g[:, :, y : y + 3, x : x + 3] += 0.05
        g[:, :, 0, 0] += 0.2  # brighter than the object: it wins unless it is known padding
        pad = i % 3  # 0: square image; 1: top/bottom rows padding; 2: left/right columns padding
        if pad:
            k = np.zeros((SIDE, SIDE), bool)
            if pad == 1:
                k[:2], k[-2:] = True, True
            else:
                k[:, :3], k[:, -3:] = True, True
            known[i] = k.reshape(-1)
    norms = rng.random((n, len(layers), V), dtype=np.float32)
    return att, norms, known, list(layers)


def _write(path, att, norms, known, layers, with_known=True, grid=(SIDE, SIDE)):
    n = len(att)
    w = AttentionStoreWriter.create(path, n, layers, V, heads=list(range(att.shape[2])), known_bg=with_known)
    ids = [f"s{i}" for i in range(n)]
    w.write(0, ids, np.tile(grid, (n, 1)), np.full(n, 3), att, norms, known if with_known else None)
    w.finalize()
    return open_attention_store(path)


def test_store_round_trip_and_old_store(tmp_path):
    att, norms, known, layers = _store_rows(300, heads=2, layers=(0,))
    st = _write(tmp_path / "k.zarr", att, norms, known, layers)
    assert st.has_known_bg
    blocks = list(st.iter_chunks())
    np.testing.assert_array_equal(np.concatenate([b.known_bg for b in blocks]), known)
    assert st.read(5, 9).known_bg.dtype == bool
    old = _write(tmp_path / "old.zarr", att, norms, known, layers, with_known=False)
    assert not old.has_known_bg and old.read(0, 10).known_bg is None
    np.testing.assert_array_equal(old.read(0, 300).attention, st.read(0, 300).attention)


def test_writer_checks_known_bg(tmp_path):
    att, norms, known, layers = _store_rows(4, heads=2, layers=(0,))
    w = AttentionStoreWriter.create(tmp_path / "a.zarr", 4, layers, V, heads=[0, 1])
    with pytest.raises(ValueError, match="without known_bg"):
        w.write(0, list("abcd"), np.tile([SIDE, SIDE], (4, 1)), np.ones(4), att, norms, known)
    w = AttentionStoreWriter.create(tmp_path / "b.zarr", 4, layers, V + 10, heads=[0, 1], known_bg=True)
    bad = np.zeros((4, V + 10), bool)
    bad[2, V + 3] = True  # past the sample's 576 tokens
    with pytest.raises(ValueError, match="past grid_h"):
        w.write(0, list("abcd"), np.tile([SIDE, SIDE], (4, 1)), np.ones(4), att, norms, bad)
    w.write(0, list("abcd"), np.tile([SIDE, SIDE], (4, 1)), np.ones(4), att, norms)  # omitted: all False
    w.finalize()
    st = open_attention_store(tmp_path / "b.zarr")
    assert st.read(0, 4).known_bg.shape == (4, V + 10) and not st.read(0, 4).known_bg.any()
    g = zarr.open_group(str(tmp_path / "b.zarr"), mode="r+")
    del g["known_bg"]
    g.create_array("known_bg", shape=(4, V), chunks=(4, V), dtype="bool", fill_value=False)
    with pytest.raises(ContractError, match="'known_bg' has shape"):
        open_attention_store(tmp_path / "b.zarr")


@pytest.mark.parametrize("preset", ["qwen2_5_vl_7b", "qwen2_5_vl_7b_text"])
def test_label_block_passes_known_bg_with_qwen_presets(tmp_path, preset):
    att, norms, known, layers = _store_rows(30, seed=1)
    params = resolve_label_params({"preset": preset})
    assert params.mask_known_bg
    st = _write(tmp_path / "k.zarr", att, norms, known, layers)
    block = st.read(0, 30)
    got = label_block(st, block, params)
    kw = {"store_layers": layers, "store_heads": list(range(24)), "n_response": block.n_response}
    want = assign_labels(att, norms, block.grid, block.sample_ids, params, known_bg=known, **kw)
    without = assign_labels(att, norms, block.grid, block.sample_ids, params, **kw)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    padded = known.any(axis=1)
    assert (got["n_sink"][padded] >= known.sum(axis=1)[padded]).all()
    assert (got["labels"][known] != 1).all()  # padding is never fg
    assert not np.array_equal(got["labels"][padded], without["labels"][padded])  # the mask mattered
    # an old store (no array) labels as before: as assign_labels without known_bg
    old = _write(tmp_path / "old.zarr", att, norms, known, layers, with_known=False)
    got_old = label_block(old, old.read(0, 30), params)
    for k in without:
        np.testing.assert_array_equal(got_old[k], without[k], err_msg=k)
    # a preset that does not ask for the mask ignores the array
    off = resolve_label_params({"preset": preset, "mask_known_bg": False})
    got_off = label_block(st, block, off)
    np.testing.assert_array_equal(got_off["labels"], without["labels"])


def test_presets_mask_known_bg_only_for_qwen():
    for name in PRESETS:
        assert resolve_label_params({"preset": name}).mask_known_bg == name.startswith("qwen"), name


def test_known_bg_block():
    masks = {(10, 20): np.array([True, False, False, True])}
    out = known_bg_block(masks, [(10, 20), (30, 30)], [(2, 2), (3, 3)])
    assert out.shape == (2, 9)
    assert out[0].tolist() == [True, False, False, True, False, False, False, False, False] and not out[1].any()
    with pytest.raises(ValueError, match="gave 4 tokens"):
        known_bg_block(masks, [(10, 20)], [(3, 3)])


def _manifest(tmp_path, images):
    (tmp_path / "img").mkdir(exist_ok=True)
    refs = []
    for i, im in enumerate(images):
        p = tmp_path / "img" / f"{i}.png"
        im.save(p)
        refs.append(str(p))
    ids = [f"s{i}" for i in range(len(images))]
    manifest = pa.table(
        {
            "sample_id": ids,
            "image": refs,
            "question": ["what is in the box ?"] * len(images),
            "width": [im.size[0] for im in images],
            "height": [im.size[1] for im in images],
        }
    )
    responses = pa.table({"sample_id": ids, "response_token_ids": [[20, 21]] * len(images)})
    return manifest, responses


def test_dump_writes_padding_tokens(tmp_path, adapter, monkeypatch):
    """A stub padding_tokens on the toy adapter: the store gets its masks per image size; without it, no array."""
    images = random_images(5)
    manifest, responses = _manifest(tmp_path, images)
    max_v = max_visual_tokens(adapter, manifest)

    def stub(width, height):
        gh, gw = adapter.visual_grid(width, height)
        if width == height:
            return None  # a square image: no padding
        m = np.zeros((gh, gw), bool)
        m[0] = True  # the first token row, say
        return m.reshape(-1)

    params = DumpParams(layers=[1], batch_size=2)
    monkeypatch.setattr(adapter, "padding_tokens", stub, raising=False)
    masks = padding_masks(adapter, manifest)
    assert set(masks) == {im.size for im in images if im.size[0] != im.size[1]}
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", 5, [1], max_v, known_bg=bool(masks))
    dump_attention(adapter, manifest, responses, params, w, progress=False)
    block = open_attention_store(tmp_path / "s.zarr").read(0, 5)
    for i, im in enumerate(images):
        gh, gw = block.grid[i]
        want = np.zeros(max_v, bool)
        if im.size[0] != im.size[1]:
            want[:gw] = True
        np.testing.assert_array_equal(block.known_bg[i], want, err_msg=str(im.size))

    monkeypatch.setattr(adapter, "padding_tokens", lambda w, h: None, raising=False)
    assert padding_masks(adapter, manifest) == {}
    monkeypatch.delattr(adapter, "padding_tokens", raising=False)
    if not callable(getattr(adapter, "padding_tokens", None)):
        assert padding_masks(adapter, manifest) == {}
