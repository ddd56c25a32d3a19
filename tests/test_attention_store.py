"""Attention store: round trip, validation of corrupt stores, resumption after a partial write, sharding."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zarr

from pipeline.io import attention_store
from pipeline.io.attention_store import (
    SHARD_BYTES,
    AttentionStoreWriter,
    open_attention_store,
    records_dir,
    shard_samples_for,
)
from pipeline.io.contracts import ContractError


def make_rows(n, n_layers=2, v=20, n_heads=None, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"id-{i}" for i in range(n)], dtype=object)
    grid = np.stack([rng.integers(1, 5, n), rng.integers(1, 6, n)], axis=1).astype(np.int32)
    shape = (n, n_layers, n_heads, v) if n_heads else (n, n_layers, v)
    return (
        ids,
        grid,
        rng.integers(1, 9, n),
        rng.random(shape, dtype=np.float32),
        rng.random((n, n_layers, v), dtype=np.float32),
    )


def write_all(writer, rows, start=0, stop=None, step=100):
    ids, grid, n_resp, att, norms = rows
    stop = len(ids) if stop is None else stop
    for s in range(start, stop, step):
        e = min(s + step, stop)
        writer.write(s, ids[s:e], grid[s:e], n_resp[s:e], att[s:e], norms[s:e])


@pytest.mark.parametrize("n_heads", [None, 3])
def test_round_trip(tmp_path, n_heads):
    rows = make_rows(600, n_heads=n_heads)
    heads = None if n_heads is None else [4, 7, 9]
    attrs = {"model_id": "toy", "include_eos": True, "params": {"a": 1}, "inputs": {"m": "x"}}
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", 600, [3, 5], 20, heads=heads, attrs=attrs)
    assert (w.chunk_samples, w.shard_samples) == (256, 768)  # small maps: every chunk in one shard
    assert w.pending_ranges() == [(0, 600)]
    write_all(w, rows, step=70)  # blocks straddle chunk boundaries
    w.finalize()
    st = open_attention_store(tmp_path / "s.zarr")
    assert (st.n_samples, st.layers, st.heads, st.max_visual) == (600, [3, 5], heads, 20)
    assert st.per_head == (n_heads is not None)
    assert st.attrs["model_id"] == "toy" and st.attrs["include_eos"] is True and st.attrs["params"] == {"a": 1}
    blocks = list(st.iter_chunks())
    assert [(b.start, b.stop) for b in blocks] == [(0, 256), (256, 512), (512, 600)]
    for field, k in (("sample_ids", 0), ("grid", 1), ("n_response", 2), ("attention", 3), ("hidden_norm", 4)):
        got = np.concatenate([getattr(b, field) for b in blocks])
        assert got.tolist() == rows[k].tolist(), field
    part = st.read(250, 260)
    assert part.sample_ids.tolist() == rows[0][250:260].tolist()
    np.testing.assert_array_equal(part.attention, rows[3][250:260])


def test_small_store_and_padding(tmp_path):
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", 10, [0], 16, chunk_samples=8)
    assert w.chunk_samples == w.shard_samples == 10  # smaller than one chunk: one chunk, one shard
    att = np.ones((10, 1, 6), np.float32)
    w.write(0, [f"x{i}" for i in range(10)], np.tile([2, 3], (10, 1)), np.ones(10), att, att)
    w.finalize()
    b = open_attention_store(tmp_path / "s.zarr").read(0, 10)
    assert b.attention.shape == (10, 1, 16) and b.attention[:, :, 6:].sum() == 0 and b.attention[:, :, :6].all()
    with pytest.raises(ValueError, match="outside"):
        w.write(5, [f"x{i}" for i in range(10)], np.tile([2, 3], (10, 1)), np.ones(10), att, att)
    with pytest.raises(ValueError, match="max_visual"):
        w.write(0, ["a"], [[5, 5]], [1], att[:1], att[:1])


def test_resume_after_partial_write(tmp_path):
    rows = make_rows(700)
    path = tmp_path / "s.zarr"
    w = AttentionStoreWriter.create(path, 700, [3, 5], 20, shard_samples=256)
    write_all(w, rows, stop=300)  # shard 0 complete; shard 1 only buffered (a crash loses it)
    del w
    with pytest.raises(ContractError, match="incomplete"):
        open_attention_store(path)
    w2 = AttentionStoreWriter.open_existing(path)
    assert w2.pending_ranges() == [(256, 700)]
    write_all(w2, rows, start=512, stop=700)  # last shard done out of order
    assert w2.pending_ranges() == [(256, 512)]
    with pytest.raises(ContractError, match="not written"):
        w2.finalize()
    write_all(w2, rows, start=256, stop=512, step=256)
    assert w2.pending_ranges() == []
    w2.finalize()
    st = open_attention_store(path)
    got = np.concatenate([b.attention for b in st.iter_chunks(prefetch=False)])
    np.testing.assert_array_equal(got, rows[3])


def _finished_store(path):
    rows = make_rows(300)
    w = AttentionStoreWriter.create(path, 300, [3, 5], 20, shard_samples=256)
    write_all(w, rows)
    w.finalize()
    return zarr.open_group(str(path), mode="r+")


def _rerecord(g, shard_file, name, s):
    """Record the checksum of a shard file as it is now (so the test reaches the checks behind the checksums)."""
    data = shard_file.read_bytes()
    sums = dict(g.attrs["shard_checksums"])
    sums[name] = [*sums[name][:s], f"{len(data)}:{hashlib.sha256(data).hexdigest()}", *sums[name][s + 1 :]]
    g.attrs["shard_checksums"] = sums


def test_validation_errors(tmp_path):
    g = _finished_store(tmp_path / "v.zarr")
    g.attrs["version"] = 99
    with pytest.raises(ContractError, match="version 99"):
        open_attention_store(tmp_path / "v.zarr")

    g = _finished_store(tmp_path / "s.zarr")
    g.attrs["schema"] = "labels"
    with pytest.raises(ContractError, match="expected 'attention_store'"):
        open_attention_store(tmp_path / "s.zarr")

    g = _finished_store(tmp_path / "c.zarr")
    g.attrs["complete"] = False
    with pytest.raises(ContractError, match="incomplete"):
        open_attention_store(tmp_path / "c.zarr")
    assert open_attention_store(tmp_path / "c.zarr", require_complete=False).n_samples == 300

    g = _finished_store(tmp_path / "g.zarr")
    g["grid"][7] = [5, 5]  # 25 > max_visual 20, written behind the writer's back: the shard no longer matches
    with pytest.raises(ContractError, match=r"array 'grid' shard 0 \(samples 0\.\.255, ids 'id-0'\.\.'id-255'\) is"):
        open_attention_store(tmp_path / "g.zarr")
    _rerecord(g, tmp_path / "g.zarr" / "grid" / "c" / "0" / "0", "grid", 0)  # as a writer not checking grids would
    with pytest.raises(ContractError, match="id-7"):
        open_attention_store(tmp_path / "g.zarr")

    g = _finished_store(tmp_path / "l.zarr")
    g.attrs["layers"] = [3]
    with pytest.raises(ContractError, match="'attention' has shape"):
        open_attention_store(tmp_path / "l.zarr")

    g = _finished_store(tmp_path / "d.zarr")
    del g["hidden_norm"]
    with pytest.raises(ContractError, match="hidden_norm"):
        open_attention_store(tmp_path / "d.zarr")

    with pytest.raises(ContractError):
        open_attention_store(tmp_path / "missing.zarr")


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sharded_layout_and_records(tmp_path, monkeypatch):
    """Chunks of 256 in shards of 512: one file per shard and array; one record per finished shard until finalize."""
    rows = make_rows(1300)
    path = tmp_path / "s.zarr"
    w = AttentionStoreWriter.create(path, 1300, [3, 5], 20, shard_samples=400)  # rounded up to whole chunks
    assert (w.chunk_samples, w.shard_samples, w.n_shards) == (256, 512, 3)
    write_all(w, rows, stop=1100, step=90)
    assert sorted(p.name for p in records_dir(path).iterdir()) == ["000000.json", "000001.json"]
    assert w.pending_units() == [2] and w.unit_range(2) == (1024, 1300)
    write_all(w, rows, start=1100, step=90)
    w.finalize()
    assert not records_dir(path).exists()
    for name in ("sample_id", "attention", "hidden_norm"):
        assert sorted(p.relative_to(path / name).as_posix() for p in (path / name / "c").rglob("*") if p.is_file()) == [
            f"c/{s}" + "/0" * (zarr.open_array(str(path / name)).ndim - 1) for s in range(3)
        ]
    st = open_attention_store(path)
    assert (st.chunk_samples, st.shard_samples) == (256, 512)
    assert st.attrs["done_shards"] == [0, 1, 2] and len(st.attrs["shard_checksums"]["attention"]) == 3
    for read_bytes in (attention_store.READ_BYTES, 0):  # whole shards cut into chunks, or chunk by chunk
        monkeypatch.setattr(attention_store, "READ_BYTES", read_bytes)
        blocks = list(st.iter_chunks())
        assert [(b.start, b.stop - b.start) for b in blocks] == [(i * 256, 256) for i in range(5)] + [(1280, 20)]
        for field, k in (("sample_ids", 0), ("grid", 1), ("attention", 3), ("hidden_norm", 4)):
            assert np.concatenate([getattr(b, field) for b in blocks]).tolist() == rows[k].tolist(), field


def test_two_writers_on_one_store_give_the_one_writer_bytes(tmp_path):
    """Two processes' writers, each its own shards of one store (as the ranks of a dump), then one finalizes."""
    rows = make_rows(1300, n_heads=2)
    one = AttentionStoreWriter.create(tmp_path / "one.zarr", 1300, [3, 5], 20, heads=[0, 1], shard_samples=256)
    write_all(one, rows, step=128)
    one.finalize()
    path = tmp_path / "two.zarr"
    a = AttentionStoreWriter.create(path, 1300, [3, 5], 20, heads=[0, 1], shard_samples=256)
    b = AttentionStoreWriter.open_existing(path, check=False)
    for s in range(a.n_shards):
        w = a if s % 2 == 0 else b
        lo, hi = w.unit_range(s)
        write_all(w, rows, start=lo, stop=hi, step=128)
    assert a.pending_units() == [1, 3, 5]  # a does not see b's records until it reads them again
    a.finalize()
    assert open_attention_store(path).attrs == open_attention_store(tmp_path / "one.zarr").attrs
    assert _files(path) == _files(tmp_path / "one.zarr")


def test_auto_shard_size():
    """Few shards for small maps; for LLaVA-7B per-head maps at two layers, a shard stays under SHARD_BYTES."""
    assert shard_samples_for(256, 4 * 576, 152_000) == 16 * 256
    per_head = 4 * 2 * 32 * 576
    assert shard_samples_for(256, per_head, 152_000) == 14 * 256
    assert 14 * 256 * per_head <= SHARD_BYTES < 15 * 256 * per_head
    assert shard_samples_for(256, 4 * 576, 600) == 3 * 256  # never more chunks than the store has


@pytest.mark.parametrize("version", [1, 2])
def test_older_layouts_are_refused_naming_the_store(tmp_path, version):
    g = _finished_store(tmp_path / "old.zarr")
    g.attrs["version"] = version
    with pytest.raises(ContractError, match=rf"^{tmp_path / 'old.zarr'}: written with one file per chunk .*rerun dump"):
        open_attention_store(tmp_path / "old.zarr")
    assert not AttentionStoreWriter.resumable(tmp_path / "old.zarr")
