"""DeepSeek-VL (SigLIP-only) through the pipeline: prompt, resize-then-pad geometry, capture, two-stage, RPN, loading.

A tiny DeepSeek-VL is built in-process (``toymodels.deepseek``: 64 px view, 16 px patches, a 4 x 4 grid; a 4-layer
LLaMA decoder). The references are the model's and the processor's own: ``DeepseekVLImageProcessorPil``'s pixels
(long side resized first, then padded to a centred square of its background colour), the processor's own
two-image inputs, an eager ``output_attentions=True`` forward, generate()'s own logits. The checks mirror those
of LLaVA (``test_two_stage``, ``test_attention_capture``, ``test_prefix_cache``, ``test_rpn``) and Qwen2.5-VL
(``test_qwen``, ``test_qwen_two_stage``), and reuse their helpers.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import FieldError
from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.prefix_cache import prefix_generate_inputs
from pipeline.inference.roi import RoI, RoIParams, postprocess
from pipeline.inference.two_stage import (
    Crop,
    Stage1Output,
    build_stage2_inputs,
    crops_from_roi,
    generate_with_crops,
    masked_keep,
    two_stage_batch,
)
from pipeline.models import ADAPTERS, load_adapter, wrap_model
from pipeline.models.deepseek_vl import DeepseekVLAdapter
from pipeline.models.geometry import ViewSpec, grid_frame
from pipeline.student.rpn import RPN
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import decode_batch
from tests.conftest import WORDS, random_images
from tests.test_attention_capture import ATOL, RESPONSES, ROWS, _eager_reference
from tests.test_attention_capture import EOS as EOS_MARK
from tests.test_prefix_cache import CROPS as PREFIX_CROPS
from tests.test_prefix_cache import QUESTIONS as PREFIX_QUESTIONS
from tests.test_prefix_cache import _scores
from tests.test_rpn import QUESTIONS as RPN_QUESTIONS
from tests.test_rpn import base_scores
from tests.test_two_stage import QUESTIONS, _maps, _runs, noise
from toymodels.deepseek import BOS, IMAGE, SYSTEM_PROMPT, build_toy_deepseek, save_toy_deepseek

G = (4, 4)  # 64 px view, 16 px patches
VIEW, PATCH = 64, 16
# (width, height) -> does a pad-then-resize (LLaVA's reference view) put the image elsewhere in the view than the
# processor's resize-then-pad? The rounding orders differ unless the pad is a whole number of view pixels either
# way (40 x 80: 20 px of pad on an 80 px square = 16 view px). 5 x 200 resizes to 2 x 64, lifted to min_size 14.
SIZES = {(90, 50): True, (47, 33): True, (40, 80): False, (33, 47): True, (100, 30): True, (5, 200): True}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: OpenMP's spinning threads cost far more than they help.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_ds():
    model, processor = build_toy_deepseek(WORDS, seed=0)
    model.set_attn_implementation("sdpa")
    return model, processor


@pytest.fixture(scope="module")
def ds(toy_ds) -> DeepseekVLAdapter:
    return wrap_model(*toy_ds, "tiny-ds")


def _suppressed(adapter) -> list[int]:
    return list(adapter.model.generation_config.suppress_tokens or [])


# --- prompt, tokens, grid ---------------------------------------------------------------------------------


def test_prompt_is_deepseek_chat_format_and_batch_starts_with_bos(ds):
    q = "what is in the box ?"
    assert ds.render_prompt(q) == f"{SYSTEM_PROMPT}\n\nUser: {IMAGE}{q}\n\nAssistant:"
    assert ds.render_prompt(q, n_images=3) == f"{SYSTEM_PROMPT}\n\nUser: {IMAGE * 3}{q}\n\nAssistant:"
    assert ds.family == "deepseek_vl" and ADAPTERS["deepseek_vl"] is DeepseekVLAdapter
    assert ds.supports_prefix_reuse

    images = random_images(4)  # 64 x 64, 90 x 50, 40 x 80, 47 x 33
    questions = QUESTIONS[:4]
    batch = ds.build_batch(images, [ds.render_prompt(q) for q in questions])
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert mask.sum(1).unique().numel() > 1  # really left-padded
    tok = ds.tokenizer
    bos = tok.convert_tokens_to_ids(BOS)
    assert bos == tok.bos_token_id and bos != tok.unk_token_id
    image_id = ds.image_token_id
    assert image_id == tok.convert_tokens_to_ids(IMAGE) != tok.unk_token_id
    assert batch.grids == [G] * 4 and batch.visual_index.shape == (4, 16) and batch.visual_valid.all()
    for i, q in enumerate(questions):
        row = ids[i][mask[i].bool()]
        assert int(row[0]) == bos and int((row == bos).sum()) == 1  # BOS first, once
        assert tok.unk_token_id not in row.tolist()
        # the 16 visual tokens: every image placeholder of the row, one consecutive run, grid row-major
        vis = batch.visual_index[i]
        assert (ids[i, vis] == image_id).all()
        assert vis.tolist() == (ids[i] == image_id).nonzero().flatten().tolist()
        assert torch.equal(vis, torch.arange(16) + int(vis[0]))
        words = tok.convert_ids_to_tokens(ids[i].tolist())
        first, last = int(vis[0]), int(vis[-1])
        assert words[first - 2 : first] == ["User", ":"]
        # the toy word-level tokenizer drops the template's newlines
        assert words[last + 1 :] == [*q.split(), "Assistant", ":"]
        assert words[int((~mask[i].bool()).sum()) + 1 : first - 2] == tok.tokenize(SYSTEM_PROMPT)
    assert ds.prompt_lengths(questions, [im.size for im in images]) == batch.prompt_len.tolist()
    assert batch.prompt_len.tolist() == mask.sum(1).tolist()
    # one fixed grid whatever the aspect ratio
    assert {ds.visual_grid(w, h) for w, h in [*SIZES, (64, 64), (1000, 7), (7, 1000)]} == {G}


# --- geometry: the frame against the processor's pixels ---------------------------------------------------


def _processor_content(adapter, size) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The processor's view of a black image (no rescale/normalise): (64, 64) background mask, content box."""
    ip = adapter.processor.image_processor
    out = np.asarray(ip(Image.new("RGB", size), do_rescale=False, do_normalize=False)["pixel_values"][0])
    assert out.shape == (3, VIEW, VIEW)
    fill = np.array(adapter.pad_fill).reshape(3, 1, 1)
    background = (out == fill).all(0)
    assert (out[:, ~background] == 0).all()  # black content, grey padding, nothing in between
    ys, xs = np.nonzero(~background)
    return background, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _frame_content(width: int, height: int, view: ViewSpec | bool) -> tuple[Fraction, ...]:
    """Where the image lies in view pixels (x0, y0, x1, y1), by the frame the grid tiles."""
    f = grid_frame(width, height, view)
    return (
        -f.x0 * VIEW / f.w,
        -f.y0 * VIEW / f.h,
        (width - f.x0) * VIEW / f.w,
        (height - f.y0) * VIEW / f.h,
    )


