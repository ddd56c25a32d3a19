"""evaluate: every method answers every sample; no region means the baseline's answer; localisation by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import pipeline.inference.evaluate as evaluate_mod
from pipeline.inference.evaluate import _localisation, evaluate_manifest
from pipeline.inference.params import EvalParams
from pipeline.inference.roi import RoI
from pipeline.io.manifest import build_manifest, records_from_table
from pipeline.student.rpn import RPN


@pytest.fixture
def manifest(records_jsonl):
    table, _ = build_manifest(records_from_table(records_jsonl))
    return table


def test_every_method_answers_and_empty_regions_fall_back(adapter, manifest):
    rpn = RPN.from_base(adapter, B=1, R=2).eval()
    params = EvalParams(batch_size=4, max_new_tokens=3, raw_attention_layers=[1])
    table, metrics = evaluate_manifest(adapter, manifest, {"sdrpn": rpn}, params, progress=False)
    methods = ["baseline", "sdrpn_masked", "sdrpn_box", "raw_attention"]
    assert sorted(metrics) == sorted(methods)
    assert table.num_rows == manifest.num_rows * len(methods)
    rows = table.to_pylist()
    base = {r["sample_id"]: r["response"] for r in rows if r["method"] == "baseline"}
    for r in rows:
        if not r["found"]:
            assert r["response"] == base[r["sample_id"]] and r["crop_boxes"] == []
    for m in methods[1:]:
        assert metrics[m]["throughput_vs_baseline"] > 0
    # raw attention needs the baseline's answer first and is charged for it: it can never beat the baseline
    assert metrics["raw_attention"]["throughput_vs_baseline"] < 1
    # tau above every probability: no region anywhere, every answer is the baseline's
    quiet = EvalParams(batch_size=4, max_new_tokens=3, raw_attention=False, modes=["masked"], roi={"tau": 1.0})
    table, metrics = evaluate_manifest(adapter, manifest, {"sdrpn": rpn}, quiet, progress=False)
    got = {r["sample_id"]: r["response"] for r in table.to_pylist() if r["method"] == "sdrpn_masked"}
    assert got == base and metrics["sdrpn_masked"]["region_found"] == 0.0


def test_localisation_by_hand(adapter):
    # 64x64 image on a 4x4 grid (16 px tokens); GT box = token (1, 1) = pixels [16, 32)
    man = {"box_x0": 16.0, "box_y0": 16.0, "box_x1": 32.0, "box_y1": 32.0, "width": 64, "height": 64}
    mask = np.zeros((4, 4), bool)
    mask[1, 1:3] = True  # two tokens, one inside the box
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(1, 1, 1, 2)], enclosing=(1, 1, 1, 2))
    inside, recall, iou = _localisation(adapter, {"crop_boxes": [[16, 16, 48, 32]]}, roi, man)
    assert inside == 0.5 and recall == 1.0 and iou == pytest.approx(256 / 512)
    none = RoI(smoothed=mask * 0.0, mask=mask & False)
    assert _localisation(adapter, {"crop_boxes": []}, none, man)[1:] == (0.0, 0.0)


def test_crop_size_must_match_the_adapter(toy, adapter, manifest):
    from pipeline.config import ModelParams
    from pipeline.models import wrap_model

    rpn = RPN.from_base(adapter, B=1, R=1).eval()
    params = EvalParams(batch_size=4, max_new_tokens=2, raw_attention=False, modes=["masked"], crop_size=32)
    with pytest.raises(ValueError, match="evaluate.crop_size is 32 but the llava adapter encodes crops at the base"):
        evaluate_manifest(adapter, manifest, {"sdrpn": rpn}, params, progress=False)
    assert ModelParams(path="m").adapter_options() == {}
    assert ModelParams(path="m", resolution={"mode": "native"}).adapter_options() == {"resolution": {"mode": "native"}}
    small = wrap_model(*toy, "toy", crop_size=32)
    table, metrics = evaluate_manifest(small, manifest, {"sdrpn": RPN.from_base(small, 1, 1).eval()}, params, False)
    assert table.column("n_crop_tokens").to_pylist() and max(table.column("n_crop_tokens").to_pylist()) <= 4


def test_throughput_is_baseline_time_over_method_time(adapter, manifest, monkeypatch):
    """A fake clock that each method's work advances by a known amount per batch: baseline 2 s, SD-RPN masked
    4 s, box 5 s, raw attention 1 s of its own plus the baseline's 2 s. Throughput relative to the baseline is
    baseline time / method time, summed over the two batches: 0.5, 0.4 and 2/3."""
    now = [100.0]
    monkeypatch.setattr(evaluate_mod, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def costing(fn, seconds):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            now[0] += seconds(*args) if callable(seconds) else seconds
            return out

        return run

    def two_stage_cost(adapter, images, questions, maps, params, *rest):
        if not callable(maps):  # raw attention hands over its maps; the RPN methods their stage 1
            return 0.5
        return {"masked": 4.0, "box": 5.0}[params.mode]

    monkeypatch.setattr(evaluate_mod, "decode_batch", costing(evaluate_mod.decode_batch, 2.0))
    monkeypatch.setattr(evaluate_mod, "raw_attention_maps", costing(evaluate_mod.raw_attention_maps, 0.5))
    monkeypatch.setattr(evaluate_mod, "two_stage_batch", costing(evaluate_mod.two_stage_batch, two_stage_cost))
    rpn = RPN.from_base(adapter, B=1, R=2).eval()
    params = EvalParams(batch_size=4, max_new_tokens=2, raw_attention_layers=[1])
    _, metrics = evaluate_manifest(adapter, manifest, {"sdrpn": rpn}, params, progress=False)
    assert manifest.num_rows == 6  # two batches
    assert metrics["baseline"]["throughput_vs_baseline"] == 1.0
    got = {m: metrics[m]["throughput_vs_baseline"] for m in ("sdrpn_masked", "sdrpn_box", "raw_attention")}
    assert got == pytest.approx({"sdrpn_masked": 0.5, "sdrpn_box": 0.4, "raw_attention": 2 / 3}, abs=1e-12)
