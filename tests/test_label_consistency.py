"""One label code path: label_report's figures are those of the labels the label stage writes.

A store with several layers and per-head maps is labelled by ``label_store`` into a Parquet; the test
recomputes the report's figures from that Parquet (labels, kept, n_sink) and from the raw store arrays
with plain numpy, and compares them with ``label_quality``. Also: the evaluate raw-attention ablation's
map is the label stage's aggregation and equals the former ``capture.attention.mean(1)`` map.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.inference import evaluate as evaluate_mod
from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.io.contracts import read_parquet
from pipeline.teacher.label_presets import PRESETS
from pipeline.teacher.label_report import label_quality
from pipeline.teacher.labels import LabelParams, attention_map, fg_mask, label_plan, label_store

N = 300  # two store chunks (256 + 44)


def _store(path, seed, layers, heads, side, ragged, quantise):
    """Random store (padding 0), GT token masks and has_gt; sinks are planted at different tokens per layer."""
    rng = np.random.default_rng(seed)
    v = side * side
    grid = rng.integers(2, side + 1, (N, 2)) if ragged else np.full((N, 2), side)
    nv = grid[:, 0] * grid[:, 1]
    shape = (N, len(layers), len(heads), v) if heads is not None else (N, len(layers), v)
    # A low background plus one bright patch per sample (so some fg boxes are small enough to keep).
    if quantise:
        # Integer maps: tau * a_max lands on stored values (0.2 * 10 == 2), so strict and loose differ.
        att = rng.integers(0, 3, shape).astype(np.float32)
        bright = rng.integers(5, 11, shape).astype(np.float32)
    else:
        att = (rng.random(shape, dtype=np.float32) * 0.3) ** 2
        bright = rng.random(shape, dtype=np.float32)
    for i, (h, wd) in enumerate(grid):
        y, x = rng.integers(0, h), rng.integers(0, wd)
        patch = np.zeros((side, side), bool)
        patch[y : y + 2, x : x + 2] = True
        idx = np.flatnonzero(patch[:h, :wd].ravel())
        att[i, ..., idx] = bright[i, ..., idx]
    norms = rng.normal(30, 3, (N, len(layers), v)).astype(np.float32)
    norms[rng.random(norms.shape) < 0.04] *= 20
    pad = np.arange(v) >= nv[:, None]
    att[np.broadcast_to(pad[:, None, None] if heads is not None else pad[:, None], att.shape)] = 0
    norms[np.broadcast_to(pad[:, None], norms.shape)] = 0
    n_response = np.where(rng.random(N) < 0.03, 0, 2).astype(np.int32)
    w = AttentionStoreWriter.create(path, N, layers, v, heads=heads)
    w.write(0, [f"s{i}" for i in range(N)], grid.astype(np.int32), n_response, att, norms)
    w.finalize()
    gt = np.zeros((N, v), bool)
    for i, (h, wd) in enumerate(grid):
        y0, x0 = rng.integers(0, h), rng.integers(0, wd)
        y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, wd) + 1
        box = np.zeros((h, wd), bool)
        box[y0:y1, x0:x1] = True
        gt[i, : h * wd] = box.ravel()
    has_gt = rng.random(N) < 0.85
    return open_attention_store(path), att, norms, grid, gt, has_gt


def _independent_map(att, layers, heads, p: LabelParams, store_layers, store_heads):
    """Per sample: one flat mean over every chosen (layer, head) map (plain numpy, float64); on a head-mean
    store each chosen layer's map counts once."""
    if isinstance(p.heads, dict):
        chosen = [(lay, p.heads[lay]) for lay in (p.layers or list(p.heads))]
    else:
        chosen = [(lay, p.heads) for lay in (p.layers or store_layers)]
    maps = []
    for lay, hs in chosen:
        x = att[:, store_layers.index(lay)].astype(np.float64)
        if store_heads is not None:
            hs = store_heads if hs is None else hs
            maps += [x[:, store_heads.index(h)] for h in hs]
        else:
            maps.append(x)
    return np.mean(maps, axis=0)