@pytest.mark.parametrize("size", list(SIZES), ids=[f"{w}x{h}" for w, h in SIZES])
def test_frame_matches_the_processors_padding(ds, size):
    """The image's rectangle in the processor's pixel_values is the frame's, to the pixel; pad-first is not."""
    w, h = size
    ip = ds.processor.image_processor
    assert ds.pad_fill == tuple(ip.background_color) == (127, 127, 127)
    assert ds.view_spec == ViewSpec(pad_to_square=True, longest_edge=VIEW, min_size=ip.min_size)
    background, content = _processor_content(ds, size)
    # the processor's own rule, written out: long side to the view, each side at least min_size, centred pad
    rw, rh = max(round(w * VIEW / max(w, h)), ip.min_size), max(round(h * VIEW / max(w, h)), ip.min_size)
    ox, oy = (VIEW - rw) // 2, (VIEW - rh) // 2
    assert content == (ox, oy, ox + rw, oy + rh)
    assert _frame_content(w, h, ds.view_spec) == content  # exact (fractions)
    pad_first = _frame_content(w, h, ViewSpec(pad_to_square=True))  # LLaVA's reference order
    assert (pad_first != content) is SIZES[size]

    # tokens: a token wholly over the processor's padding has an empty source box, any other a non-empty one
    pad_frac = background.reshape(4, PATCH, 4, PATCH).mean((1, 3))
    for gy in range(4):
        for gx in range(4):
            x0, y0, x1, y1 = ds.source_box((gy, gx, gy, gx), w, h)
            assert (x1 <= x0 or y1 <= y0) == (pad_frac[gy, gx] == 1), (gy, gx)
    # padding_tokens (the reference's rule, the labels' known background): every all-padding token, and only
    # tokens at least half padding; exactly those more than half padding, but for a thin image, whose content
    # keeps at least one token column in the reference's rule (5 x 200: columns 1, 2 are 9 / 16 padding)
    known_bg = ds.padding_tokens(w, h).reshape(4, 4)
    assert known_bg[pad_frac == 1].all()
    assert (pad_frac[known_bg] >= 0.5).all()
    if size == (5, 200):
        assert known_bg.tolist() == [[True, False, False, True]] * 4 and (pad_frac > 0.5).all()
    else:
        np.testing.assert_array_equal(known_bg, pad_frac > 0.5)


