"""params.yaml parses into typed sections; a missing, unknown, mistyped or impossible key fails naming it."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import ModelParams, ParamsError, parse_section
from pipeline.inference.params import EvalParams
from pipeline.io.manifest import PrepareParams
from pipeline.student.params import TrainParams, resolve_train_params
from pipeline.teacher.params import DecodeParams, DumpParams
from pipeline.world.generator import WorldParams, WorldSection
from stages.evaluate_params import eval_params
from stages.label import label_params
from stages.params import section
from stages.train import train_params

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "world": WorldSection,
    "model": ModelParams,
    "prepare": PrepareParams,
    "prepare_eval": PrepareParams,
    "decode": DecodeParams,
    "dump": DumpParams,
}


def _params(tmp_path: Path, edit=None) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    if edit is not None:
        edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _every_section(path: Path) -> None:
    for name, cls in SECTIONS.items():
        section(path, name, cls)
    train_params(path)
    label_params(path)
    eval_params(path)


def test_shipped_params_parse_with_the_values_written(tmp_path):
    path = _params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    _every_section(path)
    assert train_params(path).lr == raw["train"]["lr"] == 1e-3
    assert train_params(path).betas == (0.9, 0.98)  # YAML list -> tuple
    assert section(path, "world", WorldSection).generator == WorldParams()
    ev = eval_params(path)
    # derived: the raw-attention ablation reads the label map's layers and the rows the dump captured
    assert ev.raw_attention_layers == raw["dump"]["layers"]
    assert ev.raw_attention_last_prompt is raw["dump"]["include_last_prompt"]
    assert ev.roi == {"tau": raw["evaluate"]["roi"]["tau"]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["train"].pop("lr"), "train: missing key(s) ['lr']"),
        (lambda d: d["model"].pop("dtype"), "model: missing key(s) ['dtype']"),
        (lambda d: d["label"].pop("tau_bg"), "label: missing key(s) ['tau_bg']"),
        (lambda d: d["model"].update(devcie="cpu"), "model: unknown key(s) ['devcie']"),
        (lambda d: d["dump"].update(layer=[3]), "dump: unknown key(s) ['layer']"),
        (lambda d: d["world"]["generator"].update(canvass=500), "world.generator.canvass: unknown key"),
        (lambda d: d["model"].update(dtype="fp8"), "model.dtype: unknown dtype 'fp8'; valid: ['auto', 'float32'"),
        (lambda d: d["model"].update(device="gpu"), "model.device: must be one of ['auto', 'cpu', 'cuda', 'mps']"),
        (lambda d: d["train"].update(B="three"), "train.B: Input should be a valid integer"),
        (lambda d: d["train"].update(global_batch=0), "train.global_batch: must be >= 1 (got 0)"),
        (lambda d: d["train"].update(preset="deepseek"), "train.preset: unknown preset 'deepseek'"),
        (lambda d: d["train"].pop("preset"), "train: missing key(s) ['preset']"),
        (lambda d: d["label"].update(tau_fg=1.5), "label.tau_fg: must lie in [0, 1] (got 1.5)"),
        (lambda d: d["label"].update(preset="llava"), "label.preset: unknown preset 'llava'"),
        (lambda d: d["evaluate"].update(modes=["masked", "crop"]), "evaluate.modes.1: Input should be 'masked'"),
        (lambda d: d["evaluate"].update(roi={"taux": 0.2}), "evaluate.roi: unknown key(s) ['taux']"),
        (lambda d: d["evaluate"].update(scoring="anls"), "evaluate.scoring"),
        (lambda d: d["prepare"].update(format="csv"), "prepare.format"),
        (lambda d: d["decode"].update(max_new_tokens=0), "decode.max_new_tokens: must be >= 1 (got 0)"),
        # coupled keys: a label setting needing a layer or heads the dump did not store names both sides
        (lambda d: d["label"].update(layers=[5]), "name layer(s) [5] that dump.layers [3] does not store"),
        (lambda d: d["label"].update(sink_norm_layer=1), "name layer(s) [1] that dump.layers [3]"),
        (lambda d: d["label"].update(heads=[0, 2]), "but dump.per_head is false"),
        # derived keys cannot be set beside what they derive from
        (lambda d: d["evaluate"].update(raw_attention_layers=[3]), "evaluate.raw_attention_layers is derived from"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    path = _params(tmp_path, edit)
    with pytest.raises(click.UsageError) as err:
        _every_section(path)
    assert message in err.value.message
    assert str(path) in err.value.message


def test_label_layers_follow_per_layer_heads(tmp_path):
    def edit(d):
        d["dump"].update(layers=[2, 3, 4], per_head=True)
        d["label"].update(heads={3: [0, 1], 4: [2]})

    assert eval_params(_params(tmp_path, edit)).raw_attention_layers == [3, 4]


def test_parse_section_converts_and_refuses():
    p = parse_section(DumpParams, {"layers": [1, 2], "per_head": "true"}, "dump")
    assert p.layers == [1, 2] and p.per_head is True
    with pytest.raises(ParamsError, match=r"dump.layers: decoder layer indices must be distinct"):
        parse_section(DumpParams, {"layers": [1, 1]}, "dump")
    with pytest.raises(ParamsError, match=r"dump: expected a mapping"):
        parse_section(DumpParams, [1, 2], "dump")
    # the library defaults are the paper's; only the stages insist on every key
    assert parse_section(TrainParams, {}, "train") == TrainParams()
    assert EvalParams().roi == {}


def test_stage_cli_reports_the_key(tmp_path):
    from stages.cli import main

    path = _params(tmp_path, lambda d: d["world"].update(n_train="many"))
    res = CliRunner().invoke(main, ["world", str(tmp_path / "out"), "--params", str(path)])
    assert res.exit_code == 2
    assert "world.n_train: Input should be a valid integer" in res.output
    assert not (tmp_path / "out").exists()


def test_readme_params_examples_parse(tmp_path):
    """The README's real-checkpoint snippets, merged into the shipped params.yaml, give valid sections."""
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2, "README lost its params examples"
    for block in blocks:
        snippet = yaml.safe_load(block)

        def merge(d, snippet=snippet):
            for name, values in snippet.items():
                d[name].update(values)

        path = _params(tmp_path, merge)
        _every_section(path)


def test_train_preset_fills_what_is_null_and_explicit_keys_win(tmp_path):
    def deepseek(d):
        d["train"].update(preset="deepseek_vl_1_3b", B=None, R=None)

    p = train_params(_params(tmp_path, deepseek))
    assert (p.B, p.R) == (9, 3)  # the authors' DeepSeek-VL-1.3B RPN, K9T3
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert (p.lr, p.global_batch) == (raw["lr"], raw["global_batch"])  # not published for DeepSeek: kept

    def llava(d):
        d["train"].update(preset="llava_1_5_7b", B=None, lr=None, global_batch=None, R=2)

    p = train_params(_params(tmp_path, llava))
    assert (p.B, p.R, p.lr, p.global_batch) == (15, 2, 5e-5, 512)  # R set explicitly beats the preset's 3
    q = resolve_train_params({"preset": "qwen2_5_vl_7b"})
    assert (q.B, q.R, q.lr, q.global_batch, q.grad_clip) == (16, 3, 1e-4, 128, 1.0)
    assert resolve_train_params({"preset": "qwen2_5_vl_3b"}).B == 21
    assert resolve_train_params({}) == TrainParams()  # no preset: the library defaults
