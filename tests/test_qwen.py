"""Qwen2.5-VL through the teacher phase: inputs, M-RoPE positions, decode, attention capture, dump and label.

Tiny Qwen2.5-VL models are built in-process (2-layer windowed vision tower, 4-layer GQA decoder with
M-RoPE) and run on images of several aspect ratios, in native (per-sample grid) and fixed resolution.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from pipeline.config import ModelParams
from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.io.manifest import build_manifest, records_from_table
from pipeline.io.resumable import PartStore
from pipeline.models import load_adapter, wrap_model
from pipeline.models.qwen2_5_vl import Qwen25VLAdapter, Resolution
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import decode_batch, decode_manifest
from pipeline.teacher.dump import dump_attention, max_visual_tokens
from pipeline.teacher.labels import LabelParams, label_store
from pipeline.teacher.params import DecodeParams, DumpParams
from tests.conftest import WORDS
from toymodels.qwen import build_toy_qwen, save_toy_qwen

# (width, height): 1:1, 16:9, 9:16, 3:1
SIZES = [(84, 84), (160, 90), (90, 160), (168, 56)]
# merged grids (grid_h, grid_w) the toy budget (4 .. 36 merged tokens) gives them in native mode
NATIVE_GRIDS = [(3, 3), (3, 6), (6, 3), (2, 6)]
FIXED = {"mode": "fixed", "size": 112}  # 112 px / 28 = 4x4 merged tokens (the paper: 672 -> 24x24)
QUESTIONS = ["what is in the red box ?", "what is in the box ?", "a b c", "what colour is the shape ?"]
# fp32 on CPU, capture vs eager: only summation order differs (probabilities are ~1/seq_len)
ATOL = 1e-6


def aspect_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def toy_qwen():
    """(model, processor) of a tiny random Qwen2.5-VL: 4 heads / 2 kv heads, head_dim 16, mrope_section [2, 3, 3]."""
    model, processor = build_toy_qwen(WORDS, seed=0)
    model.set_attn_implementation("sdpa")
    return model, processor


@pytest.fixture(scope="module", params=["native", "fixed"])
def qwen(request, toy_qwen) -> Qwen25VLAdapter:
    model, processor = toy_qwen
    return wrap_model(model, processor, "toy-qwen", resolution=None if request.param == "native" else FIXED)


@pytest.fixture(scope="module")
def native(toy_qwen) -> Qwen25VLAdapter:
    return wrap_model(*toy_qwen, "toy-qwen")


def _expected_grids(adapter: Qwen25VLAdapter) -> list[tuple[int, int]]:
    return NATIVE_GRIDS if adapter.resolution.mode == "native" else [(4, 4)] * len(SIZES)


def _suppressed(adapter) -> list[int]:
    return list(adapter.model.generation_config.suppress_tokens or [])


# --- inputs and grids -----------------------------------------------------------------------------------


def test_prompt_is_qwen_chat_format(native):
    prompt = native.render_prompt("what is in the box ?")
    assert prompt.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is in the box ?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_per_sample_grids_and_visual_index(qwen):
    """grid_h * grid_w == image tokens == t*h*w / merge^2; visual_index walks the grid row-major."""
    batch = qwen.build_batch(aspect_images(), [qwen.render_prompt(q) for q in QUESTIONS])
    expected = _expected_grids(qwen)
    assert batch.grids == expected
    assert [qwen.visual_grid(w, h) for w, h in SIZES] == expected
    ids, types = batch.inputs["input_ids"], batch.inputs["mm_token_type_ids"]
    thw = batch.inputs["image_grid_thw"]
    n_vis = [gh * gw for gh, gw in expected]
    assert (thw.prod(-1) // qwen.merge**2).tolist() == n_vis
    assert (ids == qwen.image_token_id).sum(1).tolist() == n_vis
    assert torch.equal(types.bool(), ids == qwen.image_token_id)
    assert batch.visual_index.shape == (4, max(n_vis))
    assert batch.visual_valid.sum(1).tolist() == n_vis
    pos, _ = qwen.position_ids(batch)
    for i, (_, gw) in enumerate(expected):
        idx = batch.visual_index[i, : n_vis[i]]
        assert (ids[i, idx] == qwen.image_token_id).all()
        assert (batch.visual_index[i, n_vis[i] :] == 0).all()
        # the model's own M-RoPE positions: token j of the image sits at row j // gw, column j % gw
        t, h, w = pos[:, i, idx]
        start = int(t[0])
        j = torch.arange(n_vis[i])
        assert (t == start).all()
        assert torch.equal(h - start, j // gw) and torch.equal(w - start, j % gw)


def test_fixed_resolution_resizes_every_image_to_the_view(toy_qwen):
    paper = wrap_model(*toy_qwen, "toy-qwen", resolution={"mode": "fixed", "size": 672})
    assert {paper.visual_grid(w, h) for w, h in SIZES} == {(24, 24)}
    enc = paper.encode_images(aspect_images()[:2])
    assert enc["image_grid_thw"].tolist() == [[1, 48, 48]] * 2  # 48x48 patches -> 24x24 merged tokens


def test_grid_boxes_map_to_source_pixels(qwen):
    """Both modes stretch the whole image over the grid: the full grid is the full image, token boxes tile it."""
    for (w, h), (gh, gw) in zip(SIZES, _expected_grids(qwen), strict=True):
        assert qwen.source_box((0, 0, gh - 1, gw - 1), w, h) == (0, 0, w, h)
        box = qwen.source_box((1, 1, 1, 1), w, h)
        assert qwen.grid_box(box, w, h) is not None
        y0, x0, y1, x1 = qwen.grid_box(box, w, h)
        assert y0 <= 1 <= y1 and x0 <= 1 <= x1


def test_resolution_option_is_validated(toy_qwen):
    for bad in (
        {"mode": "tiled"},
        {"mode": "fixed"},
        {"mode": "native", "size": 672},
        {"mode": "fixed", "size": 100},  # not a multiple of 28
        {"mode": "fixed", "size": 672, "typo": 1},
    ):
        with pytest.raises(ValueError):
            wrap_model(*toy_qwen, "toy-qwen", resolution=bad)
    native = wrap_model(*toy_qwen, "toy-qwen", resolution={"mode": "native", "max_pixels": 4 * 28 * 28})
    assert native.visual_grid(1000, 1000) == (2, 2)
    assert Resolution.parse(None) == Resolution()


# --- positions: mm_token_type_ids ----------------------------------------------------------------------


def test_mm_token_type_ids_gives_3d_positions_and_omitting_it_falls_back_to_1d(native):
    """Without mm_token_type_ids transformers 5 silently uses 1-D positions: the logits change."""
    model = native.model
    batch = native.build_batch(aspect_images(), [native.render_prompt(q) for q in QUESTIONS])
    pos, deltas = native.position_ids(batch)
    mask = batch.inputs["attention_mask"].bool()
    one_d = (mask.long().cumsum(-1) - 1).clamp(min=0)
    assert pos.shape == (3, 4, mask.shape[1])
    # text after the image continues from start + max(h, w), not start + h * w
    assert deltas.flatten().tolist() == [max(h, w) - h * w for h, w in NATIVE_GRIDS]
    assert not torch.equal(pos[1], one_d) and not torch.equal(pos[1], pos[2])
    for i in range(4):
        assert int(pos[:, i][:, mask[i]].max()) + 1 - int(mask[i].sum()) == int(deltas[i])

    with torch.no_grad():
        explicit = model(**native.forward_inputs(batch)).logits
        implicit = model(**batch.inputs).logits  # the model derives the same 3-D positions itself
        no_types = {k: v for k, v in batch.inputs.items() if k != "mm_token_type_ids"}
        fallback = model(**no_types).logits
        seq = torch.arange(mask.shape[1]).view(1, 1, -1).expand(3, 4, -1)
        plain_1d = model(**no_types, position_ids=seq).logits
    real = mask.unsqueeze(-1)
    torch.testing.assert_close(implicit * real, explicit * real, atol=1e-5, rtol=1e-5)
    assert (fallback - explicit).abs()[mask].max() > 1e-3
    torch.testing.assert_close(fallback, plain_1d)  # the silent fallback: arange positions, padding ignored

    # generate() caches the rope deltas it used: the adapter's with the type ids, zeros without
    model.generate(**batch.inputs, max_new_tokens=1, do_sample=False, pad_token_id=native.pad_token_id)
    assert torch.equal(model.model.rope_deltas.flatten(), deltas.flatten())
    model.generate(**no_types, max_new_tokens=1, do_sample=False, pad_token_id=native.pad_token_id)
    assert (model.model.rope_deltas == 0).all()


def test_rotate_applies_mrope_sections(native):
    """rotate() on the (B, S, D) cos/sin the decoder passes equals M-RoPE built per axis from mrope_section."""
    batch = native.build_batch(aspect_images()[:2], [native.render_prompt("a b")] * 2)
    pos, _ = native.position_ids(batch)
    n_heads, _, head_dim = native.attention_geometry
    x = torch.randn(2, n_heads, pos.shape[-1], head_dim)
    cos, sin = native.rope_cos_sin(x, pos)
    assert cos.shape == (2, pos.shape[-1], head_dim)
    inv_freq = native.model.model.language_model.rotary_emb.inv_freq
    freqs = pos[..., None].float() * inv_freq  # (3, B, S, D/2): one angle set per axis
    emb = torch.cat((freqs, freqs), dim=-1)
    per_axis = native.rotate(x, (emb.cos(), emb.sin()))
    torch.testing.assert_close(native.rotate(x, (cos, sin)), per_axis)
    # by hand: frequency band i of mrope_section rotates with axis i % 3 (t, h, w)
    bands = torch.cat([f[i % 3] for i, f in enumerate(freqs.split(native.mrope_section, dim=-1))], dim=-1)
    angle = torch.cat((bands, bands), dim=-1).unsqueeze(1)
    half = head_dim // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    torch.testing.assert_close(per_axis, x * angle.cos() + rot * angle.sin())


# --- decode ---------------------------------------------------------------------------------------------


def test_batched_decode_equals_one_by_one(qwen):
    images = aspect_images()
    batched = decode_batch(qwen, images, QUESTIONS, max_new_tokens=6)
    single = [decode_batch(qwen, [im], [q], max_new_tokens=6)[0] for im, q in zip(images, QUESTIONS, strict=True)]
    assert [r["response_token_ids"] for r in batched] == [r["response_token_ids"] for r in single]
    assert all(len(r["response_token_ids"]) > 0 for r in batched)


def test_teacher_forced_forward_reproduces_greedy_tokens(qwen):
    """The dump's forward (prompt + response, left padded, explicit M-RoPE positions) sees generate()'s positions.

    Compared on the logits, not only the argmax: a random toy's greedy tokens barely depend on positions.
    """
    images = aspect_images()
    rows = decode_batch(qwen, images, QUESTIONS, max_new_tokens=5)
    responses = [r["response_token_ids"] for r in rows]
    prompts = [qwen.render_prompt(q) for q in QUESTIONS]
    with torch.no_grad():
        gen = qwen.model.generate(
            **qwen.build_batch(images, prompts).inputs,
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=qwen.pad_token_id,
            eos_token_id=qwen.eos_token_ids,
            output_logits=True,
            return_dict_in_generate=True,
        )
        batch = qwen.build_batch(images, prompts, responses)
        logits = qwen.model(**qwen.forward_inputs(batch)).logits
    step_logits = torch.stack(gen.logits, dim=1)  # (B, steps, vocab), before suppress_tokens
    seq = logits.shape[1]
    for i, resp in enumerate(responses):
        forced = logits[i, seq - len(resp) - 1 : seq - 1]
        torch.testing.assert_close(forced, step_logits[i, : len(resp)], atol=1e-4, rtol=1e-4)
        forced[:, _suppressed(qwen)] = float("-inf")  # generate() applied the toy's suppress_tokens
        assert forced.argmax(-1).tolist() == resp


# --- attention capture ----------------------------------------------------------------------------------


def _eager_reference(adapter, batch, layers, include_eos):
    """Full eager forward with output_attentions=True; slice response rows x each sample's own visual columns."""
    model = adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**adapter.forward_inputs(batch), output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(out.attentions) == len(adapter.decoder_layers)  # decoder attentions only, no vision tower
    seq = batch.inputs["input_ids"].shape[1]
    bsz, v = batch.visual_index.shape
    n_heads = adapter.attention_geometry[0]
    attn = torch.zeros(bsz, len(layers), n_heads, v)
    norms = torch.zeros(bsz, len(layers), v)
    for i in range(bsz):
        n_resp = int(batch.response_len[i])
        # the reference's rows: every generated token but the last (EOS or cut by the limit)
        n_rows = n_resp if include_eos else max(n_resp - 1, 0)
        rows = list(range(seq - n_resp, seq - n_resp + n_rows))
        n_vis = int(batch.visual_valid[i].sum())
        vis = batch.visual_index[i, :n_vis]
        for s, layer in enumerate(layers):
            if rows:  # a sample with no rows keeps an all-zero map
                attn[i, s, :, :n_vis] = out.attentions[layer][i][:, rows][:, :, vis].mean(1)
            norms[i, s, :n_vis] = out.hidden_states[layer][i][vis].norm(dim=-1)
    return attn, norms


