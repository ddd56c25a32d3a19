"""The DVC pipeline on a tiny saved DeepSeek-VL, switched over by params.yaml alone (issue 18).

The project's own dvc.yaml runs unchanged; params.yaml points the model at a saved toy DeepSeek-VL directory
(a SigLIP tower on a 64 px view: every image's long side resized to 64 px and padded to a grey square, a 4 x 4
grid; a LLaMA decoder of 14 layers, so the ``deepseek_vl_1_3b`` presets fit as they are: label layers 10-13 of
every head, the RPN on B=9 frozen layers with R=3), the manifests at plain-records JSONL of mixed-aspect images.
``dvc repro evaluate label_report`` runs decode -> dump -> label -> train -> evaluate (and the ablations evaluate
compares) and leaves the synthetic world alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from pipeline.io.attention_store import open_attention_store
from pipeline.io.contracts import read_parquet
from pipeline.models import load_adapter
from tests.conftest import WORDS
from tests.dvc_project import WORLD, new_project, run_dvc, write_records
from toymodels.deepseek import ToyDeepseekSizes, build_toy_deepseek, save_toy_deepseek

CHAINS = [
    ["prepare", "decode", "dump", "label", "train", "evaluate"],
    ["prepare_eval", "evaluate"],
    ["dump", "label_report"],
]
LABEL_LAYERS = [10, 11, 12, 13]  # the deepseek_vl_1_3b preset's


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, list[tuple[int, int]], list[tuple[int, int]]]:
    proj = tmp_path_factory.mktemp("deepseek-proj")
    model, processor = build_toy_deepseek(WORDS, ToyDeepseekSizes(text_layers=14), seed=0)
    save_toy_deepseek(model, processor, proj / "models" / "tiny-deepseek")
    train_sizes = write_records(proj / "data" / "train.jsonl", 8, seed=1)
    eval_sizes = write_records(proj / "data" / "eval.jsonl", 4, seed=2)

    def edit(params):  # only params.yaml changes: the README's DeepSeek-VL block, at toy sizes
        params["model"].update(path="models/tiny-deepseek", device="cpu", dtype="float32")
        params["prepare"].update(input="data/train.jsonl")
        params["prepare_eval"].update(input="data/eval.jsonl")
        params["decode"].update(batch_size=4, max_new_tokens=3)
        params["dump"].update(layers=LABEL_LAYERS, per_head=False, batch_size=4)
        params["label"].update(preset="deepseek_vl_1_3b", layers=None)
        params["train"].update(preset="deepseek_vl_1_3b", B=None, R=None)
        params["train"].update(lr=1e-4, global_batch=4, micro_batch=2, holdout_frac=0.25, save_every=1)
        params["evaluate"].update(batch_size=4, max_new_tokens=3)

    new_project(proj, edit)
    return proj, train_sizes, eval_sizes


def test_dvc_repro_runs_every_stage_on_deepseek(project):
    proj, train_sizes, eval_sizes = project
    stages = set(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]) - WORLD - {"release", "benchmarks"}
    ran = re.findall(r"Running stage '([\w-]+)'", run_dvc(proj, "repro", "evaluate", "label_report"))
    assert sorted(ran) == sorted(stages)
    for chain in CHAINS:
        assert [s for s in ran if s in chain] == chain

    # the teacher: DeepSeek's prompts, its 4 x 4 grid for every aspect ratio, the preset's layers
    responses = read_parquet(proj / "artifacts/responses.parquet", "responses").to_pylist()
    assert len(responses) == 8
    assert all(r["prompt"].endswith("\n\nAssistant:") and "User: <image_placeholder>" in r["prompt"] for r in responses)
    store = open_attention_store(proj / "artifacts/attention.zarr")
    assert list(store.layers) == LABEL_LAYERS
    labels = pl.read_parquet(proj / "artifacts/labels.parquet")
    assert labels.schema["labels"] == pl.Array(pl.Int8, 16)
    assert set(zip(labels["grid_h"].to_list(), labels["grid_w"].to_list(), strict=True)) == {(4, 4)}
    assert labels["kept"].sum() > 0
    # the padded rows of a wide image and columns of a tall one are the store's known background
    adapter = load_adapter(proj / "models/tiny-deepseek", device="cpu", dtype="float32", weights=False)
    known_bg = store.read(0, len(store)).known_bg
    for i, (w, h) in enumerate(train_sizes):
        assert np.array_equal(known_bg[i, :16], adapter.padding_tokens(w, h)), (w, h)
    assert adapter.padding_tokens(160, 90).any() and not adapter.padding_tokens(84, 84).any()

    # the student: the preset's RPN, B=9 R=3, on the DeepSeek-VL base
    cfg = json.loads((proj / "artifacts/rpn/rpn_config.json").read_text())
    assert cfg["base_model"]["family"] == "deepseek_vl" and (cfg["B"], cfg["R"]) == (9, 3)
    train_metrics = json.loads((proj / "artifacts/train_metrics.json").read_text())
    assert train_metrics["n_train"] + train_metrics["n_holdout"] + train_metrics["n_skipped"] == 8

    evaluation = json.loads((proj / "artifacts/metrics/evaluate.json").read_text())
    assert {"baseline", "sdrpn_masked", "sdrpn_box", "raw_attention"} <= set(evaluation)
    preds = pl.from_arrow(read_parquet(proj / "artifacts/eval/predictions.parquet", "predictions"))
    assert preds.height == 4 * len(evaluation)
    # stage 2 really ran with crops, and every crop lies inside its own (non-square) image
    with_crops = preds.filter(pl.col("n_crop_tokens") > 0)
    assert with_crops.height > 0
    size_of = {f"eval-{i}": s for i, s in enumerate(eval_sizes)}
    for sid, boxes in zip(with_crops["sample_id"], with_crops["crop_boxes"].to_list(), strict=True):
        w, h = size_of[sid]
        assert all(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h for x0, y0, x1, y1 in boxes)
    assert "Running stage" not in run_dvc(proj, "repro", "evaluate", "label_report")  # a rerun is a no-op
