"""The benchmarks stage: its params, the paper-layout tables, and the stage end to end on fixture files."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from benchmark_fixtures import FIXTURE_FORMATS, write_fixture
from click.testing import CliRunner

from pipeline.benchmarks import BENCHMARKS
from pipeline.benchmarks.params import BenchmarksParams
from pipeline.benchmarks.prompts import build_prompt
from pipeline.benchmarks.scorers import SCORERS
from pipeline.benchmarks.table import markdown_tables
from pipeline.config import ParamsError, parse_section
from pipeline.io.contracts import read_metadata, read_parquet
from pipeline.student.rpn import RPN
from stages.cli import main

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["baseline", "sdrpn_masked", "sdrpn_box"]


def _parse(sets: dict, batch_size: int = 8) -> BenchmarksParams:
    values = {"sets": sets, "batch_size": batch_size, "max_new_tokens": None}
    return parse_section(BenchmarksParams, values, "benchmarks", complete=True)


def test_params_name_the_bad_key(tmp_path):
    data = tmp_path / "tv.parquet"
    data.write_bytes(b"x")
    assert _parse({}).selected() == []
    # the paper's order, whatever the order in params.yaml
    got = _parse({"pope": {"path": str(data)}, "textvqa": {"path": str(data), "n": 5}}).selected()
    assert [(s.name, s.n) for s in got] == [("textvqa", 5), ("pope", None)]
    cases = [
        ({"textvqa2": {"path": str(data)}}, "benchmarks.sets.textvqa2: unknown benchmark"),
        ({"textvqa": {"path": str(tmp_path / "missing")}}, "benchmarks.sets.textvqa.path: .*does not exist"),
        ({"textvqa": {"path": str(data), "limit": 3}}, "benchmarks.sets.textvqa.limit: unknown key"),
        ({"textvqa": {"path": str(data), "n": 0}}, r"benchmarks.sets.textvqa.n: must be >= 1"),
        ({"textvqa": {"path": str(data), "image_root": str(data)}}, "benchmarks.sets.textvqa.image_root: .*not a dir"),
        ({"textvqa": str(data)}, "benchmarks.sets.textvqa: .*dictionary"),
    ]
    for sets, message in cases:
        with pytest.raises(ParamsError, match=message):
            _parse(sets)
    with pytest.raises(ParamsError, match="benchmarks.batch_size"):
        _parse({}, batch_size=0)


def _metrics(score: float, seconds: float, **parts: float) -> dict:
    return {"score": score, "n": 10, "n_skipped": 0, "seconds": seconds, **parts}


def test_tables_in_the_papers_layout():
    results = {
        "textvqa": {"baseline": _metrics(46.1, 10.0), "sdrpn_masked": _metrics(58.7, 16.0)},
        "docvqa": {"baseline": _metrics(21.5, 30.0), "sdrpn_masked": _metrics(33.9, 50.0)},
        "pope": {"baseline": _metrics(85.0, 5.0), "sdrpn_masked": _metrics(86.5, 10.0)},
    }
    text = markdown_tables(results)
    table1, table2 = text.split("### ")[1:]
    assert table1.startswith("Document & OCR") and table2.startswith("Vision-centric")
    lines1 = [line for line in table1.splitlines() if line.startswith("|")]
    # DocVQA before TextVQA (the paper's column order), average and throughput over the table's benchmarks
    assert lines1[0] == "| method | DocVQA val | TextVQA val | avg | throughput |"
    assert lines1[2] == "| baseline | 21.5 | 46.1 | 33.8 | 1.00x |"
    assert lines1[3] == "| SD-RPN (masked) | 33.9 (+12.4) | 58.7 (+12.6) | 46.3 (+12.5) | 0.61x |"
    lines2 = [line for line in table2.splitlines() if line.startswith("|")]
    assert lines2[0] == "| method | POPE | throughput |"  # one benchmark: no average
    assert lines2[3] == "| SD-RPN (masked) | 86.5 (+1.5) | 0.50x |"
    assert "Unanswered" not in text
    results["pope"]["sdrpn_masked"]["n_skipped"] = 2
    assert "Unanswered (past the model's context, not scored): POPE 2" in markdown_tables(results)
    assert markdown_tables({}).startswith("No benchmark configured")


def test_table_two_shows_the_parts_the_paper_shows():
    results = {
        "vstar": {
            "baseline": _metrics(50.0, 1.0, vstar_direct_attributes_acc=40.0, vstar_relative_position_acc=65.0),
            "sdrpn_box": _metrics(67.5, 2.0, vstar_direct_attributes_acc=70.0, vstar_relative_position_acc=63.0),
        },
        "hrbench4k": {
            "baseline": _metrics(40.0, 1.0, single=0.5, cross=0.3),
            "sdrpn_box": _metrics(45.0, 1.0, single=0.6, cross=0.3),
        },
    }
    lines = [line for line in markdown_tables(results).splitlines() if line.startswith("|")]
    assert lines[0] == (
        "| method | V* attributes | V* spatial | V* overall | HR-Bench 4K FSP | HR-Bench 4K FCP | HR-Bench 4K overall "
        "| avg | throughput |"
    )
    # HR-Bench's parts are fractions in lmms-eval's report, percent in the table
    assert lines[3] == (
        "| SD-RPN (box) | 70.0 (+30.0) | 63.0 (-2.0) | 67.5 (+17.5) | 60.0 (+10.0) | 30.0 (+0.0) | 45.0 (+5.0) "
        "| 56.2 (+11.2) | 0.67x |"
    )


@pytest.fixture
def bench_project(tmp_path, toy_dir, adapter) -> Path:
    """A params.yaml running all nine benchmarks from fixture files (one format each) on the tiny LLaVA."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(toy_dir), device="cpu", dtype="float32")
    params["evaluate"].update(batch_size=2, modes=["masked", "box"])
    sets = {
        name: {"path": str(write_fixture(name, FIXTURE_FORMATS[name][0], tmp_path / "data", n=4))}
        for name in BENCHMARKS
    }
    params["benchmarks"].update(sets=sets, batch_size=2, max_new_tokens=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    RPN.from_base(adapter, B=1, R=2).save(tmp_path / "rpn")
    return tmp_path


def _run(project: Path, *extra: str):
    args = ["benchmarks", str(project / "rpn"), str(project / "out"), "--metrics", str(project / "metrics.json")]
    args += ["--image-dir", str(project / "images"), "--work-dir", str(project / "work")]
    return CliRunner().invoke(main, [*args, "--params", str(project / "params.yaml"), "--no-progress", *extra])


def test_stage_runs_every_benchmark_and_scores_by_its_rules(bench_project):
    res = _run(bench_project)
    assert res.exit_code == 0, res.output
    metrics = json.loads((bench_project / "metrics.json").read_text())
    assert list(metrics) == list(BENCHMARKS)
    for name in BENCHMARKS:
        out = bench_project / "out" / name
        docs = {d["sample_id"]: d for d in read_parquet(out / "manifest.parquet", "benchmark_manifest").to_pylist()}
        predictions = pl.from_arrow(read_parquet(out / "predictions.parquet", "predictions"))
        assert len(docs) == 4 and predictions.height == 4 * len(METHODS)
        assert predictions["method"].unique(maintain_order=True).to_list() == METHODS
        # the task's max_new_tokens, capped by benchmarks.max_new_tokens
        assert read_metadata(out / "predictions.parquet")["params"]["evaluate"]["max_new_tokens"] == 3
        for method in METHODS:
            rows = predictions.filter(pl.col("method") == method).to_dicts()
            records = [SCORERS[name].process(docs[r["sample_id"]], r["response"]) for r in rows]
            assert [r["score"] for r in rows] == [rec["score"] for rec in records]
            assert metrics[name][method]["score"] == pytest.approx(SCORERS[name].aggregate(records)["score"])
            assert metrics[name][method]["n"] == 4 and metrics[name][method]["seconds"] > 0
        assert json.loads((out / "metrics.json").read_text()) == metrics[name]
    table = (bench_project / "out" / "table.md").read_text()
    assert "Document & OCR" in table and "HR-Bench 8K FCP" in table and "| SD-RPN (box) |" in table
    assert not [p.name for p in (bench_project / "out").rglob(".*")]  # no lock or temp file in the output
    # embedded images went to the image dir, content-addressed; the answers stay in the work dir, 2 batches each
    assert any((bench_project / "images" / "textvqa").iterdir())
    assert len(list((bench_project / "work").rglob("part-*.parquet"))) == 2 * len(BENCHMARKS)


def test_prompts_reach_the_model_as_lmms_eval_builds_them(bench_project, monkeypatch):
    import pipeline.inference.evaluate as run

    seen: dict[tuple[str, str], str] = {}
    real = run.predict_batch

    def spy(adapter, batch, *args, **kwargs):
        seen.update({(r["source"], r["sample_id"]): r["question"] for r in batch})
        return real(adapter, batch, *args, **kwargs)

    monkeypatch.setattr(run, "predict_batch", spy)
    assert _run(bench_project).exit_code == 0
    for name in BENCHMARKS:
        docs = read_parquet(bench_project / "out" / name / "manifest.parquet", "benchmark_manifest").to_pylist()
        assert {d["sample_id"]: build_prompt(name, d, "llava") for d in docs} == {
            sid: q for (src, sid), q in seen.items() if src == name
        }
    vstar = [q for (src, _), q in seen.items() if src == "vstar"]
    assert all(
        "\nA. " in q and q.endswith("Answer with the option's letter from the given choices directly.") for q in vstar
    )


def _predictions(project: Path) -> dict[str, pl.DataFrame]:
    out = project / "out"
    return {n: pl.from_arrow(read_parquet(out / n / "predictions.parquet", "predictions")) for n in BENCHMARKS}


def test_interrupted_run_resumes_and_gives_the_same_answers(bench_project, monkeypatch):
    import shutil

    import pipeline.inference.evaluate as run

    real, calls = run.predict_batch, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and kill:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "predict_batch", counted)
    kill = True
    assert _run(bench_project).exit_code != 0
    assert len(list((bench_project / "work").rglob("part-*.parquet"))) == 2  # docvqa's two batches, not chartqa's
    calls.clear()
    kill = False
    res = _run(bench_project)
    assert res.exit_code == 0 and "docvqa: resuming, 2 finished batches" in res.output
    assert "chartqa: resuming" not in res.output and len(calls) == 2 * (len(BENCHMARKS) - 1)
    resumed = _predictions(bench_project)
    # the same run uninterrupted answers the same
    shutil.rmtree(bench_project / "work")
    assert _run(bench_project).exit_code == 0
    fresh = _predictions(bench_project)
    for name in BENCHMARKS:
        assert resumed[name].equals(fresh[name]), name
    # a rerun finds every batch done and answers nothing again
    calls.clear()
    assert _run(bench_project).exit_code == 0 and calls == []
    # other settings are another job: nothing reused
    params = yaml.safe_load((bench_project / "params.yaml").read_text())
    params["evaluate"]["roi"] = {"tau": 0.25}
    (bench_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _run(bench_project).exit_code == 0 and len(calls) == 2 * len(BENCHMARKS)


def test_no_benchmark_configured_writes_a_table_saying_so(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["path"] = str(tmp_path / "no-model-needed")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "rpn").mkdir()
    res = _run(tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "table.md").read_text().startswith("No benchmark configured")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {}


def test_qwen_answers_are_cut_at_the_tasks_stop_strings_as_lmms_eval_cuts_them():
    from pipeline.benchmarks.prompts import final_answer

    # lmms-eval's qwen2_5_vl splits at each `until` string; its llava keeps the text as generated
    assert final_answer("vstar", "qwen2_5_vl", "B\n\nbecause the cup is red") == "B"
    assert final_answer("vstar", "llava", "B\n\nbecause") == "B\n\nbecause"
    assert final_answer("textvqa", "qwen2_5_vl", "stop ASSISTANT: more\n\nx") == "stop "  # its YAML's own until
    assert final_answer("textvqa", "qwen2_5_vl", "a\n\nb") == "a\n\nb"


def test_stage_on_a_tiny_qwen(tmp_path, monkeypatch):
    """The same stage on a Qwen2.5-VL: its family's prompts reach the model and its answers are cut as lmms-eval's."""
    import pipeline.inference.evaluate as run
    from pipeline.models import wrap_model
    from tests.conftest import WORDS
    from toymodels.qwen import build_toy_qwen, save_toy_qwen

    model, processor = build_toy_qwen(WORDS, seed=0)
    save_toy_qwen(model, processor, tmp_path / "qwen")
    RPN.from_base(wrap_model(model, processor, "toy-qwen"), B=1, R=1).save(tmp_path / "rpn")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(tmp_path / "qwen"), device="cpu", dtype="float32")
    params["evaluate"].update(modes=["masked"])
    sets = {
        n: {"path": str(write_fixture(n, FIXTURE_FORMATS[n][0], tmp_path / "data", n=3))} for n in ("textvqa", "vstar")
    }
    params["benchmarks"].update(sets=sets, batch_size=3, max_new_tokens=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seen: list[tuple[str, str]] = []
    real = run.predict_batch

    def spy(adapter, batch, *args, **kwargs):
        assert adapter.family == "qwen2_5_vl"
        seen.extend((r["source"], r["question"]) for r in batch)
        rows = real(adapter, batch, *args, **kwargs)
        # a stop string in every answer: what follows it must not be scored
        return [{**r, "response": "A\n\n" + r["response"]} for r in rows]

    monkeypatch.setattr(run, "predict_batch", spy)
    res = _run(tmp_path)
    assert res.exit_code == 0, res.output
    vstar = read_parquet(tmp_path / "out" / "vstar" / "manifest.parquet", "benchmark_manifest").to_pylist()
    assert [q for src, q in seen if src == "vstar"] == [build_prompt("vstar", d, "qwen2_5_vl") for d in vstar]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    letters_a = sum(d["answer"] == "A" for d in vstar)
    assert metrics["vstar"]["baseline"]["score"] == pytest.approx(100 * letters_a / len(vstar))
