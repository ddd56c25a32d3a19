"""Grid <-> source geometry, crops from an RoI, and stage-2 inference on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.roi import RoI, RoIParams, postprocess
from pipeline.inference.two_stage import (
    Crop,
    build_stage2_inputs,
    crops_from_roi,
    generate_with_crops,
    masked_keep,
    two_stage_batch,
)
from pipeline.models.geometry import (
    ViewSpec,
    grid_box_to_source,
    grid_frame,
    source_box_to_grid,
    source_box_to_span,
)
from pipeline.teacher.decode import decode_batch
from tests.conftest import random_images

QUESTIONS = ["what is in the red box ?", "what is in the box ?", "a b c", "what colour is the shape ?", "a b"]
G = (4, 4)  # the toy model's grid: 64 px view, 16 px patches


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# --- geometry --------------------------------------------------------------------------------


def test_grid_to_source_square_and_padded():
    # square 64 x 64: 16 px per token, no padding
    assert grid_box_to_source((1, 2, 2, 3), G, 64, 64) == (32, 16, 64, 48)
    # wide 90 x 50: padded to 90 x 90 with 20 rows on top; 22.5 px per token
    assert grid_box_to_source((1, 0, 2, 1), G, 90, 50) == (0, 2, 45, 48)  # y 2.5 .. 47.5 -> 2 .. 48
    assert grid_box_to_source((0, 3, 0, 3), G, 90, 50) == (67, 0, 90, 3)  # top row is mostly padding
    assert grid_box_to_source((3, 0, 3, 3), G, 90, 50) == (0, 47, 90, 50)
    # tall 40 x 80: 20 columns of padding on the left; 20 px per token
    assert grid_box_to_source((0, 1, 3, 2), G, 40, 80) == (0, 0, 40, 80)
    x0, _, x1, _ = grid_box_to_source((0, 0, 3, 0), G, 40, 80)
    assert x1 <= x0  # wholly in padding: empty
    # odd difference 47 x 33: (47 - 33) // 2 = 7 rows on top; 11.75 px per token
    assert grid_box_to_source((1, 3, 1, 3), G, 47, 33) == (35, 4, 47, 17)  # y 4.75 .. 16.5


def test_grid_to_source_plain_resize_and_centre_crop():
    # plain resize of 90 x 50: 22.5 x 12.5 px per token
    assert grid_box_to_source((1, 1, 2, 2), G, 90, 50, False) == (22, 12, 68, 38)
    # shortest edge 64 + centre crop 64 (CLIP-style): 90 x 50 -> 115 x 64, crop from x = 25;
    # in source pixels the grid spans x 19.565 .. 69.652, 12.52 px per token
    clip = ViewSpec(pad_to_square=False, shortest_edge=64, crop_hw=(64, 64))
    assert grid_box_to_source((0, 0, 3, 0), G, 90, 50, clip) == (19, 0, 33, 50)
    assert grid_box_to_source((0, 3, 3, 3), G, 90, 50, clip) == (57, 0, 70, 50)
    assert source_box_to_grid((0, 0, 10, 10), G, 90, 50, clip) is None  # cut away by the crop


def test_source_to_grid():
    assert source_box_to_grid((0, 0, 64, 64), G, 64, 64) == (0, 0, 3, 3)
    assert source_box_to_grid((16, 16, 32, 32), G, 64, 64) == (1, 1, 1, 1)  # far edges exclusive
    assert source_box_to_grid((15.5, 16, 32.5, 32), G, 64, 64) == (1, 0, 1, 2)
    # wide 90 x 50 (20 px top padding, 22.5 px tokens)
    assert source_box_to_grid((0, 0, 22.5, 2.5), G, 90, 50) == (0, 0, 0, 0)
    assert source_box_to_grid((10, 3, 50, 30), G, 90, 50) == (1, 0, 2, 2)
    assert source_box_to_grid((-5, -5, 200, 200), G, 90, 50) == (0, 0, 3, 3)  # clipped to the image
    assert source_box_to_grid((10, 10, 10, 20), G, 90, 50) is None
    # plain resize: 22.5 x 12.5 px tokens
    assert source_box_to_grid((10, 3, 50, 30), G, 90, 50, False) == (0, 0, 2, 2)
    assert source_box_to_span((22.5, 12.5, 45, 50), G, 90, 50, False) == (1.0, 1.0, 4.0, 2.0)
    assert source_box_to_span((0, 0, 90, 50), G, 90, 50) == pytest.approx((20 / 22.5, 0.0, 70 / 22.5, 4.0))


def test_round_trip_covers_the_tokens_and_at_most_one_more():
    rng = np.random.default_rng(3)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(5, 300, 2))
        view = bool(rng.integers(0, 2))
        y0, x0 = (int(v) for v in rng.integers(0, 4, 2))
        y1, x1 = int(rng.integers(y0, 4)), int(rng.integers(x0, 4))
        box = grid_box_to_source((y0, x0, y1, x1), G, w, h, view)
        f = grid_frame(w, h, view)
        # tokens of the box whose cell holds image pixels (the rest is padding)
        ys = [y for y in range(y0, y1 + 1) if f.y0 + y * f.h / 4 < h and f.y0 + (y + 1) * f.h / 4 > 0]
        xs = [x for x in range(x0, x1 + 1) if f.x0 + x * f.w / 4 < w and f.x0 + (x + 1) * f.w / 4 > 0]
        if not ys or not xs:
            assert box[2] <= box[0] or box[3] <= box[1]
            continue
        back = source_box_to_grid(box, G, w, h, view)
        assert back is not None
        assert back[0] <= ys[0] and back[1] <= xs[0] and back[2] >= ys[-1] and back[3] >= xs[-1]
        # whole-pixel rounding reaches at most one token further
        assert back[0] >= y0 - 1 and back[1] >= x0 - 1 and back[2] <= y1 + 1 and back[3] <= x1 + 1


@pytest.mark.parametrize("size", [(90, 50), (47, 33), (40, 80), (33, 47), (64, 64)])
def test_padding_offsets_match_the_processor(toy, size):
    """Where LlavaImageProcessorPil puts a black image inside its mean-colour padding = the frame's offset."""
    _, processor = toy
    w, h = size
    out = processor.image_processor(
        Image.new("RGB", size), do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False
    )["pixel_values"][0]
    ys, xs = np.nonzero(np.asarray(out)[0] == 0)
    f = grid_frame(w, h, True)
    assert (xs.min(), ys.min()) == (-f.x0, -f.y0)
    assert (xs.max() + 1, ys.max() + 1) == (w - f.x0, h - f.y0)


