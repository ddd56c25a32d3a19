"""Faults: impossible params fail at once, naming ``section.key`` and the value, before any model loads; prompts past
the model's context are skipped with a recorded reason, never answered with nonsense (issue 15, defects 5 and 8)."""

from __future__ import annotations

import math
from pathlib import Path

import click
import pyarrow as pa
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.config import ModelParams, parse_section
from pipeline.inference.evaluate import evaluate_manifest
from pipeline.inference.params import EvalParams
from pipeline.inference.roi import RoIParams
from pipeline.inference.two_stage import two_stage_batch
from pipeline.io.attention_store import open_attention_store
from pipeline.io.contracts import read_parquet, write_parquet
from pipeline.io.manifest import MANIFEST_COLUMNS
from pipeline.io.resumable import PartStore
from pipeline.models import resolve_dtype, wrap_model
from pipeline.student.rpn import RPN
from pipeline.teacher.decode import RESPONSE_COLUMNS, decode_batch, decode_manifest
from pipeline.teacher.params import DecodeParams, DumpParams
from pipeline.world.generator import WorldSection
from stages.cli import main
from stages.evaluate_params import eval_params
from stages.label import label_params
from stages.params import section
from stages.train import train_params
from tests.conftest import WORDS, random_images
from toymodels.llava import ToyLlavaSizes, build_toy_llava

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "world": WorldSection,
    "model": ModelParams,
    "decode": DecodeParams,
    "dump": DumpParams,
}
SHORT = "what is in the red box ?"
CONTEXT = 2048  # the conftest toy LLaVA's max_position_embeddings
VISUAL = 16  # its 4 x 4 visual tokens
TEMPLATE = 4  # "USER :" and "ASSISTANT :" around the image and the question
HUGE = " ".join(["a"] * 5000)  # the 10,000-character question: 5,000 tokens for the toy's tokenizer
N_HUGE = 5000 + VISUAL + TEMPLATE


def _params(tmp_path: Path, edit=None, **top) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in top.items():
        data[name].update(values)
    if edit is not None:
        edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _parse(path: Path, name: str) -> None:
    """Parse section ``name`` as the stages do (label checked against dump; evaluate derived from label and dump)."""
    name = name.partition(".")[0]
    if name == "label":
        label_params(path)
    elif name == "evaluate":
        eval_params(path)
    elif name == "train":
        train_params(path)
    else:
        section(path, name, SECTIONS[name])


def _set(name: str, key: str, value):
    """An edit of params.yaml: ``name.key = value`` (``name`` may be dotted: world.generator)."""

    def edit(data):
        target = data
        for part in name.split("."):
            target = target[part]
        target[key] = value

    return edit