def test_square_image_has_no_padding(ds):
    background, content = _processor_content(ds, (96, 96))
    assert not background.any() and content == (0, 0, VIEW, VIEW)
    assert not ds.padding_tokens(96, 96).any()
    assert ds.source_box((0, 0, 3, 3), 96, 96) == (0, 0, 96, 96)
    assert ds.source_box((1, 2, 1, 2), 96, 96) == (48, 24, 72, 48)


def test_source_and_grid_boxes_hand_worked(ds):
    """47 x 33 resizes to 64 x 45 with 9 rows of pad on top; 100 x 30 to 64 x 19 with 22. A pad-then-resize
    (LLaVA's frame, 7 and 35 source rows of pad) is off by a source pixel."""
    # 47 x 33: token row 1 is view rows 16 .. 32 -> source y (16 - 9) * 33 / 45 = 5.13 .. 16.87
    assert ds.source_box((1, 0, 1, 1), 47, 33) == (0, 5, 24, 17)
    assert ds.source_box((0, 0, 0, 3), 47, 33) == (0, 0, 47, 6)
    assert ds.grid_span((0, 0, 47, 33), 47, 33) == (9 / 16, 0.0, 54 / 16, 4.0)
    assert ds.grid_box((10, 3, 30, 20), 47, 33) == (0, 0, 2, 2)
    # 100 x 30: token row 1 is source y (16 - 22) * 30 / 19 .. (32 - 22) * 30 / 19 = 15.8 (clipped at 0)
    assert ds.source_box((1, 0, 1, 1), 100, 30) == (0, 0, 50, 16)
    assert ds.source_box((2, 0, 2, 3), 100, 30) == (0, 15, 100, 30)  # view rows 32 .. 48: y 15.8 .. 41 (clipped)
    for row in (0, 3):  # content is view rows 22 .. 41: rows 0 and 3 are all padding
        _, y0, _, y1 = ds.source_box((row, 0, row, 3), 100, 30)
        assert y1 <= y0
    assert ds.grid_span((0, 0, 100, 30), 100, 30) == (22 / 16, 0.0, 41 / 16, 4.0)
    # 5 x 200: min_size lifts the 2 px wide resize to 14 px, columns 25 .. 39 of the view
    assert ds.grid_span((0, 0, 5, 200), 5, 200) == (0.0, 25 / 16, 4.0, 39 / 16)
    assert ds.grid_box((0, 0, 5, 200), 5, 200) == (0, 1, 3, 2)
    assert ds.source_box((0, 1, 3, 1), 5, 200) == (0, 0, 3, 200)  # view columns 25 .. 32 of 14: 2.86 source px


