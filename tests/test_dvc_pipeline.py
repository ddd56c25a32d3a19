"""`dvc repro` end to end on a tiny model: all stages run, a rerun is a no-op, a label threshold reruns label+train."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.io.contracts import read_metadata, read_parquet
from tests.dvc_project import new_project, run_dvc

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "world",
    "world_eval",
    "prepare",
    "prepare_eval",
    "decode",
    "dump",
    "label",
    "label_report",
    "train",
    "label_nosink",
    "label_noassign",
    "train_nosink",
    "train_noassign",
    "evaluate",
    "release",
    "benchmarks",
}
# every chain that must run in this order
CHAINS = [
    ["world", "prepare", "decode", "dump", "label", "train", "evaluate", "release", "benchmarks"],
    ["world_eval", "prepare_eval", "evaluate"],
    ["dump", "label_report"],
]


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory, toy_dir) -> Path:
    proj = tmp_path_factory.mktemp("proj")
    shutil.copytree(toy_dir, proj / "models" / "tiny")

    def edit(params: dict) -> None:
        params["world"].update(n_train=10, n_eval=4)
        params["model"].update(path="models/tiny", device="cpu", dtype="float32")
        params["decode"].update(batch_size=4, max_new_tokens=3)
        params["dump"].update(layers=[1, 2], batch_size=4)
        params["train"].update(B=1, R=2, global_batch=4, micro_batch=2, holdout_frac=0.2, save_every=1)
        params["evaluate"].update(batch_size=4, max_new_tokens=3)

    new_project(proj, edit)
    return proj


def test_repro_runs_every_stage_then_nothing(project):
    first = _ran(run_dvc(project, "repro"))
    assert set(first) == STAGES and len(first) == len(STAGES)
    for chain in CHAINS:
        assert [s for s in first if s in chain] == chain
    labels = read_parquet(project / "artifacts/labels.parquet", "labels")
    assert labels.num_rows == 10
    assert sorted(p.name for p in (project / "artifacts/rpn").iterdir()) == ["rpn.safetensors", "rpn_config.json"]
    metrics = json.loads((project / "artifacts/train_metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_holdout"] + metrics["n_skipped"] == 10
    assert (project / "artifacts/train_steps.csv").read_text().startswith("step,epoch,loss,lr,grad_norm")
    quality = json.loads((project / "artifacts/metrics/label_quality.json").read_text())
    assert quality["n_samples_with_gt"] == 10
    evaluation = json.loads((project / "artifacts/metrics/evaluate.json").read_text())
    methods = {
        "baseline",
        "sdrpn_masked",
        "sdrpn_box",
        "raw_attention",
        "no_sink_removal_masked",
        "no_label_assignment_masked",
    }
    assert set(evaluation) == methods
    assert read_parquet(project / "artifacts/eval/predictions.parquet", "predictions").num_rows == 4 * len(methods)
    soft = pl.read_parquet(project / "artifacts/ablation/labels_noassign.parquet")
    assert soft["soft_target"].arr.max().max() == 1.0 and soft["n_sink"].sum() == 0
    assert read_metadata(project / "artifacts/ablation/labels_nosink.parquet")["params"]["sink_method"] == "none"
    second = run_dvc(project, "repro")
    assert _ran(second) == []
    assert "up to date" in run_dvc(project, "status")


def test_label_threshold_change_reruns_label_and_what_follows(project):
    run_dvc(project, "repro")
    before = pl.read_parquet(project / "artifacts/labels.parquet")
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["label"]["tau_fg"] = 0.6
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    # the stages that read the label section are out of date (a dry run); rerunning the whole chain is the
    # first test's work (minutes), so only label runs here, and what reads its output is then out of date too
    ran = _ran(run_dvc(project, "repro", "--dry"))
    assert set(ran) == {"label", "label_report", "label_nosink", "label_noassign"}
    assert _ran(run_dvc(project, "repro", "label")) == ["label"]
    after = pl.read_parquet(project / "artifacts/labels.parquet")
    assert after["n_fg"].sum() <= before["n_fg"].sum()  # a higher fg threshold never adds fg tokens
    stale = run_dvc(project, "status")
    assert all(f"{stage}:" in stale for stage in ("train", "label_report", "label_nosink", "label_noassign"))
    assert "evaluate:" not in stale  # not yet: its RPN has not changed until train reruns
    # back to the original threshold: label comes out byte-identical, so nothing after it is out of date
    params_file.write_text(original)
    run_dvc(project, "repro", "label")  # DVC may restore it from its run cache instead of running it
    assert pl.read_parquet(project / "artifacts/labels.parquet").equals(before)
    assert "up to date" in run_dvc(project, "status")


def test_label_code_change_reruns_only_label(project):
    run_dvc(project, "repro")
    with open(project / "pipeline/teacher/labels.py", "a") as fh:
        fh.write("\n# edited\n")
    # labels.parquet comes out byte-identical, so train (which depends on the artifact, not the code) stays put;
    # evaluate reruns because its raw-attention ablation builds its map with the labels' own aggregation (and
    # benchmarks, which runs evaluate's code)
    before = _out_hashes(project)
    ran = sorted(_ran(run_dvc(project, "repro")))
    assert ran == ["benchmarks", "evaluate", "label", "label_noassign", "label_nosink", "label_report", "release"]
    # and every rerun stage wrote the same bytes as before (evaluate's metrics and plot aside: they carry timings)
    timed = {"artifacts/metrics/evaluate.json", "artifacts/plots/evaluate.csv"}
    assert {k: v for k, v in _out_hashes(project).items() if k not in timed} == {
        k: v for k, v in before.items() if k not in timed
    }


def _out_hashes(project: Path) -> dict[str, str]:
    """{output path: md5} of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def test_inspect_draws_every_panel_it_has_data_for(project):
    run_dvc(project, "repro")
    train_id = pl.read_parquet(project / "artifacts/labels.parquet")["sample_id"][0]
    eval_id = pl.read_parquet(project / "artifacts/eval/manifest.parquet")["sample_id"][0]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["sdrpn", "inspect", train_id, eval_id], cwd=project, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    from pipeline.report.inspect_view import PANEL

    # train samples: image, raw attention, sinks, labels, RPN map; eval samples: image and RPN map only
    assert Image.open(project / f"artifacts/inspect/{train_id}.png").width == 5 * PANEL
    assert Image.open(project / f"artifacts/inspect/{eval_id}.png").width == 2 * PANEL
    res = subprocess.run(["sdrpn", "inspect", "nope"], cwd=project, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "samples ['nope'] are in none of" in res.stderr


def _readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its API example block"
    return match.group(1)


def test_release_answers_as_evaluate_did(project, monkeypatch):
    """The README's API snippet on the release reproduces evaluate's masked predictions (text and crops)."""
    from pipeline.api import SDRPN
    from pipeline.inference.params import InferenceSettings

    run_dvc(project, "repro")
    params = yaml.safe_load((project / "params.yaml").read_text())
    settings = InferenceSettings.of_checkpoint(project / "artifacts/release/rpn")
    assert settings is not None and settings.max_new_tokens == params["evaluate"]["max_new_tokens"]
    assert settings.roi.tau == params["evaluate"]["roi"]["tau"] != 0.15 and settings.roi.mode == "masked"
    assert InferenceSettings.of_checkpoint(project / "artifacts/rpn") is None
    evaluated = pl.read_parquet(project / "artifacts/eval/predictions.parquet").filter(
        pl.col("method") == "sdrpn_masked"
    )
    manifest = pl.read_parquet(project / "artifacts/eval/manifest.parquet")
    monkeypatch.chdir(project)
    scope: dict = {}
    exec(compile(_readme_api_block().replace("models/sdrpn-toy-llava", "models/tiny"), "README.md", "exec"), scope)
    first = evaluated.filter(pl.col("sample_id") == manifest["sample_id"][0]).row(0, named=True)
    assert (scope["ans"].text, scope["ans"].crop_boxes) == (first["response"], first["crop_boxes"])
    # every evaluation sample, batched as evaluate batches them
    sd = scope["sd"]
    answers = sd.answer_batch(manifest["image"].to_list(), manifest["question"].to_list())
    got = [(a.text, a.crop_boxes) for a in answers]
    by_id = {r["sample_id"]: (r["response"], r["crop_boxes"]) for r in evaluated.iter_rows(named=True)}
    assert got == [by_id[s] for s in manifest["sample_id"]]
    assert sd.roi == settings.roi
    # the plain train checkpoint records nothing: the library defaults apply
    plain = SDRPN.from_pretrained("models/tiny", "artifacts/rpn", device="cpu", dtype="float32")
    assert plain.roi.tau == 0.15


def test_benchmarks_stage_on_fixture_files(project):
    """`dvc repro benchmarks` with three benchmarks configured: only that stage runs, and it writes the table."""
    from benchmark_fixtures import write_fixture

    run_dvc(project, "repro")
    assert (project / "artifacts/benchmarks/table.md").read_text().startswith("No benchmark configured")
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    data = project / "data"
    sets = {
        "textvqa": {"path": str(write_fixture("textvqa", "lmms_lab_parquet", data, n=4))},
        "pope": {"path": str(write_fixture("pope", "lmms_lab_parquet", data, n=6))},
        "vstar": {"path": str(write_fixture("vstar", "original_jsonl", data, n=4)), "n": 3},
    }
    params["benchmarks"].update(sets=sets, max_new_tokens=3, batch_size=4)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(run_dvc(project, "repro")) == ["benchmarks"]
    table = (project / "artifacts/benchmarks/table.md").read_text()
    assert "| method | TextVQA val | throughput |" in table
    assert "| method | V* attributes | V* spatial | V* overall | POPE | avg | throughput |" in table
    metrics = json.loads((project / "artifacts/metrics/benchmarks.json").read_text())
    assert {b: metrics[b]["baseline"]["n"] for b in metrics} == {"textvqa": 4, "vstar": 3, "pope": 6}
    assert "benchmarks.json" in run_dvc(project, "metrics", "show")
    params_file.write_text(original)
    run_dvc(project, "repro")
