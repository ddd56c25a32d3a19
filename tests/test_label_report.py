"""Label-quality report: precision/recall/argmax and Fig. 3 bins against hand-computed values."""

from __future__ import annotations

import numpy as np

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.teacher.label_report import label_quality
from pipeline.teacher.labels import LabelParams


def _store(tmp_path, attention, norms, side):
    n = len(attention)
    w = AttentionStoreWriter.create(tmp_path / "s.zarr", n_samples=n, layers=[3], max_visual=side * side)
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