def test_grid_boxes_round_trip_through_source_pixels(ds):
    """A grid box's source box covers every token of the box that shows the image, and one token more at most."""
    rng = np.random.default_rng(3)
    sizes = [*SIZES, *((int(a), int(b)) for a, b in rng.integers(3, 300, (60, 2)))]
    for w, h in sizes:
        f = grid_frame(w, h, ds.view_spec)
        for _ in range(6):
            y0, x0 = (int(v) for v in rng.integers(0, 4, 2))
            y1, x1 = int(rng.integers(y0, 4)), int(rng.integers(x0, 4))
            box = ds.source_box((y0, x0, y1, x1), w, h)
            ys = [y for y in range(y0, y1 + 1) if f.y0 + y * f.h / 4 < h and f.y0 + (y + 1) * f.h / 4 > 0]
            xs = [x for x in range(x0, x1 + 1) if f.x0 + x * f.w / 4 < w and f.x0 + (x + 1) * f.w / 4 > 0]
            if not ys or not xs:
                assert box[2] <= box[0] or box[3] <= box[1]
                continue
            # the source box is the tokens' image pixels rounded outward to whole pixels
            ex0, ex1 = f.x0 + xs[0] * f.w / 4, f.x0 + (xs[-1] + 1) * f.w / 4
            ey0, ey1 = f.y0 + ys[0] * f.h / 4, f.y0 + (ys[-1] + 1) * f.h / 4
            expected = (
                max(math.floor(ex0), 0),
                max(math.floor(ey0), 0),
                min(math.ceil(ex1), w),
                min(math.ceil(ey1), h),
            )
            assert box == expected, (w, h, (y0, x0, y1, x1))
            back = ds.grid_box(box, w, h)
            assert back is not None
            assert back[0] <= ys[0] and back[1] <= xs[0] and back[2] >= ys[-1] and back[3] >= xs[-1]
            assert back[0] >= y0 - 1 and back[1] >= x0 - 1 and back[2] <= y1 + 1 and back[3] <= x1 + 1


def test_crops_map_back_to_source_pixels(ds):
    """A masked crop on a non-square image is its tokens' pixels; its keep-mask follows what the crop shows."""
    for w, h in [(90, 50), (47, 33), (33, 47), (100, 30)]:
        box = (1, 1, 2, 3)
        mask = np.zeros(G, dtype=bool)
        mask[1:3, 1:4] = True
        mask[1, 1] = False
        roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[box], enclosing=box)
        (crop,) = crops_from_roi(roi, ds, w, h, "masked")
        assert crop.box == ds.source_box(box, w, h)
        back = ds.grid_box(crop.box, w, h)
        assert back[0] <= 1 and back[1] <= 1 and back[2] >= 2 and back[3] >= 3
        span = ds.grid_span(crop.box, w, h)
        np.testing.assert_array_equal(crop.keep, masked_keep(mask, box, G, span=span))
        assert crop.keep.any() and not crop.keep.all()
        (whole,) = crops_from_roi(roi, ds, w, h, "box")
        assert whole.box == crop.box and whole.keep is None


# --- attention capture and teacher forcing --------------------------------------------------------------


@pytest.mark.parametrize("include_last_prompt", [False, True])
@pytest.mark.parametrize("include_eos", [False, True])
def test_capture_matches_eager(ds, include_eos, include_last_prompt):
    """Per-head and head-mean capture, and hidden-state norms, equal an eager output_attentions forward."""
    eos = ds.eos_token_ids[0]
    responses = [[eos if t == EOS_MARK else t for t in r] for r in RESPONSES]
    prompts = [ds.render_prompt(q) for q in ["what is in the red box ?", "a b", "what colour is it ?", "box"]]
    batch = ds.build_batch(random_images(4), prompts, responses)
    assert batch.inputs["attention_mask"].sum(1).unique().numel() > 1  # really padded
    rows = [([-1] if include_last_prompt else []) + r for r in ROWS[include_eos]]
    layers = [1, 3]
    kw = {"include_eos": include_eos, "include_last_prompt": include_last_prompt}
    cap = capture_attention(ds, batch, layers, per_head=True, **kw)
    ref_attn, ref_norm = _eager_reference(ds.model, ds, batch, layers, rows)
    assert ds.model.config._attn_implementation == "sdpa"  # the helper puts it back
    torch.testing.assert_close(cap.attention, ref_attn, atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.hidden_norm, ref_norm, atol=1e-5, rtol=1e-6)
    head_mean = capture_attention(ds, batch, layers, per_head=False, **kw)
    torch.testing.assert_close(head_mean.attention, ref_attn.mean(2), atol=ATOL, rtol=0)
    assert head_mean.n_rows.tolist() == [len(r) for r in rows]
    if not rows[1]:
        assert (cap.attention[1] == 0).all()


