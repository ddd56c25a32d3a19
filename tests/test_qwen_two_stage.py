"""Two-stage inference on Qwen2.5-VL: crops as further images with their own M-RoPE positions (SPEC 3, issue 6).

A tiny Qwen2.5-VL is built in-process and run on images of several aspect ratios, in native (per-sample grid)
and fixed resolution. The reference for every stage-2 input is the model's own path: the adapter's
``build_batch`` of the same prompt with the crop as a real second image, and the model's own forward /
generate() on it (positions from ``mm_token_type_ids``, rope deltas while decoding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.roi import RoI, RoIParams
from pipeline.inference.two_stage import (
    Crop,
    build_stage2_inputs,
    crop_grid,
    crops_from_roi,
    masked_keep,
    two_stage_batch,
)
from pipeline.models import wrap_model
from pipeline.models.qwen2_5_vl import Qwen25VLAdapter
from pipeline.teacher.decode import decode_batch
from tests.conftest import WORDS
from toymodels.qwen import build_toy_qwen

# (width, height): 1:1, 16:9, 9:16, 3:1
SIZES = [(84, 84), (160, 90), (90, 160), (168, 56)]
NATIVE_GRIDS = [(3, 3), (3, 6), (6, 3), (2, 6)]  # the toy budget (4 .. 36 merged tokens) in native mode
FIXED = {"mode": "fixed", "size": 112}  # 4x4 merged tokens for every image
QUESTIONS = ["what is in the red box ?", "what is in the box ?", "a b c", "what colour is the shape ?"]


def aspect_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def toy_qwen():
    model, processor = build_toy_qwen(WORDS, seed=0)
    model.set_attn_implementation("sdpa")
    return model, processor


@pytest.fixture(scope="module", params=["native", "fixed"])
def qwen(request, toy_qwen) -> Qwen25VLAdapter:
    return wrap_model(*toy_qwen, "toy-qwen", resolution=None if request.param == "native" else FIXED)


def _grids(adapter: Qwen25VLAdapter) -> list[tuple[int, int]]:
    return NATIVE_GRIDS if adapter.resolution.mode == "native" else [(4, 4)] * len(SIZES)


def _reference_batch(adapter: Qwen25VLAdapter, images, questions, boxes):
    """The adapter's own batch with each crop as a real second image (None: no crop)."""
    flat, prompts = [], []
    for im, q, box in zip(images, questions, boxes, strict=True):
        flat += [im] if box is None else [im, im.crop(box)]
        prompts.append(adapter.render_prompt(q, n_images=1 if box is None else 2))
    return adapter.build_batch(flat, prompts)


def _runs(ids: torch.Tensor, image_id: int) -> list[tuple[int, int]]:
    """(start, length) of the consecutive image-token runs in one row."""
    runs, start = [], None
    row = ids.tolist() + [-1]
    for j, t in enumerate(row):
        if t == image_id and start is None:
            start = j
        elif t != image_id and start is not None:
            runs.append((start, j - start))
            start = None
    return runs


# --- geometry: crops map back to source pixels ------------------------------------------------------------


def test_crop_maps_back_to_source_pixels_native():
    """168 x 56 in native mode is 2x6 tokens of exactly 28 px: a token box is exactly its pixels, both ways."""
    adapter = wrap_model(*build_toy_qwen(WORDS, seed=0), "toy-qwen")
    w, h = 168, 56
    assert adapter.visual_grid(w, h) == (2, 6)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 200, (h, w, 3), dtype=np.uint8)
    pixels[0:56, 28:84] = (255, 0, 0)  # tokens (0..1, 1..2)
    image = Image.fromarray(pixels)
    mask = np.zeros((2, 6), dtype=bool)
    mask[0, 1:3] = True
    mask[1, 1] = True  # an L of three tokens; (1, 2) is in the box but not in the mask
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(0, 1, 1, 2)], enclosing=(0, 1, 1, 2))
    (crop,) = crops_from_roi(roi, adapter, w, h, "masked")
    assert crop.box == (28, 0, 84, 56)
    assert adapter.grid_box(crop.box, w, h) == (0, 1, 1, 2)
    assert set(map(tuple, np.asarray(image.crop(crop.box)).reshape(-1, 3).tolist())) == {(255, 0, 0)}
    # the 56 x 56 crop is encoded at its own size (within the budget): 2x2 tokens, one per source token
    assert crop_grid(adapter, crop.box) == (2, 2)
    np.testing.assert_array_equal(crop.keep, [[True, True], [True, False]])
    # a non-square crop gets a non-square grid: 84 x 28 px -> smart_resize to 112 x 56 -> 2x4
    row = RoI(smoothed=mask * 1.0, mask=mask & False, boxes=[(0, 0, 0, 2)], enclosing=(0, 0, 0, 2))
    (wide,) = crops_from_roi(row, adapter, w, h, "box")
    assert wide.box == (0, 0, 84, 28) and crop_grid(adapter, wide.box) == (2, 4)