def _metrics(maps, fg, gt, real):
    """The report's precision / recall / argmax-in-box means over samples (NaN entries skipped)."""
    prec, rec, arg = [], [], []
    for a, f, g, r in zip(maps, fg, gt, real, strict=True):
        a, f, g = a[r], f[r], g[r]
        inter = int((f & g).sum())
        if f.sum():
            prec.append(inter / f.sum())
        if g.sum():
            rec.append(inter / g.sum())
        if a.max() > 0:
            arg.append(float(g[int(np.argmax(a))]))
    return {"fg_precision": np.mean(prec), "fg_recall": np.mean(rec), "argmax_in_box": np.mean(arg)}


STORE_LAYERS = [2, 5, 7]
STORE_HEADS = [0, 1, 2, 3]
_ATT = {"sink_method": "attention", "strict": True}
CASES = {  # name: (params, quantised maps, ragged grids)
    "strict-all": (LabelParams(strict=True), True, False),
    "strict-subset": (LabelParams(strict=True, layers=[5, 7], heads=[0, 2], max_box_frac=0.5), True, True),
    "per-layer-heads": (LabelParams(heads={7: [0, 1, 3], 5: [2]}, strict=True), True, False),
    "per-layer-heads-loose": (LabelParams(heads={7: [0, 1, 3], 5: [2]}), False, True),
    "attention-sinks": (
        LabelParams(**_ATT, sink_attn_layer=5, sink_attn_heads=[1, 2], sink_attn_threshold=8.5, max_box_frac=0.5),
        True,
        False,
    ),
    "attention-sinks-float": (
        LabelParams(**_ATT, sink_attn_layer=2, sink_attn_threshold=0.5, layers=[5, 7]),
        False,
        True,
    ),
    "norm-layer-7": (LabelParams(layers=[2, 5], sink_norm_layer=7), False, False),
    "norm-layer-5-strict": (LabelParams(layers=[2], heads=[3], sink_norm_layer=5, strict=True), True, True),
}


def _norm_layer(p: LabelParams, store_layers: list[int]) -> int:
    """SPEC: sink_norm_layer, else the first label layer (written out here, not taken from labels.py)."""
    if p.sink_norm_layer is not None:
        return p.sink_norm_layer
    return (p.layers or (list(p.heads) if isinstance(p.heads, dict) else None) or store_layers)[0]