def test_adapter_reads_view_from_processor(adapter):
    assert adapter.view_spec == ViewSpec(pad_to_square=True, shortest_edge=64, crop_hw=(64, 64))
    assert adapter.source_box((1, 0, 2, 1), 90, 50) == (0, 2, 45, 48)
    assert adapter.grid_box((10, 3, 50, 30), 90, 50) == (1, 0, 2, 2)
    assert adapter.grid_span((0, 0, 90, 50), 90, 50) == source_box_to_span((0, 0, 90, 50), G, 90, 50)


# --- crops ------------------------------------------------------------------------------------


def test_masked_keep_resizes_the_box_nearest():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = [[True, False], [True, True]]
    mask[0, 3] = True  # outside the box: ignored
    keep = masked_keep(mask, (1, 1, 2, 2), (4, 4))
    np.testing.assert_array_equal(keep, np.kron(mask[1:3, 1:3], np.ones((2, 2), dtype=bool)))
    np.testing.assert_array_equal(masked_keep(mask, (0, 0, 3, 3), (4, 4)), mask)


def test_masked_crop_follows_the_clipped_crop():
    """On a padded image the crop loses the padding; the keep-mask follows what the crop really shows."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 1:3] = True  # row 0 is 20 of 22.5 px padding on a 90 x 50 image
    mask[1, 1] = True
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(0, 1, 1, 2)], enclosing=(0, 1, 1, 2))
    (crop,) = crops_from_roi(roi, _GeomAdapter(), 90, 50, "masked")
    assert crop.box == (22, 0, 68, 25)
    # crop rows span grid y 0.89 .. 2.0 (all centres in row 1); columns x 0.98 .. 3.02 -> 1, 1, 2, 2
    np.testing.assert_array_equal(crop.keep, np.array([[True, True, False, False]] * 4))


def test_box_crops_drop_padding_only_boxes():
    mask = np.zeros((4, 4), dtype=bool)
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(1, 0, 2, 1), (0, 3, 0, 3)], enclosing=(0, 0, 2, 3))
    crops = crops_from_roi(roi, _GeomAdapter(), 90, 50, "box")
    assert [c.box for c in crops] == [(0, 2, 45, 48), (67, 0, 90, 3)]
    assert all(c.keep is None for c in crops)
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(0, 0, 3, 0), (0, 1, 1, 1)], enclosing=(0, 0, 3, 1))
    assert [c.box for c in crops_from_roi(roi, _GeomAdapter(), 40, 80, "box")] == [(0, 0, 20, 40)]


class _GeomAdapter:
    """Just the geometry of the toy LLaVA (pad to square, 4 x 4 grid)."""

    def source_box(self, grid_box, width, height):
        return grid_box_to_source(grid_box, G, width, height, True)

    def grid_span(self, source_box, width, height):
        return source_box_to_span(source_box, G, width, height, True)

    def visual_grid(self, width, height):
        return G

    def crop_grid(self, width, height):
        return G


# --- stage 2 on the tiny model -----------------------------------------------------------------


def _runs(ids: torch.Tensor, image_id: int) -> list[int]:
    """Lengths of the consecutive image-token runs in one row."""
    runs, n = [], 0
    for t in ids.tolist() + [-1]:
        if t == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("index", [0, 4])  # 64 x 64 and 96 x 96
def test_full_crop_of_square_image_equals_processor_with_two_images(adapter, index):
    """The embedded model saw crops as a second image; a full crop must reproduce that input exactly."""
    model, processor = adapter.model, adapter.processor
    image = random_images(5)[index]
    question = QUESTIONS[0]
    enc = processor(images=[image, image], text=[adapter.render_prompt(question, n_images=2)], return_tensors="pt")
    inputs = build_stage2_inputs(adapter, [image], [question], [[Crop((0, 0, image.width, image.height))]])
    assert inputs.input_ids[0].tolist() == enc["input_ids"][0].tolist()
    with torch.no_grad():
        expected = model(**enc).logits
        got = model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_full_crop_token_sequence_for_non_square_image(adapter):
    image = random_images(2)[1]  # 90 x 50
    enc = adapter.processor(images=[image, image], text=[adapter.render_prompt("a b", n_images=2)])
    inputs = build_stage2_inputs(adapter, [image], ["a b"], [[Crop((0, 0, 90, 50))]])
    assert inputs.input_ids[0].tolist() == list(enc["input_ids"][0])


def test_masked_upscaling_keeps_exactly_the_masked_tokens(adapter):
    model, processor = adapter.model, adapter.processor
    image = noise(64, 64, seed=5)
    prob = np.zeros((4, 4))
    prob[1, 1] = prob[1, 2] = prob[2, 1] = prob[3, 1] = 0.9  # an L of 4 tokens: no growth
    params = RoIParams(smooth_sigma=0.0, tau=0.5, mode="masked")
    roi = postprocess(prob, params)
    (crop,) = crops_from_roi(roi, adapter, 64, 64, "masked")
    assert crop.box == (16, 16, 48, 64)
    expected_keep = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(crop.keep, expected_keep)

    inputs = build_stage2_inputs(adapter, [image, noise(50, 70, seed=6)], ["a b", "what is in the box ?"], [[crop], []])
    image_id = model.config.image_token_id
    # the toy tokenizer drops the template's newline, so the crop's 10 tokens directly follow the 16 original ones
    assert _runs(inputs.input_ids[0], image_id) == [16 + 10]
    assert _runs(inputs.input_ids[1], image_id) == [16]
    # independent crop features: PIL stretch to the 64 px view, the processor's defaults, the model's encoder
    view = image.crop(crop.box).resize((64, 64), Image.Resampling.BICUBIC)
    with torch.no_grad():
        full = model.get_image_features(
            pixel_values=processor.image_processor([view], return_tensors="pt")["pixel_values"]
        ).pooler_output[0]
        orig = model.get_image_features(
            pixel_values=processor.image_processor([image], return_tensors="pt")["pixel_values"]
        ).pooler_output[0]
    pos = (inputs.input_ids[0] == image_id).nonzero().flatten()
    torch.testing.assert_close(inputs.inputs_embeds[0, pos[:16]], orig, rtol=0, atol=0)
    torch.testing.assert_close(
        inputs.inputs_embeds[0, pos[16:]], full[torch.from_numpy(expected_keep.reshape(-1))], rtol=0, atol=0
    )
    # and nothing else of the crop leaks in: the dropped rows appear nowhere in the sequence
    dropped = full[~torch.from_numpy(expected_keep.reshape(-1))]
    dist = torch.cdist(dropped, inputs.inputs_embeds[0])
    assert dist.min() > 1e-4


def test_no_region_answers_like_the_baseline(adapter):
    images = random_images(4)
    questions = QUESTIONS[:4]
    base = decode_batch(adapter, images, questions, max_new_tokens=6)
    rows, rois = two_stage_batch(adapter, images, questions, [np.zeros(G)] * 4, RoIParams(), max_new_tokens=6)
    assert not any(r.found for r in rois)
    assert [r["response_token_ids"] for r in rows] == [r["response_token_ids"] for r in base]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in base]
    assert all(r["crop_boxes"] == [] and r["n_crop_tokens"] == 0 for r in rows)


def _maps() -> list[np.ndarray]:
    maps = [np.zeros(G) for _ in range(5)]
    maps[0][1:3, 1:3] = 0.9
    maps[2][0, 0:2] = 0.9
    maps[2][3, 2:4] = 0.9
    maps[3][1:4, 0] = 0.9
    maps[3][0, 2:4] = 0.9
    maps[4][2, 2] = 0.9  # a single token: dropped, so no region
    return maps


@pytest.mark.parametrize("mode", ["masked", "box"])
def test_batched_equals_one_by_one(adapter, mode):
    images = random_images(5)
    params = RoIParams(smooth_sigma=0.0, tau=0.5, mode=mode)
    maps = _maps()
    batched, rois = two_stage_batch(adapter, images, QUESTIONS, lambda ims, qs: maps, params, max_new_tokens=5)
    assert [len(r["crop_boxes"]) for r in batched] == ([1, 0, 1, 1, 0] if mode == "masked" else [1, 0, 2, 2, 0])
    assert len({r["n_crop_tokens"] for r in batched}) >= 3  # rows of different lengths share the batch
    for i in range(5):
        (single,), _ = two_stage_batch(adapter, [images[i]], [QUESTIONS[i]], [maps[i]], params, max_new_tokens=5)
        assert single["response_token_ids"] == batched[i]["response_token_ids"]
        assert single["crop_boxes"] == batched[i]["crop_boxes"]
    # samples without a region inside a mixed batch still get the baseline answer
    base = decode_batch(adapter, [images[1], images[4]], [QUESTIONS[1], QUESTIONS[4]], max_new_tokens=5)
    assert [batched[1]["response_token_ids"], batched[4]["response_token_ids"]] == [
        r["response_token_ids"] for r in base
    ]


def test_crops_change_what_the_model_sees(adapter):
    """Sanity: crop tokens do reach the model (the answer's logits move)."""
    image = random_images(1)[0]
    plain = build_stage2_inputs(adapter, [image], ["a b"], [[]])
    crop = build_stage2_inputs(adapter, [image], ["a b"], [[Crop((0, 0, 32, 32))]])
    with torch.no_grad():
        a = adapter.model(inputs_embeds=plain.inputs_embeds, attention_mask=plain.attention_mask).logits[0, -1]
        b = adapter.model(inputs_embeds=crop.inputs_embeds, attention_mask=crop.attention_mask).logits[0, -1]
    assert not torch.allclose(a, b)
    rows = generate_with_crops(adapter, [image], ["a b"], [[Crop((0, 0, 32, 32))]], max_new_tokens=3)
    assert rows[0]["crop_boxes"] == [[0, 0, 32, 32]] and rows[0]["n_crop_tokens"] == 16