# (section, key, value, exact message after "params.yaml: ")
BAD = [
    # decode
    ("decode", "batch_size", 0, "decode.batch_size: must be >= 1 (got 0)"),
    ("decode", "batch_size", -1, "decode.batch_size: must be >= 1 (got -1)"),
    ("decode", "max_new_tokens", 0, "decode.max_new_tokens: must be >= 1 (got 0)"),
    # dump
    ("dump", "batch_size", 0, "dump.batch_size: must be >= 1 (got 0)"),
    ("dump", "chunk_samples", 0, "dump.chunk_samples: must be >= 1 (got 0)"),
    ("dump", "layers", [3, 3], "dump.layers: decoder layer indices must be distinct; [3] repeated (got [3, 3])"),
    ("dump", "layers", [-1, 3], "dump.layers: decoder layer indices must be integers >= 0 (got [-1, 3])"),
    ("dump", "layers", [], "dump.layers: must be a non-empty list of decoder layer indices (got [])"),
    # model
    (
        "model",
        "dtype",
        "fp8",
        "model.dtype: unknown dtype 'fp8'; valid: ['auto', 'float32', 'bfloat16', 'float16'] "
        "(aliases: fp32=float32, float=float32, fp16=float16, half=float16, bf16=bfloat16)",
    ),
    ("model", "device", "gpu", "model.device: must be one of ['auto', 'cpu', 'cuda', 'mps'] or cuda:N (got 'gpu')"),
    ("model", "path", " ", "model.path: name the local checkpoint directory (got an empty path)"),
    ("model", "resolution", {"mode": "fixed"}, "model.resolution.size: mode 'fixed' needs a positive size (e.g. 672)"),
    (
        "model",
        "resolution",
        {"mode": "fixed", "size": 0},
        "model.resolution.size: must be a whole number of pixels >= 1 (got 0)",
    ),
    (
        "model",
        "resolution",
        {"mode": "native", "min_pixels": 5000, "max_pixels": 4000},
        "model.resolution.min_pixels: must be <= max_pixels 4000 (got 5000)",
    ),
    (
        "model",
        "resolution",
        {"mode": "tiled"},
        "model.resolution.mode: must be one of ['native', 'fixed'] (got 'tiled')",
    ),
    # label
    ("label", "tau_bg", 0.5, "label.tau_bg: must be <= tau_fg (0.2) (got 0.5)"),
    ("label", "tau_fg", -0.1, "label.tau_fg: must lie in [0, 1] (got -0.1)"),
    ("label", "max_box_frac", 0, "label.max_box_frac: must lie in (0, 1] (got 0.0)"),
    ("label", "min_a_max", -1, "label.min_a_max: must be >= 0 (got -1.0)"),
    ("label", "sink_norm_factor", -1, "label.sink_norm_factor: must be >= 0 (got -1.0)"),
    ("label", "sink_attn_threshold", -0.1, "label.sink_attn_threshold: must be >= 0 (got -0.1)"),
    ("label", "sink_norm_layer", -2, "label.sink_norm_layer: must be >= 0 (got -2)"),
    ("label", "layers", [3, 3], "label.layers: layer indices must be distinct; [3] repeated (got [3, 3])"),
    (
        "label",
        "sink_attn_heads",
        [1, 1],
        "label.sink_attn_heads: head indices must be distinct; [1] repeated (got [1, 1])",
    ),
    ("label", "heads", {3: []}, "label.heads.3: must be a non-empty list of head indices (got [])"),
    ("label", "sink_method", "max", "label.sink_method: must be one of ['norm', 'attention', 'none'] (got 'max')"),
    # train
    ("train", "lr", 0, "train.lr: must be a finite number > 0 (got 0.0)"),
    ("train", "lr", float("nan"), "train.lr: must be a finite number > 0 (got nan)"),
    ("train", "B", -1, "train.B: must be >= 0 (got -1)"),
    ("train", "R", 0, "train.R: must be >= 1 (got 0)"),
    ("train", "betas", [0.9, 1.5], "train.betas: must be two numbers in [0, 1) (got [0.9, 1.5])"),
    ("train", "epochs", 0, "train.epochs: must be >= 1 (got 0)"),
    ("train", "micro_batch", 0, "train.micro_batch: must be >= 1 (got 0)"),
    ("train", "holdout_frac", 1.0, "train.holdout_frac: must lie in [0, 1) (got 1.0)"),
    ("train", "warmup_frac", -0.1, "train.warmup_frac: must lie in [0, 1) (got -0.1)"),
    ("train", "weight_decay", -1, "train.weight_decay: must be >= 0 (got -1.0)"),
    ("train", "grad_clip", 0, "train.grad_clip: must be a finite number > 0 (got 0.0)"),
    ("train", "seed", -1, "train.seed: must be >= 0 (got -1)"),
    ("train", "save_every", 0, "train.save_every: must be >= 1 (got 0)"),
    ("train", "log_every", -1, "train.log_every: must be >= 0 (got -1)"),
    # evaluate
    ("evaluate", "batch_size", 0, "evaluate.batch_size: must be >= 1 (got 0)"),
    ("evaluate", "max_new_tokens", -1, "evaluate.max_new_tokens: must be >= 1 (got -1)"),
    (
        "evaluate",
        "modes",
        ["masked", "masked"],
        "evaluate.modes: name each upscaling mode (masked, box) once (got ['masked', 'masked'])",
    ),
    ("evaluate", "roi", {"tau": 1.5}, "evaluate.roi.tau: must lie in [0, 1] (got 1.5)"),
    ("evaluate", "roi", {"smooth_size": 2}, "evaluate.roi.smooth_size: must be a positive odd number (got 2)"),
    ("evaluate", "roi", {"max_area": 0}, "evaluate.roi.max_area: must be >= 1 (got 0)"),
    ("evaluate", "roi", {"mode": "box"}, "evaluate.roi.mode: is set per method by evaluate (modes); remove it"),
    ("evaluate", "raw_attention_tau", 2, "evaluate.raw_attention_tau: must lie in [0, 1] (got 2.0)"),
    ("evaluate", "crop_size", 0, "evaluate.crop_size: must be >= 1 (got 0)"),
    # world
    ("world", "n_train", 0, "world.n_train: must be >= 1 (got 0)"),
    ("world", "seed_eval", 1001, "world.seed_eval: must differ from seed_train (both 1001): the splits would overlap"),
    ("world", "seed_train", -5, "world.seed_train: must be >= 0 (got -5)"),
    ("world", "eval_dir", "artifacts/world/train", "world.eval_dir: train_dir and eval_dir must be two different "
     "folders (got 'artifacts/world/train', 'artifacts/world/train')"),
    ("world.generator", "tint", 1.5, "world.generator.tint: must lie in [0, 1] (got 1.5)"),
    ("world.generator", "max_frames", 2, "world.generator.max_frames: must be >= min_frames 3 (got 2)"),
    ("world.generator", "canvas", 450, "world.generator.canvas: must be a multiple of grid 14 (got 450)"),
    ("world.generator", "texture_px", 11, "world.generator.texture_px: must be even, so 2x2 tiles stay on the base "
     "view's pixels (got 11)"),
    ("world.generator", "glyph_style", "fancy", "world.generator.glyph_style: must be one of ['texture', 'checker', "
     "'solid'] (got 'fancy')"),
    ("world.generator", "glyph_contrast", [100, 60], "world.generator.glyph_contrast: must be a pair (min, max) with "
     "0 <= min <= max (got (100, 60))"),
    ("world.generator", "colours", ["red", "red"], "world.generator.colours: must name distinct frame colours of "
     "['red', 'green', 'blue', 'yellow', 'orange', 'purple', 'cyan', 'pink'] (got ['red', 'red'])"),
    ("world.generator", "frame_cells", [0, 3], "world.generator.frame_cells: must list frame sides in cells, each in "
     "[1, 14] (got (0, 3))"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "key", "value", "message"), BAD, ids=[f"{n}.{k}={v}" for n, k, v, _ in BAD])
