"""Label-quality report: precision/recall/argmax and Fig. 3 bins against hand-computed values."""

from __future__ import annotations

import numpy as np

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.teacher.label_report import label_quality
from pipeline.teacher.labels import LabelParams


def _store(tmp_path, attention, norms, side, layers=(3,)):
    n = len(attention)
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", n_samples=n, layers=list(layers), max_visual=side * side)
    w.write(0, [f"s{i}" for i in range(n)], np.full((n, 2), side, np.int32), np.ones(n, np.int32), attention, norms)
    w.finalize()
    return open_attention_store(tmp_path / "s.zarr")


def test_label_quality_by_hand(tmp_path):
    side = 3
    # sample 0: attention peaks on a sink (token 8) outside the GT box {0, 1}; token 0 is the real target
    a0 = np.array([0.5, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32)
    n0 = np.ones(9, np.float32)
    n0[8] = 100.0
    # sample 1: clean, argmax inside the box {4}
    a1 = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.3], np.float32)
    n1 = np.ones(9, np.float32)
    store = _store(tmp_path, np.stack([a0, a1])[:, None], np.stack([n0, n1])[:, None], side)
    gt = np.zeros((2, 9), bool)
    gt[0, [0, 1]] = True
    gt[1, 4] = True
    metrics, hist = label_quality(store, LabelParams(), gt, np.array([True, True]))
    raw = metrics["raw_attention"]
    # raw fg rule (a >= 0.2 a_max): sample 0 -> {0, 8}: precision 1/2, recall 1/2; sample 1 -> {4, 8}: 1/2, 1
    assert raw["fg_precision"] == 0.5 and raw["fg_recall"] == 0.75
    assert raw["argmax_in_box"] == 0.5
    lab = metrics["labels"]
    # after sink removal sample 0's map is {0: .5, 1: .05}: fg {0} -> precision 1, recall 1/2;
    # sample 1 has no sink: fg {4, 8} -> precision 1/2, recall 1
    assert lab["fg_precision"] == 0.75 and lab["fg_recall"] == 0.75 and lab["argmax_in_box"] == 1.0
    assert metrics["sinks"]["per_sample"] == 0.5 and metrics["sinks"]["share_inside_gt_box"] == 0.0
    assert metrics["sinks"]["max_over_median_norm_max"] == 100.0
    top = hist[-1]  # a / a_max in [0.9, 1.0]: raw holds tokens 8 (out) and 4 (in) -> 1/2; denoised 0 and 4 -> 1
    assert top["raw_inside_gt"] == 0.5 and top["denoised_inside_gt"] == 1.0


def test_raw_fg_rule_follows_strict(tmp_path):
    """The raw-attention fg rule is the labels' rule: with ``strict`` a token exactly at tau_fg * a_max is not fg.

    (The report used ``>=`` whatever ``strict`` said: it counted token 1 below, precision 2/3 and recall 1.)
    """
    a = np.array([1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0], np.float32)  # 0.25 * a_max = 0.25: a tie
    store = _store(tmp_path, a[None, None], np.ones((1, 1, 9), np.float32), 3)
    gt = np.zeros((1, 9), bool)
    gt[0, [0, 1]] = True
    metrics, _ = label_quality(store, LabelParams(tau_fg=0.25, strict=True), gt, np.array([True]))
    # strict fg {0, 6}: precision 1/2, recall 1/2, for the raw map and (no sinks) for the labels alike
    assert metrics["raw_attention"] == metrics["labels"] == {"fg_precision": 0.5, "fg_recall": 0.5, "argmax_in_box": 1}
    loose, _ = label_quality(store, LabelParams(tau_fg=0.25), gt, np.array([True]))
    assert loose["raw_attention"]["fg_precision"] == 2 / 3 and loose["raw_attention"]["fg_recall"] == 1.0


def test_norm_ratio_on_the_sink_detectors_layer(tmp_path):
    """The norm ratio reads the layer the sink detector reads (first label layer here, layer 5), not stored layer 0.

    (The report took stored position 0, layer 3, whose norms are flat: it gave a max/median of 1.)
    """
    att = np.zeros((1, 2, 9), np.float32)
    att[0, 1] = [0.5, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    norms = np.ones((1, 2, 9), np.float32)
    norms[0, 1, 8] = 100.0  # a sink at layer 5 only
    store = _store(tmp_path, att, norms, 3, layers=(3, 5))
    gt = np.zeros((1, 9), bool)
    gt[0, [0, 1]] = True
    metrics, _ = label_quality(store, LabelParams(layers=[5]), gt, np.array([True]))
    assert metrics["sinks"]["per_sample"] == 1.0 and metrics["sinks"]["share_inside_gt_box"] == 0.0
    assert metrics["sinks"]["max_over_median_norm_max"] == 100.0
    assert metrics["labels"] == {"fg_precision": 1.0, "fg_recall": 0.5, "argmax_in_box": 1.0}
