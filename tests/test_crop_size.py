"""LLaVA's ``crop_size``: stage-2 crops re-encoded at another square size (fewer or more crop tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.roi import RoIParams, postprocess
from pipeline.inference.two_stage import Crop, build_stage2_inputs, crop_grid, crops_from_roi, two_stage_batch
from pipeline.models import wrap_model
from pipeline.student.rpn import RPN
from tests.conftest import random_images
from tests.test_two_stage import _runs, noise

# the toy model: a 64 px base view, 16 px patches, a 4 x 4 grid


@pytest.fixture(scope="module")
def sized(toy):
    """The session's toy model wrapped three times: crops at 32 px (2 x 2), the base 64 px, and 128 px (8 x 8)."""
    model, processor = toy
    return {s: wrap_model(model, processor, "toy", crop_size=s) for s in (32, 64, 128)}


def test_crop_size_must_be_a_multiple_of_the_patch(toy):
    for bad in (0, 24, -16):
        with pytest.raises(ValueError, match="multiple of the patch size 16"):
            wrap_model(*toy, "toy", crop_size=bad)


def test_crop_grid_follows_crop_size_and_the_map_grid_does_not(sized, adapter):
    assert crop_grid(adapter, (0, 0, 30, 50)) == (4, 4)
    assert [crop_grid(sized[s], (0, 0, 30, 50)) for s in (32, 64, 128)] == [(2, 2), (4, 4), (8, 8)]
    assert all(a.visual_grid(90, 50) == (4, 4) for a in sized.values())  # stage 1 is untouched


def test_base_view_crop_size_is_the_default(sized, adapter):
    images = random_images(3, seed=2)
    crops = [[Crop((0, 0, 40, 40))], [], [Crop((5, 5, 50, 30), keep=np.eye(4, dtype=bool))]]
    qs = ["a b", "what is in the box ?", "c"]
    a = build_stage2_inputs(adapter, images, qs, crops)
    b = build_stage2_inputs(sized[64], images, qs, crops)
    assert a.input_ids.tolist() == b.input_ids.tolist()
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, rtol=0, atol=0)


@pytest.mark.parametrize("size", [32, 128])
def test_masked_crop_on_a_resized_grid_keeps_exactly_its_tokens(sized, size):
    adapter = sized[size]
    model, processor = adapter.model, adapter.processor
    image = noise(64, 64, seed=5)
    prob = np.zeros((4, 4))
    prob[1, 1] = prob[1, 2] = prob[2, 1] = prob[3, 1] = 0.9  # an L of 4 tokens
    roi = postprocess(prob, RoIParams(smooth_sigma=0.0, tau=0.5, mode="masked"))
    (crop,) = crops_from_roi(roi, adapter, 64, 64, "masked")
    assert crop.box == (16, 16, 48, 64)
    side = size // 16
    # crop-token centres over the box's grid rows 1..3 and columns 1..2 (nearest-exact), worked out by hand
    src_rows, src_cols = {2: ([1, 3], [1, 2]), 8: ([1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2])}[side]
    expected = prob[np.ix_(src_rows, src_cols)] > 0.5
    np.testing.assert_array_equal(crop.keep, expected)

    inputs = build_stage2_inputs(adapter, [image], ["a b"], [[crop]])
    image_id = model.config.image_token_id
    assert _runs(inputs.input_ids[0], image_id) == [16 + int(expected.sum())]
    # independent crop features: PIL stretch to size px, normalise only, the vision tower with interpolated positions
    view = image.crop(crop.box).resize((size, size), Image.Resampling.BICUBIC)
    pixels = processor.image_processor([view], do_resize=False, do_center_crop=False, return_tensors="pt")
    assert pixels["pixel_values"].shape[-2:] == (size, size)
    with torch.no_grad():
        full = model.get_image_features(
            pixel_values=pixels["pixel_values"], interpolate_pos_encoding=True
        ).pooler_output[0]
    assert full.shape[0] == side * side
    pos = (inputs.input_ids[0] == image_id).nonzero().flatten()
    torch.testing.assert_close(
        inputs.inputs_embeds[0, pos[16:]], full[torch.from_numpy(expected.reshape(-1))], rtol=1e-5, atol=1e-5
    )


def test_smaller_crops_answer_batched_and_with_prefix_reuse_like_one_by_one(sized):
    adapter = sized[32]
    images = random_images(4, seed=7)
    qs = ["what is in the red box ?", "a b", "what colour is the shape ?", "c"]
    maps = [np.zeros((4, 4)) for _ in qs]
    maps[0][0, 0:3] = maps[0][1, 0] = 0.9  # an L of 4 (no growth) on the square image: 3 of the 2 x 2 crop tokens
    maps[2][1:3, 1:3] = 0.9
    maps[3][2:4, 0:2] = 0.9
    params = RoIParams(smooth_sigma=0.0, tau=0.5, mode="masked")
    rows, _ = two_stage_batch(adapter, images, qs, maps, params, max_new_tokens=4)
    assert [r["n_crop_tokens"] for r in rows] == [3, 0, 4, 4]  # on the 2 x 2 crop grid
    for i in range(4):
        (one,), _ = two_stage_batch(adapter, [images[i]], [qs[i]], [maps[i]], params, max_new_tokens=4)
        assert one["response_token_ids"] == rows[i]["response_token_ids"]
    rpn = RPN.from_base(adapter, 1, 1).eval()
    a, _ = two_stage_batch(adapter, images, qs, rpn_maps(rpn, reuse_prefix=True), RoIParams(tau=0.5), 4)
    b, _ = two_stage_batch(adapter, images, qs, rpn_maps(rpn), RoIParams(tau=0.5), 4)
    assert [r["response_token_ids"] for r in a] == [r["response_token_ids"] for r in b]
    assert [r["n_crop_tokens"] for r in a] == [r["n_crop_tokens"] for r in b]
