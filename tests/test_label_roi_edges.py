"""Edges of labels and RoI post-processing that mutation testing showed unpinned: errors that name the wrong
field, a one-sample labels table, and smoothing of an integer map."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ParamsError
from pipeline.inference.roi import RoIParams, postprocess, smooth
from pipeline.teacher.labels import LabelParams, label_plan, labels_table


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (LabelParams(layers=[9]), "layers"),
        (LabelParams(layers=[2], sink_norm_layer=9), "sink_norm_layer"),
        (LabelParams(layers=[2], sink_method="attention", sink_attn_layer=9), "sink_attn_layer"),
    ],
)
def test_a_layer_not_in_the_store_is_named(params, field):
    with pytest.raises(ValueError, match=rf"^{field}: layer 9 is not in the store \(stored layers \[2, 5\]\)"):
        label_plan(params, [2, 5], None)


def test_head_subsets_are_named():
    with pytest.raises(ValueError, match=r"^heads: head subset \[1\] needs a per-head store"):
        label_plan(LabelParams(heads=[1]), [2], None)
    with pytest.raises(ValueError, match=r"^sink_attn_heads: heads \[7\] not in the store"):
        label_plan(LabelParams(sink_method="attention", sink_attn_layer=2, sink_attn_heads=[7]), [2], [0, 1])


def test_from_dict_names_the_section():
    with pytest.raises(ParamsError, match=r"label\.tau_fg"):
        LabelParams.from_dict({"tau_fg": 2.0})
    assert LabelParams.from_dict({"tau_fg": "0.3"}).tau_fg == 0.3


def _out(n: int, v: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "grid_h": np.full(n, 2, np.int32),
        "grid_w": np.full(n, v // 2, np.int32),
        "labels": rng.integers(-1, 2, (n, v)).astype(np.int8),
        **{k: np.ones(n, np.int32) for k in ("n_fg", "n_bg", "n_ignore", "n_sink")},
        **{k: np.zeros(n, np.int32) for k in ("fg_y0", "fg_x0", "fg_y1", "fg_x1")},
        "a_max": np.ones(n, np.float32),
        "sink_tau": np.full(n, np.nan, np.float32),
        "kept": np.ones(n, bool),
        "skip_code": np.zeros(n, np.int8),
    }


@pytest.mark.parametrize("n", [1, 3])
def test_labels_table_of_one_grid_size(n):
    """One sample (a store of one, a last chunk of one) and several: each row holds its V labels, in order."""
    out = _out(n, 6)
    table = labels_table(out, np.array([f"s{i}" for i in range(n)]))
    assert table.column("labels").to_pylist() == out["labels"].tolist()
    assert table.column("sample_id").to_pylist() == [f"s{i}" for i in range(n)]


def test_smoothing_an_integer_map_is_the_float_map_smoothed():
    """A 0/1 integer map (a mask, a test fixture) blurs as floats, not truncated back to integers."""
    grid = np.zeros((5, 5), dtype=np.int64)
    grid[2, 2] = 1
    got = smooth(grid, 3, 1.0)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, smooth(grid.astype(np.float64), 3, 1.0))
    assert 0 < got[2, 1] < got[2, 2] < 1


def test_postprocess_refuses_a_map_that_is_not_2d():
    with pytest.raises(ValueError, match=r"expected an \(H, W\) map, got shape \(4,\)"):
        postprocess(np.zeros(4), RoIParams())