@pytest.mark.parametrize("include_eos", [False, True])
def test_capture_matches_eager(qwen, include_eos):
    """Per-head (GQA: 4 query heads on 2 kv heads) and head-mean capture equal the eager attention, per grid."""
    eos = qwen.eos_token_ids[0]
    responses = [[20, 21, eos], [22], [20, 21, 22, 23, eos], [24, 25]]
    prompts = [qwen.render_prompt(q) for q in QUESTIONS]
    batch = qwen.build_batch(aspect_images(), prompts, responses)
    layers = [1, 3]
    cap = capture_attention(qwen, batch, layers, per_head=True, include_eos=include_eos)
    ref_attn, ref_norm = _eager_reference(qwen, batch, layers, include_eos)
    torch.testing.assert_close(cap.attention, ref_attn, atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.hidden_norm, ref_norm, atol=1e-5, rtol=1e-6)
    head_mean = capture_attention(qwen, batch, layers, per_head=False, include_eos=include_eos)
    torch.testing.assert_close(head_mean.attention, ref_attn.mean(2), atol=ATOL, rtol=0)
    assert head_mean.n_rows.tolist() == ([2, 0, 4, 1] if not include_eos else [3, 1, 5, 2])
    padding = ~batch.visual_valid
    assert (head_mean.attention.permute(0, 2, 1)[padding] == 0).all()  # padded grid columns stay exactly 0