def test_bad_value_names_section_key_and_value(tmp_path, name, key, value, message):
    path = _params(tmp_path, _set(name, key, value))
    with pytest.raises(click.UsageError) as err:
        _parse(path, name)
    assert err.value.message == f"{path}: {message}"


@pytest.mark.parametrize(
    ("alias", "name"),
    [("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"), ("float", "float32")],
)
def test_common_dtype_aliases_are_taken_and_recorded_by_their_name(tmp_path, alias, name):
    from pipeline.config import canonical_dtype

    assert section(_params(tmp_path, model={"dtype": alias}), "model", ModelParams).dtype == name
    assert canonical_dtype(alias.upper()) == name
    assert resolve_dtype(alias, torch.device("cpu")) == getattr(torch, name)  # the Python API takes them too


# --- stages fail before any model loads, leaving nothing behind ---------------------------------------------------


def _dummy_inputs(tmp_path: Path) -> dict[str, Path]:
    """Input paths that exist: a stage must refuse its params before it reads any of them."""
    (tmp_path / "in").mkdir()
    paths = {n: tmp_path / "in" / n for n in ("manifest.parquet", "responses.parquet", "labels.parquet")}
    for p in paths.values():
        p.write_bytes(b"not read")
    for d in ("store.zarr", "rpn"):
        paths[d] = tmp_path / "in" / d
        paths[d].mkdir()
    return paths


def _argv(stage: str, i: dict[str, Path], out: Path) -> list[str]:
    m, work = str(i["manifest.parquet"]), ["--work-dir", str(out / "work")]
    return {
        "decode": ["decode", m, str(out / "responses.parquet"), *work],
        "dump": ["dump", m, str(i["responses.parquet"]), str(out / "store.zarr"), *work],
        "train": ["train", m, str(i["labels.parquet"]), str(out / "rpn"), "--metrics", str(out / "m.json"), "--plots",
                  str(out / "p.csv"), *work],
        "evaluate": ["evaluate", m, str(i["rpn"]), str(out / "pred.parquet"), "--metrics", str(out / "m.json"),
                     "--plots", str(out / "p.csv")],
        "label-report": ["label-report", m, str(i["store.zarr"]), str(out / "m.json"), str(out / "fig3.tsv")],
        "inspect": ["inspect", "s0", "--out-dir", str(out / "inspect"), "--manifest", m, "--store",
                    str(i["store.zarr"]), "--rpn", str(i["rpn"])],
    }[stage]  # fmt: skip


