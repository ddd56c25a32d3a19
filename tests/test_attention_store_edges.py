"""Attention store edges mutation testing found unpinned: one-token-high grids, a store's default provenance,
and the message of a block of the wrong shape."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store


def _write(path, grids, attrs=None):
    n, layers = len(grids), [2, 4]
    w = AttentionStoreWriter.create(path, n, layers, 8, attrs=attrs)
    area = [h * wd for h, wd in grids]
    att = np.zeros((n, len(layers), 8), np.float32)
    for i, a in enumerate(area):
        att[i, :, :a] = 1.0 / a
    w.write(0, [f"s{i}" for i in range(n)], np.array(grids), np.ones(n, np.int32), att, np.ones_like(att))
    w.finalize()
    return open_attention_store(path)


def test_grids_one_token_high_or_wide(tmp_path):
    store = _write(tmp_path / "s.zarr", [(1, 8), (8, 1), (2, 3)])
    block = store.read(0, 3)
    assert block.grid.tolist() == [[1, 8], [8, 1], [2, 3]]
    assert np.allclose(block.attention[0, 0], 1 / 8) and np.allclose(block.attention[2, 0, :6], 1 / 6)


def test_empty_grids_are_refused(tmp_path):
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", 2, [2], 8)
    att = np.zeros((2, 1, 8), np.float32)
    with pytest.raises(ValueError, match=r"for samples \['b'\]$"):  # the 1 x 4 grid of 'a' is fine
        w.write(0, ["a", "b"], np.array([[1, 4], [0, 4]]), np.ones(2, np.int32), att, att)


def test_default_provenance_is_an_empty_mapping(tmp_path):
    store = _write(tmp_path / "s.zarr", [(2, 2)])
    assert store.attrs["inputs"] == {}


def test_a_hidden_norm_block_of_the_wrong_shape_is_named(tmp_path):
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", 2, [2, 4], 8)
    att = np.zeros((2, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"hidden_norm block shape \(2, 3, 8\), store wants \(2, 2, <=V\)"):
        w.write(0, ["a", "b"], np.array([[2, 2], [2, 2]]), np.ones(2, np.int32), att, np.zeros((2, 3, 8), np.float32))