def _check(tmp_path, seed, p: LabelParams, store_layers, store_heads, side=6, ragged=False, quantise=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    store, att, norms, grid, gt, has_gt = _store(
        tmp_path / "a.zarr", seed, store_layers, store_heads, side, ragged, quantise
    )
    metrics, _ = label_quality(store, p, gt, has_gt)

    # What the label stage writes (and the same run with soft targets, for the denoised map's argmax).
    label_store(store, p, tmp_path / "labels.parquet", progress=False)
    label_store(store, dataclasses.replace(p, soft_targets=True), tmp_path / "soft.parquet", progress=False)
    table = read_parquet(tmp_path / "labels.parquet", "labels")
    soft_table = read_parquet(tmp_path / "soft.parquet", "labels")
    labels = table.column("labels").to_pylist()
    assert soft_table.column("labels").to_pylist() == labels
    kept = np.array(table.column("kept").to_pylist())
    n_sink = np.array(table.column("n_sink").to_pylist())
    soft = soft_table.column("soft_target").to_pylist()

    v = att.shape[-1]
    nv = grid[:, 0] * grid[:, 1]
    real = np.arange(v) < nv[:, None]
    gt = gt & real
    lab = np.full((N, v), -1, np.int8)
    soft_map = np.zeros((N, v))
    for i in range(N):
        lab[i, : nv[i]] = labels[i]
        soft_map[i, : nv[i]] = soft[i]
    sel = has_gt
    k = sel & kept
    assert metrics["n_samples_with_gt"] == int(sel.sum())
    assert metrics["n_kept"] == int(k.sum()) and 0 < k.sum() < sel.sum()
    expected = _metrics(soft_map[k], (lab == 1)[k], gt[k], real[k])
    assert metrics["labels"] == pytest.approx(expected, rel=1e-12)

    # Raw attention: the labels' fg rule (strict included) on the independently averaged map.
    raw = _independent_map(att, store_layers, store_heads, p, store_layers, store_heads)
    raw_max = np.where(real, raw, -np.inf).max(axis=1, keepdims=True)
    raw_fg = (raw > p.tau_fg * raw_max if p.strict else raw >= p.tau_fg * raw_max) & (raw_max > 0) & real
    assert metrics["raw_attention"] == pytest.approx(_metrics(raw[sel], raw_fg[sel], gt[sel], real[sel]), rel=1e-12)

    # Sinks: the Parquet's counts, and their positions/norms recomputed on the detector's own layer.
    nr = norms[:, store_layers.index(_norm_layer(p, store_layers))].astype(np.float64)
    med = np.array([np.median(nr[i, : nv[i]]) for i in range(N)])
    if p.sink_method == "norm":
        sink = (nr > p.sink_norm_factor * med[:, None]) & real
    else:
        x = att[:, store_layers.index(p.sink_attn_layer)].astype(np.float64)
        if store_heads is not None:
            hs = store_heads if p.sink_attn_heads is None else p.sink_attn_heads
            x = x[:, [store_heads.index(h) for h in hs]].mean(axis=1)
        sink = (x >= p.sink_attn_threshold) & real
    np.testing.assert_array_equal(sink.sum(axis=1), n_sink)
    assert sink[sel].any()
    assert metrics["sinks"]["per_sample"] == pytest.approx(n_sink[sel].sum() / sel.sum(), rel=1e-12)
    assert metrics["sinks"]["share_inside_gt_box"] == pytest.approx((sink & gt)[sel].sum() / sink[sel].sum())
    ratio = np.where(real, nr, 0).max(axis=1)[sel] / med[sel]
    assert metrics["sinks"]["max_over_median_norm_mean"] == pytest.approx(ratio.mean(), rel=1e-6)
    assert metrics["sinks"]["max_over_median_norm_max"] == pytest.approx(ratio.max(), rel=1e-6)
    return metrics


@pytest.mark.parametrize("name", list(CASES))
def test_report_is_computed_from_the_written_labels(tmp_path, name):
    params, quantise, ragged = CASES[name]
    _check(tmp_path, 11, params, STORE_LAYERS, STORE_HEADS, ragged=ragged, quantise=quantise)


@pytest.mark.parametrize("ragged", [False, True])
def test_report_head_mean_store(tmp_path, ragged):
    p = LabelParams(strict=True, layers=[7, 2], sink_norm_layer=5)
    _check(tmp_path, 12, p, STORE_LAYERS, None, ragged=ragged)


@pytest.mark.parametrize(
    ("preset", "store_layers", "n_heads", "overrides"),
    [
        ("llava_1_5_13b", [13, 15, 16], 32, {"sink_attn_threshold": 9.5}),  # per-layer heads 3/1/3, unsorted layers
        ("qwen2_5_vl_7b", [9, 16, 19], 24, {"sink_attn_threshold": 9.5, "min_a_max": 8.0}),
        ("qwen2_5_vl_3b_text", [20, 22], 16, {}),
    ],
)
def test_report_presets(tmp_path, preset, store_layers, n_heads, overrides):
    p = LabelParams(**{**PRESETS[preset], **overrides})
    assert p.strict
    if p.sink_method == "none":
        p = dataclasses.replace(p, sink_method="norm")  # a sink detector to check the sink figures against
    _check(tmp_path, 13, p, store_layers, list(range(n_heads)), side=5)


def test_strict_changes_the_raw_figures(tmp_path):
    """On integer maps strict and loose fg differ; the report's raw metrics follow ``strict`` (they used >= always)."""
    loose = _check(tmp_path / "l", 14, LabelParams(), STORE_LAYERS, STORE_HEADS)
    strict = _check(tmp_path / "s", 14, LabelParams(strict=True), STORE_LAYERS, STORE_HEADS)
    assert strict["raw_attention"]["fg_precision"] != loose["raw_attention"]["fg_precision"]
    assert strict["raw_attention"]["fg_recall"] < loose["raw_attention"]["fg_recall"]


def test_fg_mask_rule():
    a = np.array([[10, 2.5, 1, 0], [0, 0, 0, 0], [4, 1, 0.5, 5]], np.float32)  # row 2: token 3 is padding
    real = np.array([[True] * 4, [True] * 4, [True, True, True, False]])
    a_max = np.array([10, 0, 4], np.float32)
    loose = fg_mask(a, a_max, LabelParams(tau_fg=0.25), real)
    strict = fg_mask(a, a_max, LabelParams(tau_fg=0.25, strict=True), real)
    assert loose.tolist() == [[True, True, False, False], [False] * 4, [True, True, False, False]]
    assert strict.tolist() == [[True, False, False, False], [False] * 4, [True, False, False, False]]
    # The threshold is float64, as the labels take it: float32(0.6) > 0.2 * 3 in float64, not in float32.
    b = np.array([[3, 0.6]], np.float32)
    assert fg_mask(b, b.max(axis=1), LabelParams(strict=True)).tolist() == [[True, True]]


def test_plan_norm_layer():
    assert label_plan(LabelParams(), [2, 5, 7], None).sink_norm_pos == 0
    assert label_plan(LabelParams(layers=[7, 5]), [2, 5, 7], None).sink_norm_pos == 2
    assert label_plan(LabelParams(heads={5: [1]}), [2, 5, 7], [0, 1]).sink_norm_pos == 1
    assert label_plan(LabelParams(layers=[2], sink_norm_layer=7), [2, 5, 7], None).sink_norm_pos == 2


class _FakeAdapter:
    """Just what raw_attention_maps asks of an adapter besides the capture."""

    def __init__(self, grids):
        self.grids = grids

    def render_prompt(self, q):
        return q

    def build_batch(self, images, prompts, responses):
        return SimpleNamespace(grids=self.grids)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_raw_attention_maps_use_the_label_aggregation(monkeypatch, n_layers):
    """Same maps as the former ``capture.attention.mean(1)`` / max: bit for bit for one layer (the embedded
    default), to float32 rounding for several (the label stage's float64 layer mean instead of torch's float32)."""
    grids = [(4, 5), (3, 3), (5, 5)]
    gen = torch.Generator().manual_seed(0)
    captured = torch.rand(3, n_layers, 25, generator=gen) ** 4
    captured[1, :, 9:] = 0  # padding
    monkeypatch.setattr(evaluate_mod, "capture_attention", lambda *a, **k: SimpleNamespace(attention=captured))
    layers = [3, 5, 8][:n_layers]
    got = evaluate_mod.raw_attention_maps(_FakeAdapter(grids), [None] * 3, ["q"] * 3, [[1]] * 3, layers)
    old = captured.mean(1).numpy()
    for g, o, (h, w) in zip(got, old, grids, strict=True):
        o = o[: h * w]
        o = (o / o.max()).reshape(h, w)
        assert g.shape == (h, w)
        if n_layers == 1:
            assert g.dtype == np.float32
            np.testing.assert_array_equal(g, o)
        else:
            np.testing.assert_allclose(g, o, rtol=1e-6, atol=0)
            mean = attention_map(captured.numpy(), [(i, None) for i in range(n_layers)])
            assert g.dtype == mean.dtype == np.float64 and g.max() == 1.0