def test_teacher_forced_forward_reproduces_greedy_tokens(ds):
    """The dump's forward (prompt + response, left padded, positions from the mask) sees generate()'s logits."""
    images = random_images(4)
    questions = QUESTIONS[:4]
    rows = decode_batch(ds, images, questions, max_new_tokens=5)
    responses = [r["response_token_ids"] for r in rows]
    assert all(responses)
    prompts = [ds.render_prompt(q) for q in questions]
    with torch.no_grad():
        gen = ds.model.generate(
            **ds.build_batch(images, prompts).inputs,
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=ds.pad_token_id,
            eos_token_id=ds.eos_token_ids,
            output_logits=True,
            return_dict_in_generate=True,
        )
        batch = ds.build_batch(images, prompts, responses)
        logits = ds.model(**ds.forward_inputs(batch)).logits
    step_logits = torch.stack(gen.logits, dim=1)  # before suppress_tokens
    seq = logits.shape[1]
    for i, resp in enumerate(responses):
        forced = logits[i, seq - len(resp) - 1 : seq - 1]
        torch.testing.assert_close(forced, step_logits[i, : len(resp)], atol=1e-4, rtol=1e-4)
        forced[:, _suppressed(ds)] = float("-inf")
        assert forced.argmax(-1).tolist() == resp


# --- two-stage inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 4])  # 64 x 64 and 96 x 96
def test_full_crop_of_square_image_equals_processor_with_two_images(ds, index):
    model, processor = ds.model, ds.processor
    image = random_images(5)[index]
    question = QUESTIONS[0]
    enc = processor(images=[image, image], text=[ds.render_prompt(question, n_images=2)], return_tensors="pt")
    inputs = build_stage2_inputs(ds, [image], [question], [[Crop((0, 0, image.width, image.height))]])
    assert inputs.input_ids[0].tolist() == enc["input_ids"][0].tolist()
    assert _runs(inputs.input_ids[0], ds.image_token_id) == [32]
    with torch.no_grad():
        expected = model(**enc).logits
        got = model(**inputs.model_inputs()).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_full_crop_of_non_square_image_is_stretched_not_padded(ds):
    """Same token sequence as the processor's two images; but the crop fills the grid instead of being padded."""
    image = random_images(2)[1]  # 90 x 50
    enc = ds.processor(images=[image, image], text=[ds.render_prompt("a b", n_images=2)])
    inputs = build_stage2_inputs(ds, [image], ["a b"], [[Crop((0, 0, 90, 50))]])
    assert inputs.input_ids[0].tolist() == list(enc["input_ids"][0])
    ip = ds.processor.image_processor
    stretched = image.resize((VIEW, VIEW), Image.Resampling.BICUBIC)
    ref = ip([stretched], do_resize=False, return_tensors="pt")["pixel_values"]
    got = ds.crop_pixels([image], [(0, 0, 90, 50)])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not torch.equal(got, ds.pixel_values([image]))  # the original view is padded


def test_masked_upscaling_keeps_exactly_the_masked_tokens(ds):
    model, processor = ds.model, ds.processor
    ip = processor.image_processor
    image = noise(64, 64, seed=5)
    prob = np.zeros(G)
    prob[1, 1] = prob[1, 2] = prob[2, 1] = prob[3, 1] = 0.9  # an L of 4 tokens: no growth
    roi = postprocess(prob, RoIParams(smooth_sigma=0.0, tau=0.5, mode="masked"))
    (crop,) = crops_from_roi(roi, ds, 64, 64, "masked")
    assert crop.box == (16, 16, 48, 64)
    expected_keep = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(crop.keep, expected_keep)

    other = noise(50, 70, seed=6)
    inputs = build_stage2_inputs(ds, [image, other], ["a b", "what is in the box ?"], [[crop], []])
    image_id = ds.image_token_id
    assert _runs(inputs.input_ids[0], image_id) == [16 + 10]
    assert _runs(inputs.input_ids[1], image_id) == [16]
    assert inputs.n_crop_tokens == [10, 0]
    # independent features: the crop stretched by PIL to the view (not padded), the original view alone
    view = image.crop(crop.box).resize((VIEW, VIEW), Image.Resampling.BICUBIC)

    def encode(images, **kw):  # the model's own vision tower + aligner on the processor's pixels
        with torch.no_grad():
            pixels = ip(images, return_tensors="pt", **kw)["pixel_values"]
            return model.model.get_image_features(pixel_values=pixels).pooler_output[0]

    full = encode([view], do_resize=False)
    orig, orig_other = encode([image]), encode([other])
    pos = (inputs.input_ids[0] == image_id).nonzero().flatten()
    torch.testing.assert_close(inputs.inputs_embeds[0, pos[:16]], orig, rtol=0, atol=1e-6)
    flat = torch.from_numpy(expected_keep.reshape(-1))
    torch.testing.assert_close(inputs.inputs_embeds[0, pos[16:]], full[flat], rtol=0, atol=1e-6)
    pos1 = (inputs.input_ids[1] == image_id).nonzero().flatten()
    torch.testing.assert_close(inputs.inputs_embeds[1, pos1], orig_other, rtol=0, atol=1e-6)
    dist = torch.cdist(full[~flat], inputs.inputs_embeds[0])
    assert dist.min() > 1e-4  # no dropped crop token leaks in


