"""Named label presets (SPEC section 4): one params.yaml key picks a model's reference settings."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.teacher.label_presets import PRESETS, dump_requirements, resolve_label_params
from pipeline.teacher.labels import LabelParams

# The paper's label rules (eq. 1-2, SPEC 1.3-1.4) written out, every LabelParams field: all stored layers and heads,
# norm-based sinks at 10x the median norm, fg a >= 0.2 a_max, bg a <= 0.1 a_max outside the fg box (non-strict),
# no reference-code extras (box-size / peak filters, soft targets, blurred box, known padding), float64 maps.
PAPER = {
    "layers": None,
    "heads": None,
    "sink_method": "norm",
    "sink_norm_factor": 10.0,
    "sink_norm_abs": None,
    "sink_norm_layer": None,
    "sink_attn_layer": None,
    "sink_attn_heads": None,
    "sink_attn_threshold": 1e-3,
    "tau_fg": 0.2,
    "tau_bg": 0.1,
    "strict": False,
    "max_box_frac": None,
    "min_a_max": None,
    "soft_targets": False,
    "map_dtype": "float64",
    "box_blur": False,
    "mask_known_bg": False,
}


def test_paper_is_the_plain_defaults():
    assert asdict(resolve_label_params({})) == PAPER  # a new field must be written out here too
    assert asdict(resolve_label_params(None)) == PAPER
    assert asdict(resolve_label_params({"preset": "paper"})) == PAPER
    assert asdict(LabelParams()) == PAPER


def test_qwen_7b_preset_matches_spec_table():
    p = resolve_label_params({"preset": "qwen2_5_vl_7b"})
    assert p.heads == {16: [1, 7, 17], 19: [17, 20]}
    assert (p.sink_method, p.sink_attn_layer, p.sink_attn_heads, p.sink_attn_threshold) == (
        "attention",
        9,
        [4, 22],
        1e-2,
    )
    assert (p.min_a_max, p.max_box_frac, p.strict, p.box_blur, p.map_dtype) == (5e-3, 0.5, True, True, "float64")
    assert (p.tau_fg, p.tau_bg) == (0.2, 0.1)
    assert dump_requirements(p) == {"layers": [9, 16, 19], "per_head": True}
    text = resolve_label_params({"preset": "qwen2_5_vl_7b_text"})
    assert text.heads == {22: [1, 4], 23: [6, 11]} and text.sink_method == "none" and text.min_a_max == 5e-3
    assert text.box_blur


def test_other_presets_match_spec_table():
    p3 = resolve_label_params({"preset": "qwen2_5_vl_3b"})
    assert p3.heads == {21: [9, 11], 22: [0, 7]} and (p3.sink_attn_layer, p3.sink_attn_heads) == (8, [1, 13])
    assert resolve_label_params({"preset": "qwen2_5_vl_3b_text"}).heads == {20: [1, 4], 22: [14]}
    l7 = resolve_label_params({"preset": "llava_1_5_7b"})
    assert l7.heads == {14: [13, 24, 26]} and (l7.sink_attn_layer, l7.sink_attn_heads) == (2, None)
    assert (l7.sink_attn_threshold, l7.min_a_max, l7.strict, l7.max_box_frac) == (1e-3, None, True, 0.5)
    assert (l7.map_dtype, l7.box_blur) == ("float16", False)  # the 7B label script sums float16 maps in float16
    l13 = resolve_label_params({"preset": "llava_1_5_13b"})
    assert l13.heads == {16: [2, 21, 30], 15: [2], 13: [21, 23, 26]}
    assert (l13.sink_attn_layer, l13.sink_attn_heads) == (16, [17, 22])
    assert (l13.map_dtype, l13.box_blur) == ("float64", False)
    assert dump_requirements(l13) == {"layers": [13, 15, 16], "per_head": True}
    assert set(PRESETS) >= {"paper", "llava_1_5_7b", "llava_1_5_13b", "qwen2_5_vl_3b", "qwen2_5_vl_7b"}


def test_deepseek_preset_is_the_middle_band_with_paper_rules():
    ds = resolve_label_params({"preset": "deepseek_vl_1_3b"})
    assert ds.layers == [10, 11, 12, 13] and ds.heads is None  # every head of the middle layers of 24
    assert (ds.sink_method, ds.strict, ds.max_box_frac, ds.min_a_max) == ("norm", False, None, None)
    assert dump_requirements(ds) == {"layers": [10, 11, 12, 13], "per_head": False}
    # one params.yaml edit replaces the provisional layers
    assert resolve_label_params({"preset": "deepseek_vl_1_3b", "layers": [8, 9]}).layers == [8, 9]


def test_explicit_keys_override_and_null_keeps_the_preset():
    p = resolve_label_params({"preset": "qwen2_5_vl_7b", "tau_fg": 0.3, "strict": False, "min_a_max": None})
    assert (p.tau_fg, p.strict, p.min_a_max) == (0.3, False, 5e-3)
    assert p.heads == {16: [1, 7, 17], 19: [17, 20]}
    # YAML gives layer keys as strings when quoted; LabelParams normalises them
    q = resolve_label_params({"preset": "qwen2_5_vl_7b", "heads": {"16": [1]}})
    assert q.heads == {16: [1]}


def test_unknown_preset_or_key_is_an_error():
    with pytest.raises(ValueError, match="label.preset: unknown preset 'qwen'"):
        resolve_label_params({"preset": "qwen"})
    with pytest.raises(ValueError, match=r"label: unknown key\(s\) \['tau_fgg'\]"):
        resolve_label_params({"preset": "paper", "tau_fgg": 0.3})
    with pytest.raises(ValueError, match=r"label: missing key\(s\) \[[^\]]*'heads'"):
        resolve_label_params({"preset": "paper", "tau_fg": 0.3}, complete=True)


def test_label_stage_reads_the_preset(tmp_path):
    """stages/label.py resolves the section through the presets (an unknown preset is a parameter error)."""
    from stages.label import label

    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    data["label"]["preset"] = "no_such_model"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    (tmp_path / "store.zarr").mkdir()
    res = CliRunner().invoke(
        label, [str(tmp_path / "store.zarr"), str(tmp_path / "labels.parquet"), "--params", str(params)]
    )
    assert res.exit_code == 2 and "label.preset: unknown preset 'no_such_model'" in res.output
