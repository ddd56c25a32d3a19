"""Vectorised label assignment vs a slow per-token reference, plus the labels.parquet contract."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.io.contracts import read_metadata, read_parquet
from pipeline.teacher.labels import SKIP_REASONS, LabelParams, assign_labels, label_store

# ---------------------------------------------------------------------------------------------------------------
# Slow reference: one sample and one token at a time, plain Python floats (float64), written from SPEC 1.3-1.4.
# ---------------------------------------------------------------------------------------------------------------


def _token_map(att_i, layer_ids, heads_for, per_head, store_layers, store_heads, j):
    """One flat mean over every selected (layer, head) value (a head-mean store: one value per layer), summed
    left to right in the order given (layers, then each layer's heads) and divided by how many there are."""
    values = []
    for lay in layer_ids:
        li = list(store_layers).index(lay)
        if per_head:
            hs = heads_for(lay)
            hs = list(store_heads) if hs is None else hs
            values += [float(att_i[li][list(store_heads).index(h)][j]) for h in hs]
        else:
            values.append(float(att_i[li][j]))
    total = values[0]
    for x in values[1:]:
        total += x
    return total / len(values)


def reference_labels(att, norms, grid, ids, p: LabelParams, store_layers=None, store_heads=None):
    n, n_layers = att.shape[0], att.shape[1]
    per_head = att.ndim == 4
    store_layers = list(range(n_layers)) if store_layers is None else list(store_layers)
    if per_head and store_heads is None:
        store_heads = list(range(att.shape[2]))
    if isinstance(p.heads, dict):
        layer_ids = list(p.layers) if p.layers is not None else list(p.heads)

        def heads_for(lay):
            return p.heads[lay]
    else:
        layer_ids = list(p.layers) if p.layers is not None else store_layers

        def heads_for(lay):
            return p.heads

    out = []
    for i in range(n):
        h, w = int(grid[i][0]), int(grid[i][1])
        nv = h * w
        for j in range(nv):
            for x in att[i].reshape(-1, att.shape[-1])[:, j].tolist():
                if not math.isfinite(x):
                    raise ValueError(f"sample {ids[i]!r}: attention")
            for x in norms[i][:, j].tolist():
                if not math.isfinite(x):
                    raise ValueError(f"sample {ids[i]!r}: hidden_norm")
        a = [_token_map(att[i], layer_ids, heads_for, per_head, store_layers, store_heads, j) for j in range(nv)]
        sink = [False] * nv
        tau = float("nan")
        if p.sink_method == "norm":
            lay = layer_ids[0] if p.sink_norm_layer is None else p.sink_norm_layer
            nr = [float(norms[i][store_layers.index(lay)][j]) for j in range(nv)]
            if p.sink_norm_abs is not None:
                tau = float(p.sink_norm_abs)
            else:
                srt = sorted(nr)
                med = srt[nv // 2] if nv % 2 else (srt[nv // 2 - 1] + srt[nv // 2]) / 2
                tau = p.sink_norm_factor * med
            sink = [x > tau for x in nr]
        elif p.sink_method == "attention":
            for j in range(nv):
                s = _token_map(
                    att[i], [p.sink_attn_layer], lambda _: p.sink_attn_heads, per_head, store_layers, store_heads, j
                )
                sink[j] = s >= p.sink_attn_threshold
        a = [0.0 if sink[j] else a[j] for j in range(nv)]
        a_max = max(a)
        rec = {
            "sample_id": ids[i],
            "grid_h": h,
            "grid_w": w,
            "n_sink": sum(sink),
            "a_max": np.float32(a_max),
            "sink_tau": tau,
        }
        lab = [-1] * att.shape[-1]
        box = (-1, -1, -1, -1)
        reason = None
        if a_max <= 0:
            reason = SKIP_REASONS[2] if all(sink) else SKIP_REASONS[1]
        else:
            t_fg, t_bg = p.tau_fg * a_max, p.tau_bg * a_max
            fg = [(x > t_fg) if p.strict else (x >= t_fg) for x in a]
            rows = [j // w for j in range(nv) if fg[j]]
            cols = [j % w for j in range(nv) if fg[j]]
            if rows:
                box = (min(rows), min(cols), max(rows), max(cols))
            for j in range(nv):
                r, c = divmod(j, w)
                inside = rows and box[0] <= r <= box[2] and box[1] <= c <= box[3]
                if fg[j]:
                    lab[j] = 1
                elif not inside and ((a[j] < t_bg) if p.strict else (a[j] <= t_bg)):
                    lab[j] = 0
            if p.min_a_max is not None and a_max < p.min_a_max:
                reason = SKIP_REASONS[3]
            elif p.max_box_frac is not None and (box[2] - box[0] + 1) * (box[3] - box[1] + 1) >= p.max_box_frac * nv:
                reason = SKIP_REASONS[4]
        rec.update(
            labels=lab,
            n_fg=lab[:nv].count(1),
            n_bg=lab[:nv].count(0),
            n_ignore=lab[:nv].count(-1),
            fg_y0=box[0],
            fg_x0=box[1],
            fg_y1=box[2],
            fg_x1=box[3],
            kept=reason is None,
            skip_reason=reason,
        )
        out.append(rec)
    return out


def assert_same(vec: dict, ref: list[dict]) -> None:
    assert len(vec["labels"]) == len(ref)
    for i, r in enumerate(ref):
        for k, v in r.items():
            if k == "sample_id":
                continue
            got = vec[k][i]
            if k == "labels":
                assert got.tolist() == v, f"sample {i}: labels differ"
            elif k == "sink_tau":
                assert (math.isnan(v) and math.isnan(got)) or got == v, f"sample {i}: {k} {got} != {v}"
            else:
                assert got == v, f"sample {i}: {k} {got!r} != {v!r}"


# ---------------------------------------------------------------------------------------------------------------
# Random data
# ---------------------------------------------------------------------------------------------------------------


def random_block(seed, n, max_visual, n_layers=1, n_heads=None, ragged=False, quantise=False):
    rng = np.random.default_rng(seed)
    if ragged:
        hw = rng.integers(1, int(math.isqrt(max_visual)) + 1, (n, 2))
        hw[0] = (1, 1)
    else:
        side = int(math.isqrt(max_visual))
        hw = np.tile([side, max(1, max_visual // side - 1)], (n, 1))
    shape = (n, n_layers, n_heads, max_visual) if n_heads else (n, n_layers, max_visual)
    if quantise:
        # Integer maps: tau * a_max hits stored values exactly (0.2 * 10 == 2.0), so ties are everywhere.
        att = rng.integers(0, 11, shape).astype(np.float32)
    else:
        blob = rng.random(shape, dtype=np.float32) ** 4
        att = (blob * (rng.random((n, 1) + (1,) * (len(shape) - 2)) < 0.9)).astype(np.float32)
    norms = rng.normal(30, 3, (n, n_layers, max_visual)).astype(np.float32)
    sinks = rng.random((n, n_layers, max_visual)) < 0.03
    norms[sinks] *= 20
    # Garbage in the padding must be ignored.
    pos = np.arange(max_visual)
    pad = pos >= (hw[:, 0] * hw[:, 1])[:, None]
    norms[np.broadcast_to(pad[:, None], norms.shape)] = 1e6
    att_pad = pad[:, None, None] if n_heads else pad[:, None]
    att[np.broadcast_to(att_pad, att.shape)] = 7.0
    ids = [f"s{seed}_{i}" for i in range(n)]
    return att, norms, hw.astype(np.int32), ids


PARAMS = [
    LabelParams(),
    LabelParams(strict=True),
    LabelParams(sink_method="none", tau_fg=0.3, tau_bg=0.3),
    LabelParams(sink_norm_abs=300.0, max_box_frac=0.5, min_a_max=0.05),
    LabelParams(sink_method="attention", sink_attn_layer=0, sink_attn_threshold=0.4),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"{p.sink_method}-strict{p.strict}-box{p.max_box_frac}")
def test_matches_reference_head_mean(seed, ragged, quantise, params):
    att, norms, grid, ids = random_block(seed, 24, 49, n_layers=2, ragged=ragged, quantise=quantise)
    vec = assign_labels(att, norms, grid, ids, params)
    assert_same(vec, reference_labels(att, norms, grid, ids, params))


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize(
    "params",
    [
        LabelParams(layers=[14]),
        LabelParams(layers=[14, 16], heads=[1, 3]),
        LabelParams(heads=[2]),
        LabelParams(heads={16: [0, 2, 3], 14: [1]}, strict=True),
        LabelParams(layers=[16], heads=[0, 1], sink_norm_layer=14),
        LabelParams(
            layers=[14, 16],
            sink_method="attention",
            sink_attn_layer=16,
            sink_attn_heads=[1, 2],
            sink_attn_threshold=0.3,
        ),
    ],
)
def test_matches_reference_per_head(seed, ragged, params):
    att, norms, grid, ids = random_block(seed, 16, 36, n_layers=2, n_heads=4, ragged=ragged, quantise=seed == 4)
    kw = {"store_layers": [14, 16], "store_heads": [0, 1, 2, 3]}
    vec = assign_labels(att, norms, grid, ids, params, **kw)
    assert_same(vec, reference_labels(att, norms, grid, ids, params, **kw))


def test_ties_strict_vs_non_strict():
    att = np.array([[[10, 2, 1, 0, 2, 1, 0, 0, 0]]], np.float32)  # a_max 10: fg thr 2.0, bg thr 1.0
    norms = np.ones((1, 1, 9), np.float32)
    grid = np.array([[3, 3]])
    loose = assign_labels(att, norms, grid, ["t"], LabelParams())
    strict = assign_labels(att, norms, grid, ["t"], LabelParams(strict=True))
    # loose: fg = {0, 1, 4} -> box rows 0-1, cols 0-1 (token 3 inside: ignore); bg outside where a <= 1
    assert loose["labels"][0].tolist() == [1, 1, 0, -1, 1, 0, 0, 0, 0]
    # strict: fg = {0}, box is token 0; bg where a < 1
    assert strict["labels"][0].tolist() == [1, -1, -1, 0, -1, -1, 0, 0, 0]
    assert (loose["fg_y1"][0], loose["fg_x1"][0]) == (1, 1) and (strict["fg_y1"][0], strict["fg_x1"][0]) == (0, 0)


def test_all_zero_map_and_single_fg_token():
    att = np.zeros((2, 1, 16), np.float32)
    att[1, 0, 5] = 0.25
    norms = np.ones((2, 1, 16), np.float32)
    out = assign_labels(att, norms, np.array([[4, 4], [4, 4]]), ["zero", "one"], LabelParams())
    assert out["labels"][0].tolist() == [-1] * 16 and not out["kept"][0]
    assert out["skip_reason"][0] == SKIP_REASONS[1] and out["a_max"][0] == 0 and out["fg_y0"][0] == -1
    assert out["n_ignore"][0] == 16 and out["n_fg"][0] == 0
    assert out["labels"][1].tolist() == [0] * 5 + [1] + [0] * 10
    assert (out["fg_y0"][1], out["fg_x0"][1], out["fg_y1"][1], out["fg_x1"][1]) == (1, 1, 1, 1)
    assert out["kept"][1] and out["skip_reason"][1] is None and out["n_bg"][1] == 15


def test_every_token_a_sink():
    att, norms, grid, ids = random_block(0, 4, 16)
    for p in (
        LabelParams(sink_norm_abs=0.0),
        LabelParams(sink_method="attention", sink_attn_layer=0, sink_attn_threshold=0.0),
    ):
        out = assign_labels(att, norms, grid, ids, p)
        assert not out["kept"].any() and set(out["skip_reason"]) == {SKIP_REASONS[2]}
        assert (out["labels"] == -1).all() and (out["n_sink"] == grid[:, 0] * grid[:, 1]).all()
        assert_same(out, reference_labels(att, norms, grid, ids, p))


def test_dropped_samples_keep_labels():
    att = np.zeros((2, 1, 16), np.float32)
    att[0, 0, [0, 15]] = 0.004  # fg box is the whole grid, a_max below 5e-3
    att[1, 0, [0, 15]] = 0.5
    norms = np.ones((2, 1, 16), np.float32)
    out = assign_labels(att, norms, np.array([[4, 4]] * 2), ["a", "b"], LabelParams(max_box_frac=0.5, min_a_max=5e-3))
    assert out["skip_reason"].tolist() == [SKIP_REASONS[3], SKIP_REASONS[4]]
    assert not out["kept"].any()
    assert (out["n_fg"] == 2).all() and (out["labels"][:, [0, 15]] == 1).all()


def test_nan_and_inf_name_the_sample_and_field():
    att, norms, grid, ids = random_block(0, 5, 16, ragged=True)
    grid[3] = (2, 2)
    bad = att.copy()
    bad[3, 0, 1] = np.nan
    with pytest.raises(ValueError, match=r"s0_3.*attention"):
        assign_labels(bad, norms, grid, ids, LabelParams())
    bad_n = norms.copy()
    bad_n[3, 0, 2] = np.inf
    with pytest.raises(ValueError, match=r"s0_3.*hidden_norm"):
        assign_labels(att, bad_n, grid, ids, LabelParams(sink_method="none"))
    pad_nan = att.copy()
    pad_nan[3, 0, 10] = np.nan  # past the 2x2 grid: padding, ignored
    assign_labels(pad_nan, norms, grid, ids, LabelParams())


def test_param_errors():
    att, norms, grid, ids = random_block(0, 2, 16)
    with pytest.raises(ValueError, match="per-head store"):
        assign_labels(att, norms, grid, ids, LabelParams(heads=[0]))
    with pytest.raises(ValueError, match="layer 9"):
        assign_labels(att, norms, grid, ids, LabelParams(layers=[9]))
    with pytest.raises(ValueError, match="sink_attn_layer"):
        LabelParams(sink_method="attention")
    with pytest.raises(ValueError, match="unknown"):
        LabelParams.from_dict({"tau_fgg": 0.2})
    p = LabelParams.from_dict({"heads": {"14": [1, 2]}, "strict": True})
    assert p.heads == {14: [1, 2]} and p.strict


def _write_store(path, att, norms, grid, ids, layers=(14,)):
    w = AttentionStoreWriter.create(path, len(ids), list(layers), att.shape[-1], attrs={"model_id": "t"})
    w.write(0, ids, grid, np.ones(len(ids)), att, norms)
    w.finalize()
    return open_attention_store(path)


def test_parquet_fixed_grid_roundtrip(tmp_path):
    att, norms, grid, ids = random_block(5, 300, 36)
    att[:, :, 30:] = 0  # contract: padding is 0 in the store
    store = _write_store(tmp_path / "a.zarr", att, norms, grid, ids)
    p = LabelParams(max_box_frac=0.5)
    counts = label_store(store, p, tmp_path / "labels.parquet", inputs={"attention": "abc"}, progress=False)
    assert counts["n_samples"] == 300
    table = read_parquet(tmp_path / "labels.parquet", "labels")
    meta = read_metadata(tmp_path / "labels.parquet")
    assert meta["params"]["max_box_frac"] == 0.5 and meta["inputs"] == {"attention": "abc"}
    df = pl.read_parquet(tmp_path / "labels.parquet")
    assert df.schema["labels"] == pl.Array(pl.Int8, 30)
    ref = reference_labels(att, norms, grid, ids, p, store_layers=[14])
    assert df["labels"].to_list() == [r["labels"][:30] for r in ref]
    assert table.column("sample_id").to_pylist() == ids
    assert df["kept"].to_list() == [r["kept"] for r in ref]
    assert df["skip_reason"].to_list() == [r["skip_reason"] for r in ref]
    assert df["fg_y0"].to_list() == [None if r["fg_y0"] < 0 else r["fg_y0"] for r in ref]


def test_parquet_varying_grid_roundtrip(tmp_path):
    att, norms, grid, ids = random_block(6, 270, 49, ragged=True)
    att[0] = 0  # an all-zero sample gets null box and a reason
    pos = np.arange(49)
    pad = pos >= (grid[:, 0] * grid[:, 1])[:, None]
    att[np.broadcast_to(pad[:, None], att.shape)] = 0
    norms[np.broadcast_to(pad[:, None], norms.shape)] = 0
    store = _write_store(tmp_path / "a.zarr", att, norms, grid, ids)
    label_store(store, LabelParams(), tmp_path / "labels.parquet", progress=False)
    read_parquet(tmp_path / "labels.parquet", "labels")
    df = pl.read_parquet(tmp_path / "labels.parquet")
    assert df.schema["labels"] == pl.List(pl.Int8)
    ref = reference_labels(att, norms, grid, ids, LabelParams(), store_layers=[14])
    assert df["labels"].to_list() == [r["labels"][: r["grid_h"] * r["grid_w"]] for r in ref]
    assert (df["labels"].list.len() == df["grid_h"] * df["grid_w"]).all()
    assert df["fg_x1"][0] is None and df["skip_reason"][0] == SKIP_REASONS[1]
    assert df["n_fg"].to_list() == [r["n_fg"] for r in ref]


def test_empty_response_is_reported_as_such():
    """A sample whose answer contributed no attention rows is skipped with its own reason."""
    att = np.zeros((2, 1, 4), dtype=np.float32)
    att[1, 0, 2] = 1.0
    out = assign_labels(
        att,
        np.ones((2, 1, 4), dtype=np.float32),
        np.full((2, 2), 2),
        ["empty", "ok"],
        LabelParams(),
        n_response=np.array([0, 3]),
    )
    assert out["skip_reason"].tolist() == ["empty response: no answer tokens to attend from", None]
    assert out["kept"].tolist() == [False, True]


def test_soft_targets_are_the_denoised_map_over_its_max():
    rng = np.random.default_rng(3)
    att = rng.random((3, 1, 9)).astype(np.float32)
    att[2] = 0.0
    norms = np.ones((3, 1, 9), dtype=np.float32)
    norms[0, 0, 4] = 50.0  # a sink: zeroed before normalising
    out = assign_labels(att, norms, np.full((3, 2), 3), ["a", "b", "c"], LabelParams(soft_targets=True))
    a = att[:, 0].astype(np.float64).copy()
    a[0, 4] = 0.0
    expected = np.zeros_like(a)
    expected[:2] = a[:2] / a[:2].max(axis=1, keepdims=True)
    np.testing.assert_allclose(out["soft_target"], expected, rtol=1e-6)
    assert "soft_target" not in assign_labels(att, norms, np.full((3, 2), 3), ["a", "b", "c"], LabelParams())
