"""Head selection on a synthetic store with planted heads and sinks: the tool must find exactly what was planted."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.teacher.head_selection import (
    bootstrap_ci,
    choose_sink_rule,
    greedy_heads,
    head_scores,
    ranked_heads,
    sink_heads,
    sink_layers,
)
from pipeline.teacher.labels import LabelParams, label_block

SIDE, N, LAYERS, HEADS = 6, 60, [0, 1, 2, 3, 4, 5], 4
LABEL_HEADS = [(3, 1), (4, 2)]  # point at the GT box, each with a distractor blob of its own
SINK_HEAD = (1, 0)  # attends to the sink tokens only
SINK_FROM = 2  # layers from here on carry two massive-norm tokens per sample


def _planted(tmp_path):
    rng = np.random.default_rng(0)
    v = SIDE * SIDE
    att = rng.uniform(0, 1, (N, len(LAYERS), HEADS, v)).astype(np.float32) / v  # noise heads
    norms = rng.normal(10, 0.5, (N, len(LAYERS), v)).astype(np.float32)
    gt = np.zeros((N, v), bool)
    sinks = np.zeros((N, v), bool)
    for i in range(N):
        y, x = rng.integers(0, SIDE - 2, 2)
        box = np.zeros((SIDE, SIDE), bool)
        box[y : y + 2, x : x + 2] = True
        gt[i] = box.ravel()
        free = np.flatnonzero(~gt[i])
        picks = rng.choice(free, 6, replace=False)
        sinks[i, picks[:2]] = True
        for (layer, head), blob in zip(LABEL_HEADS, (picks[2:4], picks[4:6]), strict=True):
            m = np.full(v, 1e-4)
            m[gt[i]] = 0.2
            m[blob] = 0.06  # 0.3 of the box: fg alone, below tau_fg once two heads are averaged
            att[i, layer, head] = m
        m = np.full(v, 1e-3)
        m[sinks[i]] = 0.4
        att[i, SINK_HEAD[0], SINK_HEAD[1]] = m
        norms[i, SINK_FROM:, sinks[i]] = 600.0
    w = AttentionStoreWriter.create(tmp_path / "sel.zarr", N, LAYERS, v, heads=list(range(HEADS)))
    ids = [f"s{i}" for i in range(N)]
    w.write(0, ids, np.full((N, 2), SIDE, np.int32), np.full(N, 3, np.int32), att, norms)
    w.finalize()
    return open_attention_store(tmp_path / "sel.zarr"), gt, sinks


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted(tmp_path_factory.mktemp("planted"))


def test_sink_layers_and_rule_find_the_planted_massive_norms(planted):
    store, _, sinks = planted
    found = sink_layers(store, min_ratio=5.0)
    assert [s.threshold is not None for s in found] == [layer >= SINK_FROM for layer in LAYERS]
    rule = choose_sink_rule(found)
    assert rule["sink_method"] == "norm" and rule["sink_norm_layer"] == SINK_FROM  # the earliest clear gap
    assert 2 < rule["sink_norm_factor"] < 50  # inside the gap between ~1.2x and 60x the median
    for s in found[SINK_FROM:]:
        assert s.per_sample == pytest.approx(2.0)
    got = label_block(store, store.read(0, N), LabelParams(layers=[SINK_FROM], **rule), return_maps=True)["sink"]
    assert np.array_equal(got, sinks)  # exactly the planted tokens


def test_sink_heads_single_out_the_planted_sink_head(planted):
    store, _, _ = planted
    heads = sink_heads(store, choose_sink_rule(sink_layers(store)))
    best = np.unravel_index(np.argmax(heads.auroc), heads.auroc.shape)
    assert tuple(int(x) for x in best) == SINK_HEAD and heads.auroc[best] > 0.99
    others = np.delete(heads.auroc.ravel(), np.ravel_multi_index(SINK_HEAD, heads.auroc.shape))
    assert others.max() < 0.9
    assert 1e-3 < heads.threshold[best] <= 0.4  # separates the head's 1e-3 background from its 0.4 sinks
    assert heads.n_sinks == 2 * N


def test_ranking_and_greedy_combination_recover_exactly_the_planted_heads(planted):
    store, gt, _ = planted
    rule = choose_sink_rule(sink_layers(store))
    label = LabelParams(**rule)
    scores = head_scores(store, gt, np.ones(N, bool), label, rule)
    assert scores.precision.shape == (N, len(LAYERS), HEADS)
    ranked = ranked_heads(scores.precision, store)
    assert set(ranked[:2]) == set(LABEL_HEADS)
    mean = np.nanmean(scores.precision, 0)
    assert mean[3, 1] == pytest.approx(4 / 6) and mean[4, 2] == pytest.approx(4 / 6)  # box + own blob
    assert np.nanmean(scores.argmax_in, 0)[3, 1] == 1.0
    chosen, trace = greedy_heads(store, ranked[:5], label, gt, np.ones(N, bool))
    assert sorted(chosen) == sorted(LABEL_HEADS)
    assert trace[1]["fg_precision"] == pytest.approx(1.0) and trace[1]["kept"]  # the blobs fall below tau_fg
    assert not any(t["kept"] for t in trace[2:])  # every noise head lowers the precision


def test_head_scores_match_a_per_sample_loop(planted):
    store, gt, _ = planted
    rule = {"sink_method": "none"}
    label = LabelParams(sink_method="none", strict=True)
    scores = head_scores(store, gt, np.ones(N, bool), label, rule)
    block = store.read(0, N)
    for i in (0, 7, 31):
        for layer, head in [(0, 0), (3, 1), (5, 3)]:
            a = block.attention[i, layer, head].astype(np.float64)
            fg = a > 0.2 * a.max()
            assert scores.precision[i, layer, head] == pytest.approx((fg & gt[i]).sum() / fg.sum())
            assert scores.recall[i, layer, head] == pytest.approx((fg & gt[i]).sum() / gt[i].sum())
            assert scores.argmax_in[i, layer, head] == float(gt[i][np.argmax(a)])


def test_bootstrap_ci_matches_explicit_resampling():
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 0.2, (40, 3))
    x[rng.random((40, 3)) < 0.1] = np.nan
    mean, low, high = bootstrap_ci(x, reps=200, seed=7)
    counts = np.random.default_rng(7).multinomial(40, np.full(40, 1 / 40), size=200)
    boots = np.array([np.nanmean(np.repeat(x, c, axis=0), 0) for c in counts])
    np.testing.assert_allclose(mean, np.nanmean(x, 0))
    np.testing.assert_allclose(low, np.quantile(boots, 0.025, 0))
    np.testing.assert_allclose(high, np.quantile(boots, 0.975, 0))
    assert (low < mean).all() and (mean < high).all()
    assert np.isnan(bootstrap_ci(x, reps=0)[1]).all()