STAGE_CASES = [
    ("decode", _set("decode", "batch_size", 0), "decode.batch_size: must be >= 1 (got 0)"),
    ("decode", _set("model", "dtype", "fp8"), "model.dtype: unknown dtype 'fp8'"),
    ("dump", _set("dump", "batch_size", 0), "dump.batch_size: must be >= 1 (got 0)"),
    ("dump", _set("dump", "layers", [3, 3]), "dump.layers: decoder layer indices must be distinct; [3] repeated"),
    # needs the model: the toy has 4 decoder layers, read from its config without loading weights
    ("dump", _set("dump", "layers", [3, 9]), "dump.layers: layer(s) [9] past the model's 4 decoder layers 0..3"),
    ("train", _set("train", "B", 3), "train.B/train.R: the RPN copies layers B..B+R-1 = 3..4, past the model's 4"),
    ("train", _set("train", "micro_batch", 0), "train.micro_batch: must be >= 1 (got 0)"),
    ("evaluate", _set("label", "tau_bg", 0.5), "label.tau_bg: must be <= tau_fg (0.2) (got 0.5)"),
    ("evaluate", _set("evaluate", "crop_size", 20), "evaluate.crop_size: must be a positive multiple of the patch "
     "size 16 (got 20)"),
    ("evaluate", _set("evaluate", "roi", {"tau": 2}), "evaluate.roi.tau: must lie in [0, 1] (got 2.0)"),
    ("label-report", _set("label", "tau_bg", 0.5), "label.tau_bg: must be <= tau_fg (0.2) (got 0.5)"),
    ("inspect", _set("label", "max_box_frac", 0), "label.max_box_frac: must lie in (0, 1] (got 0.0)"),
    ("inspect", _set("evaluate", "crop_size", 20), "evaluate.crop_size: must be a positive multiple of the patch"),
]  # fmt: skip
if not torch.cuda.is_available():
    STAGE_CASES.append(("decode", _set("model", "device", "cuda"), "model.device: 'cuda', but torch sees 0 CUDA"))


@pytest.mark.parametrize(("stage", "edit", "message"), STAGE_CASES, ids=[f"{s}-{m[:40]}" for s, _, m in STAGE_CASES])
def test_stage_refuses_bad_params_before_loading_the_model(tmp_path, toy_dir, monkeypatch, stage, edit, message):
    import stages.decode
    import stages.dump
    import stages.evaluate
    import stages.train

    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    for module in (stages.decode, stages.dump, stages.evaluate, stages.train):
        monkeypatch.setattr(module, "load_adapter", no_loading)
    model = {"path": str(toy_dir), "device": "cpu"}
    path = _params(tmp_path, edit, model=model, train={"B": 1, "R": 2})
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [*_argv(stage, _dummy_inputs(tmp_path), out), "--params", str(path)])
    assert res.exit_code == 2, res.output
    assert message in res.output and str(path) in res.output
    # no work dir, no output, nothing half-made: at most the lock files the stage took on its outputs
    made = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert all(p.name.startswith(".") and p.name.endswith(".lock") for p in made), made


# --- prompts past the model's context ------------------------------------------------------------------------


def _manifest(tmp_path: Path, questions: list[str], images: bool = True) -> pa.Table:
    """A manifest of one sample per question, 64 x 64 images on disk (the long ones' images are never read)."""
    rows = []
    for i, (q, im) in enumerate(zip(questions, random_images(len(questions)), strict=True)):
        ref = tmp_path / f"{i}.png"
        im.resize((64, 64)).save(ref)
        rows.append({"sample_id": f"s{i}", "image": str(ref), "question": q, "answer": "a", "width": 64, "height": 64})
        rows[-1].update(source="unit", box_x0=0.0, box_y0=0.0, box_x1=16.0, box_y1=16.0)
    return pa.Table.from_pylist(rows, schema=MANIFEST_COLUMNS)