# --- dump + label end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_records(tmp_path_factory):
    """Plain-records JSONL: 8 samples, two of each aspect ratio."""
    root = tmp_path_factory.mktemp("qwen-records")
    (root / "img").mkdir()
    rows = []
    for i, img in enumerate(aspect_images(1) + aspect_images(2)):
        img.save(root / "img" / f"{i}.png")
        rows.append({"sample_id": f"q{i}", "image": f"img/{i}.png", "question": QUESTIONS[i % 4], "answer": "a"})
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dump_and_label_end_to_end(qwen, qwen_records, tmp_path):
    manifest, _ = build_manifest(records_from_table(qwen_records))
    responses = decode_manifest(
        qwen, manifest, DecodeParams(batch_size=3, max_new_tokens=4), PartStore(tmp_path / "w", "d", "k"), False
    )
    sizes = zip(manifest["width"].to_pylist(), manifest["height"].to_pylist(), strict=True)
    grids = [qwen.visual_grid(w, h) for w, h in sizes]
    assert max_visual_tokens(qwen, manifest) == max(h * w for h, w in grids)
    params = DumpParams(layers=[1, 3], per_head=True, batch_size=3)
    writer = AttentionStoreWriter.create(
        tmp_path / "s.zarr",
        n_samples=manifest.num_rows,
        layers=params.layers,
        max_visual=max_visual_tokens(qwen, manifest),
        heads=list(range(qwen.attention_geometry[0])),
        attrs={"model_id": qwen.model_id},
    )
    dump_attention(qwen, manifest, responses, params, writer, progress=False)
    store = open_attention_store(tmp_path / "s.zarr")
    block = store.read(0, store.n_samples)
    assert [tuple(g) for g in block.grid.tolist()] == grids
    label_params = LabelParams(heads={3: [0, 2]}, sink_method="norm", sink_norm_layer=1)
    counts = label_store(store, label_params, tmp_path / "labels.parquet", progress=False)
    assert counts["n_samples"] == manifest.num_rows
    df = pl.read_parquet(tmp_path / "labels.parquet")
    assert list(zip(df["grid_h"].to_list(), df["grid_w"].to_list(), strict=True)) == grids
    if qwen.resolution.mode == "native":
        assert df.schema["labels"] == pl.List(pl.Int8)  # grids vary: one list per sample
    else:
        assert df.schema["labels"] == pl.Array(pl.Int8, 16)
    for (gh, gw), lab in zip(grids, df["labels"].to_list(), strict=True):
        assert len(lab) == gh * gw and set(lab) <= {-1, 0, 1}
    kept = df.filter(pl.col("kept"))
    assert kept.height > 0 and (kept["n_fg"] > 0).all()