def test_crop_maps_back_to_source_pixels(qwen):
    """Every aspect ratio, both modes: the crop is the union of its tokens' pixels (whole pixels, clipped)."""
    for (w, h), (gh, gw) in zip(SIZES, _grids(qwen), strict=True):
        box = (gh // 2, 1, gh - 1, gw - 1)  # lower right part of the grid, non-square
        mask = np.zeros((gh, gw), dtype=bool)
        mask[box[0] : box[2] + 1, box[1] : box[3] + 1] = True
        mask[box[0], box[1]] = False
        roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[box], enclosing=box)
        (crop,) = crops_from_roi(roi, qwen, w, h, "masked")
        # token (i, j) spans [j * w / gw, (j + 1) * w / gw) x [i * h / gh, (i + 1) * h / gh) of the source
        x0, y0 = box[1] * w / gw, box[0] * h / gh
        x1, y1 = (box[3] + 1) * w / gw, (box[2] + 1) * h / gh
        assert crop.box == (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
        back = qwen.grid_box(crop.box, w, h)
        assert back[0] <= box[0] and back[1] <= box[1] and back[2] >= box[2] and back[3] >= box[3]
        grid = crop_grid(qwen, crop.box)
        assert crop.keep.shape == grid == qwen.visual_grid(crop.box[2] - crop.box[0], crop.box[3] - crop.box[1])
        span = qwen.grid_span(crop.box, w, h)
        np.testing.assert_array_equal(crop.keep, masked_keep(mask, box, grid, span=span))
        assert crop.keep.any() and not crop.keep.all()


# --- stage-2 inputs vs the model's own two-image inputs ---------------------------------------------------


def test_full_crops_equal_the_models_own_inputs_with_two_images(qwen):
    """Every crop token kept: ids, type ids, grids, 3-D positions, logits and greedy decoding are the model's own."""
    model = qwen.model
    images = aspect_images()
    boxes = [(0, 0, 84, 56), (20, 10, 160, 90), None, (56, 0, 168, 56)]
    crops = [[] if b is None else [Crop(b)] for b in boxes]
    s2 = build_stage2_inputs(qwen, images, QUESTIONS, crops)
    ref = _reference_batch(qwen, images, QUESTIONS, boxes)
    assert torch.equal(s2.input_ids, ref.inputs["input_ids"])
    assert torch.equal(s2.attention_mask, ref.inputs["attention_mask"])
    assert torch.equal(s2.mm_token_type_ids, ref.inputs["mm_token_type_ids"])
    assert torch.equal(s2.image_grid_thw, ref.inputs["image_grid_thw"])
    pos, deltas = qwen.position_ids(ref)
    assert torch.equal(s2.position_ids, pos)
    assert (deltas != 0).all()  # the positions really are 3-D: text after an image does not count its tokens
    assert s2.n_crop_tokens == [0 if b is None else int(np.prod(crop_grid(qwen, b))) for b in boxes]
    real = ref.inputs["attention_mask"].bool()
    with torch.no_grad():
        got = model(**s2.model_inputs()).logits
        expected = model(**ref.inputs).logits  # the model computes its own positions and image features
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)

    kw = {
        "do_sample": False,
        "max_new_tokens": 5,
        "pad_token_id": qwen.pad_token_id,
        "eos_token_id": qwen.eos_token_ids,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        ours = model.generate(**s2.model_inputs(), **kw)
        own = model.generate(**ref.inputs, **kw)  # decodes with the rope deltas it cached
    assert torch.equal(model.model.rope_deltas.flatten(), deltas.flatten())
    assert ours.sequences.tolist() == own.sequences[:, ref.inputs["input_ids"].shape[1] :].tolist()
    for a, b in zip(ours.logits, own.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masked_upscaling_keeps_exactly_the_masked_tokens(qwen):
    model = qwen.model
    images = aspect_images(1)
    image = images[1]  # 160 x 90
    box = (40, 0, 160, 60)
    grid = crop_grid(qwen, box)
    keep = np.zeros(grid, dtype=bool)
    keep[0, :] = True
    keep[:, -1] = True
    keep[grid[0] // 2, grid[1] // 2] = True
    crop = Crop(box, keep)
    s2 = build_stage2_inputs(qwen, [image, images[3]], ["a b", QUESTIONS[1]], [[crop], []])
    full = build_stage2_inputs(qwen, [image, images[3]], ["a b", QUESTIONS[1]], [[Crop(box)], []])
    n_orig = int(np.prod(qwen.visual_grid(*image.size)))
    image_id = qwen.image_token_id
    runs = _runs(s2.input_ids[0], image_id)
    assert [n for _, n in runs] == [n_orig, int(keep.sum())]
    assert s2.n_crop_tokens == [int(keep.sum()), 0]
    assert [n for _, n in _runs(s2.input_ids[1], image_id)] == [int(np.prod(qwen.visual_grid(*images[3].size)))]
    # each crop between its own vision-start / vision-end
    vs, ve = model.config.vision_start_token_id, model.config.vision_end_token_id
    for start, n in runs:
        assert s2.input_ids[0, start - 1] == vs and s2.input_ids[0, start + n] == ve

    # independent encodings: the original view alone, and the crop as an image of its own
    with torch.no_grad():
        enc = qwen.encode_images([image])
        orig = model.get_image_features(**enc).pooler_output[0]
        enc = qwen.encode_images([image.crop(box)])
        assert enc["image_grid_thw"][0, 1:].tolist() == [g * qwen.merge for g in grid]
        crop_feats = model.get_image_features(**enc).pooler_output[0]
    flat = torch.from_numpy(keep.reshape(-1))
    (o_start, o_n), (c_start, c_n) = runs
    torch.testing.assert_close(s2.inputs_embeds[0, o_start : o_start + o_n], orig, rtol=0, atol=1e-6)
    torch.testing.assert_close(s2.inputs_embeds[0, c_start : c_start + c_n], crop_feats[flat], rtol=0, atol=1e-6)
    dist = torch.cdist(crop_feats[~flat], s2.inputs_embeds[0])
    assert dist.min() > 1e-4  # no dropped crop token leaks in

    # positions: the full crop's, with the dropped tokens' columns removed; nothing else moves
    row_full = full.attention_mask[0].bool()
    row = s2.attention_mask[0].bool()
    kept_full = torch.ones(int(row_full.sum()), dtype=torch.bool)
    f_start = _runs(full.input_ids[0][row_full], image_id)[1][0]
    kept_full[f_start : f_start + flat.numel()] = flat
    pos_full = full.position_ids[:, 0][:, row_full]
    pos = s2.position_ids[:, 0][:, row]
    assert torch.equal(pos, pos_full[:, kept_full])
    # a kept crop token (r, c) sits at (start, start + r, start + c); text after the crop at start + max(grid)
    start = int(pos_full[0, f_start])
    r, c = np.nonzero(keep)
    local = c_start - int((~row).sum())
    crop_pos = pos[:, local : local + c_n]
    assert torch.equal(crop_pos[0], torch.full((c_n,), start))
    assert crop_pos[1].tolist() == (start + r).tolist() and crop_pos[2].tolist() == (start + c).tolist()
    assert int(pos[0, local + c_n]) == start + max(grid)  # <|vision_end|>

    # decoding continues each row from its last position (the model's rope deltas), checked teacher-forced
    with torch.no_grad():
        gen = model.generate(
            **s2.model_inputs(),
            do_sample=False,
            max_new_tokens=4,
            pad_token_id=qwen.pad_token_id,
            eos_token_id=qwen.eos_token_ids,
            output_logits=True,
            return_dict_in_generate=True,
        )
        resp = gen.sequences[:1]  # row 0 (row 1's tail may be padding after its EOS)
        n = resp.shape[1]
        embeds = torch.cat([s2.inputs_embeds[:1], model.get_input_embeddings()(resp)], dim=1)
        last = s2.position_ids[:, :1, -1:]
        positions = torch.cat([s2.position_ids[:, :1], last + torch.arange(1, n + 1).view(1, 1, -1)], dim=-1)
        mask = torch.cat([s2.attention_mask[:1], torch.ones_like(resp)], dim=1)
        forced = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[0]
    seq = s2.input_ids.shape[1]
    step = torch.stack([lg[0] for lg in gen.logits])
    torch.testing.assert_close(forced[seq - 1 : seq - 1 + n], step, rtol=1e-4, atol=1e-4)


# --- end to end: two_stage_batch -----------------------------------------------------------------------


def _maps(grids: list[tuple[int, int]]) -> list[np.ndarray]:
    maps = [np.zeros(g) for g in grids]
    maps[0][0:2, 0:2] = 0.9  # one block
    gh, gw = grids[1]
    maps[1][0, 0:2] = 0.9  # two small components far apart: grown, and a holey enclosing mask
    maps[1][gh - 1, gw - 2 : gw] = 0.9
    # grids[2]: nothing
    maps[3][0:2, 1:4] = 0.9
    return maps


def test_no_region_answers_like_the_baseline(qwen):
    images = aspect_images()
    base = decode_batch(qwen, images, QUESTIONS, max_new_tokens=5)
    maps = [np.zeros(g) for g in _grids(qwen)]
    rows, rois = two_stage_batch(qwen, images, QUESTIONS, maps, RoIParams(), max_new_tokens=5)
    assert not any(r.found for r in rois)
    assert [r["response_token_ids"] for r in rows] == [r["response_token_ids"] for r in base]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in base]
    assert all(r["crop_boxes"] == [] and r["n_crop_tokens"] == 0 for r in rows)


@pytest.mark.parametrize("mode", ["masked", "box"])
def test_batched_equals_one_by_one(qwen, mode):
    images = aspect_images(2)
    params = RoIParams(smooth_sigma=0.0, tau=0.5, mode=mode)
    maps = _maps(_grids(qwen))
    batched, rois = two_stage_batch(qwen, images, QUESTIONS, lambda ims, qs: maps, params, max_new_tokens=5)
    assert [len(r["crop_boxes"]) for r in batched] == ([1, 1, 0, 1] if mode == "masked" else [1, 2, 0, 1])
    if mode == "masked":  # the two-component sample keeps only part of its enclosing crop
        (crop,) = crops_from_roi(rois[1], qwen, *images[1].size, "masked")
        assert 0 < batched[1]["n_crop_tokens"] == int(crop.keep.sum()) < crop.keep.size
    for i in range(len(images)):
        (single,), _ = two_stage_batch(qwen, [images[i]], [QUESTIONS[i]], [maps[i]], params, max_new_tokens=5)
        assert single["response_token_ids"] == batched[i]["response_token_ids"]
        assert single["crop_boxes"] == batched[i]["crop_boxes"]
        assert single["n_crop_tokens"] == batched[i]["n_crop_tokens"]
    base = decode_batch(qwen, [images[2]], [QUESTIONS[2]], max_new_tokens=5)
    assert batched[2]["response_token_ids"] == base[0]["response_token_ids"]


# --- stage 2 takes the original views' visual tokens from stage 1 -------------------------------------------


def test_stage1_features_are_the_vision_towers_and_stage2_skips_the_originals(qwen):
    """With stage 1's visual tokens, stage 2 runs the tower over the crops only, and builds the same inputs."""
    from pipeline.inference.evaluate import rpn_maps
    from pipeline.inference.two_stage import Stage1Output
    from pipeline.student.rpn import RPN

    images = aspect_images(4)
    rpn = RPN.from_base(qwen, 1, 1).eval()
    out = rpn_maps(rpn, reuse_prefix=True)(images, QUESTIONS)
    assert out.prefix is None and len(out.features) == len(images)
    assert rpn_maps(rpn)(images, QUESTIONS).features is None
    # independent reference: the vision tower on each image alone
    for im, f, (h, w) in zip(images, out.features, _grids(qwen), strict=True):
        enc = qwen.encode_images([im])
        with torch.no_grad():
            ref = qwen.model.get_image_features(
                pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]
            ).pooler_output[0]
        assert f.shape[0] == h * w
        torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-5)

    crops = [[Crop((0, 0, 40, 40))], [], [Crop((10, 5, 80, 60))], [Crop((0, 0, 84, 28)), Crop((20, 10, 100, 50))]]
    seen = []
    hook = qwen.model.model.visual.register_forward_hook(
        lambda m, a, kw, o: seen.append(len(kw["grid_thw"])), with_kwargs=True
    )
    try:
        plain = build_stage2_inputs(qwen, images, QUESTIONS, crops)
        reused = build_stage2_inputs(qwen, images, QUESTIONS, crops, original_features=out.features)
    finally:
        hook.remove()
    assert seen == [len(images) + 4, 4]  # the second call encodes the four crops only
    assert reused.input_ids.tolist() == plain.input_ids.tolist()
    torch.testing.assert_close(reused.position_ids, plain.position_ids, rtol=0, atol=0)
    torch.testing.assert_close(reused.image_grid_thw, plain.image_grid_thw, rtol=0, atol=0)
    torch.testing.assert_close(reused.inputs_embeds, plain.inputs_embeds, rtol=1e-5, atol=1e-5)

    params = RoIParams(smooth_sigma=0.0, tau=0.5, mode="masked")
    maps = _maps(_grids(qwen))
    a, _ = two_stage_batch(qwen, images, QUESTIONS, maps, params, max_new_tokens=5)
    b, _ = two_stage_batch(qwen, images, QUESTIONS, Stage1Output(maps, features=out.features), params, 5)
    assert [r["response_token_ids"] for r in a] == [r["response_token_ids"] for r in b]
    assert [r["n_crop_tokens"] for r in a] == [r["n_crop_tokens"] for r in b]
    with pytest.raises(ValueError, match="image 1: .* stage-1 visual tokens"):
        build_stage2_inputs(
            qwen, images, QUESTIONS, crops, original_features=[out.features[0], out.features[1][:-1], *out.features[2:]]
        )
