"""`sdrpn select-heads` end to end on the tiny LLaVA, Qwen2.5-VL and DeepSeek-VL test models, and the preset it
writes going back into `label` through `label.preset_file`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.io.attention_store import open_attention_store
from pipeline.io.contracts import write_parquet
from pipeline.io.manifest import build_manifest, records_from_table
from stages.cli import main
from stages.label import label_params
from tests.conftest import WORDS
from tests.dvc_project import ROOT, write_records


def _toy(family: str, path: Path) -> None:
    if family == "llava":
        from toymodels.llava import build_toy_llava, save_toy_llava

        model, processor = build_toy_llava(WORDS, seed=0)
        # the untrained toy may emit <image>, which a teacher-forced pass would take for an image (the other toys
        # suppress their image tokens; real checkpoints never emit them)
        model.generation_config.suppress_tokens = [model.config.image_token_id]
        save_toy_llava(model, processor, path)
    elif family == "qwen":
        from toymodels.qwen import build_toy_qwen, save_toy_qwen

        save_toy_qwen(*build_toy_qwen(WORDS, seed=0), path)
    else:
        from toymodels.deepseek import build_toy_deepseek, save_toy_deepseek

        save_toy_deepseek(*build_toy_deepseek(WORDS, seed=0), path)


def _run(*argv: str) -> str:
    res = CliRunner().invoke(main, [*argv, "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module", params=["llava", "qwen", "deepseek"])
def project(request, tmp_path_factory) -> tuple[Path, Path]:
    proj = tmp_path_factory.mktemp(f"select-{request.param}")
    _toy(request.param, proj / "model")
    write_records(proj / "data" / "records.jsonl", 6, seed=4)
    table, _ = build_manifest(records_from_table(proj / "data" / "records.jsonl"))
    write_parquet(table, proj / "manifest.parquet", "manifest")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(proj / "model"), device="cpu", dtype="float32")
    if request.param == "qwen":
        params["model"]["resolution"] = {"mode": "native", "min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}
    params["decode"].update(batch_size=3, max_new_tokens=3)
    params["dump"].update(layers=[1])
    params["select_heads"].update(n_samples=5, batch_size=2, top_k=3, bootstrap=50)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    common = ("--params", str(proj / "params.yaml"))
    responses = str(proj / "responses.parquet")
    _run("decode", str(proj / "manifest.parquet"), responses, "--work-dir", str(proj / "w"), *common)
    out = proj / "selection"
    _run(
        "select-heads", str(proj / "manifest.parquet"), str(proj / "responses.parquet"), str(out),
        "--work-dir", str(proj / "w"), *common,
    )  # fmt: skip
    return proj, out


def test_outputs_name_heads_the_model_has_and_score_every_head(project):
    proj, out = project
    preset = yaml.safe_load((out / "preset.yaml").read_text())
    sel = json.loads((out / "selection.json").read_text())
    assert sel["n_samples"] == 5 and sel["preset"] == json.loads(json.dumps(preset))
    assert preset["heads"] and all(int(k) in range(4) and set(hs) <= {0, 1, 2, 3} for k, hs in preset["heads"].items())
    assert sel["dump"]["per_head"] is True and set(sel["dump"]["layers"]) >= {int(x) for x in preset["heads"]}
    kept = [t for t in sel["greedy"] if t["kept"]]
    chosen = sorted((int(k), h) for k, hs in preset["heads"].items() for h in hs)
    assert sorted((t["layer"], t["head"]) for t in kept) == chosen
    precisions = [t["fg_precision"] for t in kept]
    assert precisions == sorted(precisions)  # each head kept raised the combination's precision
    assert sel["label_fg_precision"] == pytest.approx(precisions[-1])
    report = (out / "report.md").read_text()
    assert "## Chosen preset" in report and report.count("\n| ") >= 4 * 4  # every layer, the top heads, the trace
    heat = Image.open(out / "heatmap.png")
    assert heat.size[0] > 4 * 14 and heat.size[1] > 4 * 14  # 4 layers x 4 heads of 14 px cells and the margins
    store = open_attention_store(next((proj / "w").glob("select-*.zarr")))
    assert store.layers == [0, 1, 2, 3] and store.heads == [0, 1, 2, 3] and len(store) == 5


def test_a_rerun_reuses_the_dump_and_writes_the_same_preset(project):
    proj, out = project
    before = (out / "preset.yaml").read_text()
    stores = sorted((proj / "w").glob("select-*.zarr"))
    output = _run(
        "select-heads", str(proj / "manifest.parquet"), str(proj / "responses.parquet"), str(out),
        "--work-dir", str(proj / "w"), "--params", str(proj / "params.yaml"),
    )  # fmt: skip
    assert "dumping" not in output and sorted((proj / "w").glob("select-*.zarr")) == stores
    assert (out / "preset.yaml").read_text() == before


def test_label_reads_the_proposed_preset_through_preset_file(project):
    proj, out = project
    preset = yaml.safe_load((out / "preset.yaml").read_text())
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["dump"].update(layers=sorted({int(k) for k in preset["heads"]} | {preset.get("sink_norm_layer", 0)}))
    params["dump"]["per_head"] = True
    params["label"]["preset_file"] = str(out / "preset.yaml")
    path = proj / "params-preset.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    got = label_params(path)
    assert got.heads == {int(k): v for k, v in preset["heads"].items()}
    assert got.sink_method == preset["sink_method"]
    params["label"]["sink_method"] = "none"  # an explicit key still wins over the file
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert label_params(path).sink_method == "none"
    params["label"]["preset_file"] = str(proj / "nope.yaml")
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(Exception, match="label.preset_file: cannot read"):
        label_params(path)


def test_bad_preset_file_keys_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("heads: {1: [0]}\nsink_metod: none\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["label"]["preset_file"] = str(bad)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(Exception, match=r"label.preset_file: .*p.yaml: unknown key\(s\) \['sink_metod'\]"):
        label_params(path)