# --- loading from a checkpoint directory ----------------------------------------------------------------


def test_load_adapter_from_saved_directory(toy_qwen, tmp_path, toy_dir):
    model, processor = toy_qwen
    path = save_toy_qwen(model, processor, tmp_path / "toy-qwen")
    section = ModelParams(path=str(path), resolution=FIXED)
    loaded = load_adapter(path, device="cpu", dtype="float32", **section.adapter_options())
    assert isinstance(loaded, Qwen25VLAdapter) and loaded.resolution == Resolution(**FIXED)
    assert loaded.processor.image_processor.size["longest_edge"] == processor.image_processor.size["longest_edge"]
    in_memory = wrap_model(model, processor, "toy-qwen", resolution=FIXED)
    assert loaded.render_prompt("a b") == in_memory.render_prompt("a b")
    images = aspect_images()[:2]
    b1 = loaded.build_batch(images, [loaded.render_prompt("a b")] * 2, [[20], [21, 22]])
    b2 = in_memory.build_batch(images, [in_memory.render_prompt("a b")] * 2, [[20], [21, 22]])
    assert torch.equal(b1.inputs["input_ids"], b2.inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(**loaded.forward_inputs(b1)).logits, model(**in_memory.forward_inputs(b2)).logits
        )
    assert loaded.eos_token_ids == in_memory.eos_token_ids
    with pytest.raises(ValueError, match="do not apply"):
        load_adapter(toy_dir, device="cpu", dtype="float32", resolution=FIXED)  # a LLaVA checkpoint
