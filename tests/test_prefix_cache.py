"""Stage 2 from stage 1's prefix cache gives what the plain stage 2 gives (pipeline.inference.prefix_cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.prefix_cache import prefix_generate_inputs
from pipeline.inference.roi import RoIParams
from pipeline.inference.two_stage import Crop, Stage1Output, build_stage2_inputs, two_stage_batch
from pipeline.models import wrap_model
from pipeline.models.base import Stage2Inputs
from pipeline.student.rpn import RPN
from tests.conftest import WORDS, random_images
from toymodels.llava import ToyLlavaSizes, build_toy_llava

# different question lengths, so both stages pad their rows differently
QUESTIONS = ["what is in the red box ?", "a b", "what colour is the shape in the blue box ?", "c", "what is a"]
CROPS = [
    [Crop((0, 0, 32, 32))],  # a whole-grid crop
    [],  # no region: the baseline prompt
    [Crop((10, 5, 50, 40), keep=np.eye(4, dtype=bool))],  # masked: 4 of 16 tokens
    [Crop((0, 0, 20, 20)), Crop((5, 5, 60, 30))],  # box upscaling, two crops
    [Crop((3, 3, 40, 40), keep=np.array([[True] + [False] * 3] + [[False] * 4] * 3))],  # one token
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def reuse_adapter(request):
    model, processor = build_toy_llava(WORDS, ToyLlavaSizes(text_kv_heads=2), seed=3)
    model.set_attn_implementation(request.param)
    return wrap_model(model, processor, "toy")


def _scores(adapter, kwargs: dict, steps: int) -> tuple[list[list[int]], torch.Tensor]:
    out = adapter.model.generate(
        **kwargs,
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,  # keep every step's scores comparable
        pad_token_id=adapter.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences.tolist(), torch.stack(out.scores, 1)


@pytest.mark.parametrize("B", [1, 2])
def test_prefix_reuse_matches_plain_stage2(reuse_adapter, B):
    adapter = reuse_adapter
    images = random_images(len(QUESTIONS), seed=5)
    rpn = RPN.from_base(adapter, B, 4 - B).eval()
    batch = adapter.build_batch(images, [adapter.render_prompt(q) for q in QUESTIONS]).to(adapter.device)
    logits, state = rpn.stage1(batch)
    torch.testing.assert_close(logits, rpn(batch))  # keeping the cache changes nothing in stage 1

    plain = build_stage2_inputs(adapter, images, QUESTIONS, CROPS)
    blind = build_stage2_inputs(adapter, images, QUESTIONS, CROPS, encode_originals=False)
    assert not torch.allclose(plain.inputs_embeds, blind.inputs_embeds)  # the original view really is left out
    reused = prefix_generate_inputs(adapter, state, blind)
    seq_a, scores_a = _scores(adapter, plain.model_inputs(), 6)
    seq_b, scores_b = _scores(adapter, reused, 6)
    assert seq_a == seq_b
    torch.testing.assert_close(scores_a, scores_b, atol=1e-4, rtol=1e-4)


def test_two_stage_batch_same_answers_with_and_without_reuse(reuse_adapter):
    adapter = reuse_adapter
    images = random_images(len(QUESTIONS), seed=9)
    rpn = RPN.from_base(adapter, 2, 2).eval()
    params = RoIParams(smooth_sigma=0.0, tau=0.5)
    maps = rpn_maps(rpn)(images, QUESTIONS)
    with_cache = rpn_maps(rpn, reuse_prefix=True)(images, QUESTIONS)
    assert maps.prefix is None and with_cache.prefix is not None
    for a, b in zip(maps.maps, with_cache.maps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a map per sample with a region of its own shape, and one sample without any
    fixed = [np.zeros((4, 4)) for _ in QUESTIONS]
    fixed[0][1:3, 1:3] = 0.9
    fixed[2][0, 0:3] = 0.9
    fixed[3][2:4, 0:2] = 0.9
    fixed[4][0:4, 3] = 0.9
    for mode in ("masked", "box"):
        p = RoIParams(smooth_sigma=0.0, tau=0.5, mode=mode)
        rows_a, _ = two_stage_batch(adapter, images, QUESTIONS, fixed, p, max_new_tokens=5)
        rows_b, _ = two_stage_batch(
            adapter, images, QUESTIONS, Stage1Output(fixed, with_cache.prefix), p, max_new_tokens=5
        )
        assert [r["response_token_ids"] for r in rows_a] == [r["response_token_ids"] for r in rows_b]
        assert [r["crop_boxes"] for r in rows_a] == [r["crop_boxes"] for r in rows_b]
        assert sum(bool(r["crop_boxes"]) for r in rows_a) == 4
    rows_c, _ = two_stage_batch(adapter, images, QUESTIONS, rpn_maps(rpn, reuse_prefix=True), params, 5)
    rows_d, _ = two_stage_batch(adapter, images, QUESTIONS, rpn_maps(rpn), params, 5)
    assert [r["response_token_ids"] for r in rows_c] == [r["response_token_ids"] for r in rows_d]


def test_a_stage2_row_that_does_not_start_with_the_prefix_is_refused(reuse_adapter):
    adapter = reuse_adapter
    images = random_images(2, seed=1)
    rpn = RPN.from_base(adapter, 1, 2).eval()
    batch = adapter.build_batch(images, [adapter.render_prompt(q) for q in QUESTIONS[:2]]).to(adapter.device)
    _, state = rpn.stage1(batch)
    inputs = build_stage2_inputs(adapter, images, QUESTIONS[:2], [[], []], encode_originals=False)
    ids = inputs.input_ids.clone()
    ids[1, -ids.shape[1] + int((inputs.attention_mask[1] == 0).sum()) + 1] += 1  # second real token of row 1
    bad = Stage2Inputs(ids, inputs.inputs_embeds, inputs.attention_mask, inputs.prompts, inputs.crops, [0, 0])
    with pytest.raises(ValueError, match="batch row 1"):
        prefix_generate_inputs(adapter, state, bad)