def test_no_region_answers_like_the_baseline(ds):
    images = random_images(4)
    questions = QUESTIONS[:4]
    base = decode_batch(ds, images, questions, max_new_tokens=6)
    rows, rois = two_stage_batch(ds, images, questions, [np.zeros(G)] * 4, RoIParams(), max_new_tokens=6)
    assert not any(r.found for r in rois)
    assert [r["response_token_ids"] for r in rows] == [r["response_token_ids"] for r in base]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in base]
    assert all(r["crop_boxes"] == [] and r["n_crop_tokens"] == 0 for r in rows)


@pytest.mark.parametrize("mode", ["masked", "box"])
def test_batched_equals_one_by_one(ds, mode):
    """Five images of four aspect ratios, crops of different lengths, two samples without a region."""
    images = random_images(5)
    assert len({im.width / im.height for im in images}) == 4
    params = RoIParams(smooth_sigma=0.0, tau=0.5, mode=mode)
    maps = _maps()
    batched, _ = two_stage_batch(ds, images, QUESTIONS, lambda ims, qs: maps, params, max_new_tokens=5)
    assert [len(r["crop_boxes"]) for r in batched] == ([1, 0, 1, 1, 0] if mode == "masked" else [1, 0, 2, 2, 0])
    assert len({r["n_crop_tokens"] for r in batched}) >= 3  # rows of different lengths share the batch
    for i in range(5):
        (single,), _ = two_stage_batch(ds, [images[i]], [QUESTIONS[i]], [maps[i]], params, max_new_tokens=5)
        assert single["response_token_ids"] == batched[i]["response_token_ids"]
        assert single["crop_boxes"] == batched[i]["crop_boxes"]
        assert single["n_crop_tokens"] == batched[i]["n_crop_tokens"]
    base = decode_batch(ds, [images[1], images[4]], [QUESTIONS[1], QUESTIONS[4]], max_new_tokens=5)
    assert [batched[1]["response_token_ids"], batched[4]["response_token_ids"]] == [
        r["response_token_ids"] for r in base
    ]


def test_crops_change_what_the_model_sees(ds):
    image = random_images(1)[0]
    plain = build_stage2_inputs(ds, [image], ["a b"], [[]])
    crop = build_stage2_inputs(ds, [image], ["a b"], [[Crop((0, 0, 32, 32))]])
    with torch.no_grad():
        a = ds.model(**plain.model_inputs()).logits[0, -1]
        b = ds.model(**crop.model_inputs()).logits[0, -1]
    assert not torch.allclose(a, b)
    rows = generate_with_crops(ds, [image], ["a b"], [[Crop((0, 0, 32, 32))]], max_new_tokens=3)
    assert rows[0]["crop_boxes"] == [[0, 0, 32, 32]] and rows[0]["n_crop_tokens"] == 16