def _words(n_tokens: int) -> str:
    """A question of ``n_tokens`` tokens (one per word for the toy's word-level tokenizer)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))


def _reason(n_prompt: int, n_new: int, what: str = "new tokens", limit: int = CONTEXT) -> str:
    return (
        f"prompt past the model's context: {n_prompt} prompt tokens + {n_new} {what} > {limit} "
        "(max_position_embeddings)"
    )


@pytest.fixture(scope="module")
def toy40():
    """A toy LLaVA built for 40 positions: boundaries of the rule at a cheap length."""
    model, processor = build_toy_llava(WORDS, ToyLlavaSizes(max_position_embeddings=40), seed=0)
    return wrap_model(model, processor, "toy40")


def test_prompt_lengths_count_what_the_batch_holds(adapter):
    """The rule counts tokens without building a batch; it must count what build_batch makes (LLaVA and Qwen)."""
    from toymodels.qwen import build_toy_qwen

    questions = [SHORT, _words(300), ""]
    images = random_images(3)
    sizes = [im.size for im in images]
    qwen = build_toy_qwen(WORDS, seed=0)
    for a in (adapter, wrap_model(*qwen, "q"), wrap_model(*qwen, "q", resolution={"mode": "fixed", "size": 112})):
        batch = a.build_batch(images, [a.render_prompt(q) for q in questions])
        assert a.prompt_lengths(questions, sizes) == batch.prompt_len.tolist()
    assert adapter.context_length == CONTEXT and wrap_model(*qwen, "q").context_length == 4096


def test_decode_skips_the_10000_character_question(adapter, tmp_path):
    """The issue's question, past the toy's 2048 positions: skipped with its reason, its image never read."""
    manifest = _manifest(tmp_path, [SHORT, HUGE])
    manifest = manifest.set_column(1, "image", pa.array([manifest["image"][0].as_py(), "missing.png"]))
    parts = PartStore(tmp_path / "work", "decode", "k")
    table = decode_manifest(adapter, manifest, DecodeParams(batch_size=2, max_new_tokens=8), parts, progress=False)
    rows = table.to_pylist()
    assert len(HUGE) == 9999 and rows[1]["skip_reason"] == _reason(N_HUGE, 8)
    assert (rows[1]["response"], rows[1]["response_token_ids"], rows[1]["finish_reason"]) == ("", [], "skipped")
    image = random_images(2)[0].resize((64, 64))  # the other sample answers as it would alone
    assert rows[0]["skip_reason"] is None
    assert rows[0]["response_token_ids"] == decode_batch(adapter, [image], [SHORT], 8)[0]["response_token_ids"]


def test_decode_rule_is_prompt_plus_max_new_tokens_within_the_context(toy40, tmp_path):
    """A prompt that just fits with max_new_tokens is decoded; one token more is skipped (nothing generated)."""
    new, limit = 4, 40
    fits = _words(limit - new - VISUAL - TEMPLATE)
    over = _words(limit - new - VISUAL - TEMPLATE + 1)
    manifest = _manifest(tmp_path, [fits, over])
    parts = PartStore(tmp_path / "work", "decode", "k")
    table = decode_manifest(toy40, manifest, DecodeParams(batch_size=2, max_new_tokens=new), parts, progress=False)
    rows = table.to_pylist()
    assert [r["sample_id"] for r in rows] == ["s0", "s1"]
    assert rows[0]["skip_reason"] is None and rows[0]["finish_reason"] in ("eos", "length")
    assert rows[1]["skip_reason"] == _reason(limit - new + 1, new, limit=limit)
    assert (rows[1]["response"], rows[1]["response_token_ids"], rows[1]["finish_reason"]) == ("", [], "skipped")


def test_dump_leaves_out_what_decode_skipped_and_responses_past_the_context(adapter, tmp_path):
    from pipeline.teacher.dump import select_samples

    manifest = _manifest(tmp_path, [SHORT, _words(3000), SHORT])
    rows = [
        {"sample_id": "s0", "response_token_ids": [5, 3], "finish_reason": "eos"},
        {"sample_id": "s1", "response_token_ids": [], "finish_reason": "skipped", "skip_reason": _reason(3021, 8)},
        # made with another context: prompt + response no longer fits
        {"sample_id": "s2", "response_token_ids": [5] * CONTEXT, "finish_reason": "length"},
    ]
    responses = pa.Table.from_pylist(
        [{"prompt": "p", "response": "r", "model_id": "toy", **r} for r in rows], schema=RESPONSE_COLUMNS
    )
    kept, skipped = select_samples(adapter, manifest, responses)
    assert kept.column("sample_id").to_pylist() == ["s0"]
    assert skipped == {"s1": f"decode: {_reason(3021, 8)}", "s2": _reason(VISUAL + 11, CONTEXT, "response tokens")}


def test_decode_and_dump_stages_record_the_skip(tmp_path, toy_dir):
    """End to end through the CLI: decode records the skip, dump leaves the sample out and says so in its attrs."""
    manifest = _manifest(tmp_path, [SHORT, HUGE])
    write_parquet(manifest, tmp_path / "manifest.parquet", "manifest")
    params = _params(tmp_path, model={"path": str(toy_dir), "device": "cpu"}, dump={"layers": [1]})
    common = ["--params", str(params), "--work-dir", str(tmp_path / "work"), "--no-progress"]
    runner = CliRunner()
    res = runner.invoke(main, ["decode", str(tmp_path / "manifest.parquet"), str(tmp_path / "r.parquet"), *common])
    assert res.exit_code == 0, res.output
    assert f"decode: skipped s1: {_reason(N_HUGE, 8)}" in res.output
    responses = read_parquet(tmp_path / "r.parquet", "responses")
    assert responses.column("skip_reason").to_pylist() == [None, _reason(N_HUGE, 8)]
    argv = ["dump", str(tmp_path / "manifest.parquet"), str(tmp_path / "r.parquet"), str(tmp_path / "a.zarr")]
    res = runner.invoke(main, [*argv, *common])
    assert res.exit_code == 0, res.output
    store = open_attention_store(tmp_path / "a.zarr")
    assert list(store.sample_ids) == ["s0"]
    assert store.attrs["skipped"] == {"s1": f"decode: {_reason(N_HUGE, 8)}"}


def test_evaluate_records_skipped_samples_for_every_method(adapter, tmp_path):
    manifest = _manifest(tmp_path, [SHORT, HUGE, SHORT])
    images = manifest.column("image").to_pylist()
    manifest = manifest.set_column(1, "image", pa.array([images[0], "missing.png", images[2]]))  # s1's is never read
    rpn = RPN.from_base(adapter, B=1, R=1).eval()
    params = EvalParams(batch_size=2, max_new_tokens=3, raw_attention=False, modes=["masked"])
    table, metrics = evaluate_manifest(adapter, manifest, {"sdrpn": rpn}, params, progress=False)
    methods = ["baseline", "sdrpn_masked"]
    assert table.num_rows == 3 * len(methods)
    for r in table.to_pylist():
        if r["sample_id"] == "s1":
            assert r["skip_reason"] == _reason(N_HUGE, 3)
            assert (r["response"], r["score"], r["found"], r["crop_boxes"]) == ("", 0.0, False, [])
        else:
            assert r["skip_reason"] is None
    for m in methods:
        assert metrics[m]["n"] == 3 and metrics[m]["n_skipped"] == 1
        assert not math.isnan(metrics[m]["accuracy"])


def test_stage_two_past_the_context_answers_from_the_original_view(toy40):
    """Crops that would push stage 2 past the context are dropped (the baseline's answer), and the row says so."""
    small = toy40
    images = random_images(1)
    whole = [torch.ones(4, 4).numpy()]  # every token: one crop of 16 tokens on top of a 27-token prompt
    rows, rois = two_stage_batch(small, images, [SHORT], whole, RoIParams(smooth_sigma=0.0, tau=0.5), 4)
    assert rois[0].found and rows[0]["crop_boxes"] == [] and rows[0]["n_crop_tokens"] == 0
    assert rows[0]["skip_reason"] == (
        "stage 2 past the model's context: 43 tokens with crops + 4 new tokens > 40 (max_position_embeddings); "
        "answered from the original view, crops dropped"
    )
    assert rows[0]["response_token_ids"] == decode_batch(small, images, [SHORT], 4)[0]["response_token_ids"]


def test_parse_section_names_nested_keys():
    """A FieldError raised inside a nested dataclass (world.generator) names the whole path."""
    with pytest.raises(ValueError, match=r"^world\.generator\.noise_std: must be >= 0 \(got -1\.0\)$"):
        parse_section(WorldSection, {"generator": {"noise_std": -1}}, "world")