# --- prefix reuse -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attn", "B"), [("sdpa", 1), ("sdpa", 2), ("eager", 1)])
def test_prefix_reuse_matches_plain_stage2(ds, attn, B):
    """Stage 2 from stage 1's cache (system prompt + image) = plain stage 2: greedy tokens and every step's logits."""
    images = random_images(len(PREFIX_QUESTIONS), seed=5)
    ds.model.set_attn_implementation(attn)
    try:
        rpn = RPN.from_base(ds, B, 4 - B).eval()
        batch = ds.build_batch(images, [ds.render_prompt(q) for q in PREFIX_QUESTIONS])
        logits, state = rpn.stage1(batch)
        torch.testing.assert_close(logits, rpn(batch))
        # the shared prefix: BOS, the system prompt, "User :" and the image's 16 tokens
        assert (state.prefix_end == batch.visual_index[:, -1] + 1).all()
        plain = build_stage2_inputs(ds, images, PREFIX_QUESTIONS, PREFIX_CROPS)
        blind = build_stage2_inputs(ds, images, PREFIX_QUESTIONS, PREFIX_CROPS, encode_originals=False)
        assert not torch.allclose(plain.inputs_embeds, blind.inputs_embeds)
        reused = prefix_generate_inputs(ds, state, blind)
        seq_a, scores_a = _scores(ds, plain.model_inputs(), 6)
        seq_b, scores_b = _scores(ds, reused, 6)
    finally:
        ds.model.set_attn_implementation("sdpa")
    assert seq_a == seq_b
    torch.testing.assert_close(scores_a, scores_b, atol=1e-4, rtol=1e-4)


def test_two_stage_batch_same_answers_with_and_without_reuse(ds):
    images = random_images(len(PREFIX_QUESTIONS), seed=9)
    rpn = RPN.from_base(ds, 2, 2).eval()
    maps = rpn_maps(rpn)(images, PREFIX_QUESTIONS)
    with_cache = rpn_maps(rpn, reuse_prefix=True)(images, PREFIX_QUESTIONS)
    assert maps.prefix is None and with_cache.prefix is not None
    for a, b in zip(maps.maps, with_cache.maps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    fixed = [np.zeros(G) for _ in PREFIX_QUESTIONS]
    fixed[0][1:3, 1:3] = 0.9
    fixed[2][0, 0:3] = 0.9
    fixed[3][2:4, 0:2] = 0.9
    fixed[4][0:4, 3] = 0.9
    for mode in ("masked", "box"):
        p = RoIParams(smooth_sigma=0.0, tau=0.5, mode=mode)
        rows_a, _ = two_stage_batch(ds, images, PREFIX_QUESTIONS, fixed, p, max_new_tokens=5)
        rows_b, _ = two_stage_batch(ds, images, PREFIX_QUESTIONS, Stage1Output(fixed, with_cache.prefix), p, 5)
        assert [r["response_token_ids"] for r in rows_a] == [r["response_token_ids"] for r in rows_b]
        assert [r["crop_boxes"] for r in rows_a] == [r["crop_boxes"] for r in rows_b]
        assert sum(bool(r["crop_boxes"]) for r in rows_a) >= 3


# --- RPN --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("B", "R"), [(1, 2), (0, 1), (1, 3)])
def test_fresh_rpn_reproduces_base_layer_scores(ds, B, R):
    """Before training the RPN is a copy: its logits are layer B+R-1's scores (left-padded DeepSeek batch)."""
    batch = ds.build_batch(random_images(3), [ds.render_prompt(q) for q in RPN_QUESTIONS])
    assert batch.inputs["attention_mask"].sum(1).unique().numel() == 3
    rpn = RPN.from_base(ds, B, R)
    with torch.no_grad():
        logits = rpn(batch)
    assert logits.shape == (3, 16) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, base_scores(ds, batch, B + R - 1), rtol=1e-5, atol=1e-7)
    if B + R < 4:  # the next layer's scores are really something else
        assert not torch.allclose(logits, base_scores(ds, batch, B + R), rtol=1e-5, atol=1e-7)


# --- loading and options ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory, toy_ds):
    return save_toy_deepseek(*toy_ds, tmp_path_factory.mktemp("model") / "tiny-ds")


def test_load_adapter_from_saved_directory(ds, ds_dir):
    loaded = load_adapter(ds_dir, device="cpu", dtype="float32")
    assert isinstance(loaded, DeepseekVLAdapter) and loaded.model_id == "tiny-ds"
    assert loaded.view_spec == ds.view_spec and loaded.pad_fill == ds.pad_fill
    assert loaded.render_prompt("a b") == ds.render_prompt("a b")
    assert loaded.eos_token_ids == ds.eos_token_ids and loaded.pad_token_id == ds.pad_token_id
    assert _suppressed(loaded) == _suppressed(ds) != []
    images = random_images(3)[1:] + [noise(33, 47)]
    prompts = [ds.render_prompt(q) for q in ("a b", "what is in the box ?", "c")]
    responses = [[20], [21, 22], []]
    b1 = loaded.build_batch(images, prompts, responses)
    b2 = ds.build_batch(images, prompts, responses)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(b1.inputs[key], b2.inputs[key]), key
    assert torch.equal(b1.visual_index, b2.visual_index)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(**loaded.forward_inputs(b1)).logits, ds.model(**ds.forward_inputs(b2)).logits
        )
    crops = [[Crop((0, 0, 40, 30))], [], [Crop((3, 3, 30, 40), keep=np.eye(4, dtype=bool))]]
    s1 = build_stage2_inputs(loaded, images, ["a", "b", "c"], crops)
    s2 = build_stage2_inputs(ds, images, ["a", "b", "c"], crops)
    assert torch.equal(s1.input_ids, s2.input_ids)
    torch.testing.assert_close(s1.inputs_embeds, s2.inputs_embeds)
    # without weights: prompts, grids and geometry from the config alone
    meta = load_adapter(ds_dir, device="cpu", weights=False)
    assert meta.prompt_lengths(["a b"], [(90, 50)]) == ds.prompt_lengths(["a b"], [(90, 50)])
    assert meta.source_box((1, 0, 1, 1), 47, 33) == (0, 5, 24, 17)


def test_options_are_validated(toy_ds, ds_dir):
    with pytest.raises(ValueError, match="do not apply"):
        load_adapter(ds_dir, device="cpu", dtype="float32", pad_to_square=True)  # LLaVA's option
    with pytest.raises(ValueError, match="do not apply"):
        wrap_model(*toy_ds, "tiny-ds", pad_to_square=True)
    with pytest.raises(ValueError, match="do not apply"):
        wrap_model(*toy_ds, "tiny-ds", resolution={"mode": "fixed", "size": 112})  # Qwen2.5-VL's
    for bad in (20, 0, -16):
        with pytest.raises(FieldError, match="multiple of the patch size 16"):
            wrap_model(*toy_ds, "tiny-ds", crop_size=bad)
    with pytest.raises(FieldError, match="crop_size"):
        load_adapter(ds_dir, device="cpu", weights=False, crop_size=24)
    # a processor resizing to another size than the vision tower's is refused
    model, processor = toy_ds
    other = copy.deepcopy(processor)
    other.image_processor.size = {"height": 32, "width": 32}
    with pytest.raises(ValueError, match="resizes to 32 px"):
        wrap_model(model, other, "tiny-ds")


def test_crop_size_gives_smaller_crop_grids(toy_ds):
    """crop_size 32: crops on 2 x 2 tokens (interpolated position embeddings), stretched to 32 px."""
    small = wrap_model(*toy_ds, "tiny-ds", crop_size=32)
    assert small.crop_size == 32 and small.crop_grid(90, 50) == (2, 2) and small.grid_shape == G
    image = noise(90, 50, seed=2)
    ip = small.processor.image_processor
    box = (10, 5, 60, 45)
    stretched = image.crop(box).resize((32, 32), Image.Resampling.BICUBIC)
    ref = ip([stretched], do_resize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(small.crop_pixels([image], [box]), ref, rtol=0, atol=0)
    keep = np.array([[True, False], [True, True]])
    s2 = build_stage2_inputs(small, [image], ["a b"], [[Crop(box, keep=keep)]])
    assert s2.n_crop_tokens == [3] and _runs(s2.input_ids[0], small.image_token_id) == [16 + 3]
    with torch.no_grad():  # the vision tower at 32 px, its position embeddings interpolated
        feats = small.model.model.get_image_features(pixel_values=ref, interpolate_pos_encoding=True).pooler_output[0]
    assert feats.shape[0] == 4
    pos = (s2.input_ids[0] == small.image_token_id).nonzero().flatten()[16:]
    torch.testing.assert_close(s2.inputs_embeds[0, pos], feats[torch.from_numpy(keep.reshape(-1))], rtol=0, atol=1e-6)
