"""The paper's padded square views (issue 13): Qwen2.5-VL ``resolution: {mode: fixed, pad: true}`` and LLaVA
``pad_to_square: true``. Hand-worked geometry on wide and tall images, the padded images against an
independent PIL construction, the reference's padding-token rule, and stage-2 crops through the pad."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelParams
from pipeline.inference.roi import RoI
from pipeline.inference.two_stage import build_stage2_inputs, crops_from_roi
from pipeline.models import wrap_model
from pipeline.models.geometry import ViewSpec, padding_token_mask
from pipeline.models.qwen2_5_vl import Resolution
from tests.conftest import WORDS
from toymodels.qwen import build_toy_qwen

PAD = {"mode": "fixed", "size": 112, "pad": True}  # 4 x 4 merged tokens of 28 px


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def by_hand(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The reference expand2square, written out: a square of ``fill``, the image pasted centred (floor offsets)."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@pytest.fixture(scope="module")
def qwen_pad():
    model, processor = build_toy_qwen(WORDS, seed=0)
    return wrap_model(model, processor, "toy-qwen", resolution=PAD)


@pytest.fixture(scope="module")
def llava_pad(toy):
    """The toy LLaVA with a CLIP-like processor (no pad, short side + centre crop) and the reference pad on top."""
    model, processor = toy
    clip_like = copy.deepcopy(processor)
    clip_like.image_processor.do_pad = False
    return wrap_model(model, clip_like, "toy", pad_to_square=True), wrap_model(model, clip_like, "toy")


# --- Qwen2.5-VL fixed + pad -------------------------------------------------------------------------


def test_qwen_padded_image_is_the_reference_square(qwen_pad):
    ip = qwen_pad.processor.image_processor
    for w, h in ((160, 80), (80, 160), (97, 40)):
        image = noise(w, h)
        padded = qwen_pad.view_image(image)
        assert padded.size == (max(w, h),) * 2
        assert np.array_equal(np.asarray(padded), np.asarray(by_hand(image, (127, 127, 127))))
        ref = ip([by_hand(image, (127, 127, 127)).resize((112, 112), Image.Resampling.BICUBIC)], do_resize=False)
        got = qwen_pad.encode_images([image])
        assert torch.equal(got["pixel_values"], torch.as_tensor(ref["pixel_values"]))
        assert got["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert qwen_pad.view_spec == ViewSpec(pad_to_square=True)
    plain = wrap_model(qwen_pad.model, qwen_pad.processor, "toy-qwen", resolution={"mode": "fixed", "size": 112})
    assert plain.view_spec == ViewSpec(pad_to_square=False) and plain.padding_tokens(160, 80) is None


def test_qwen_pad_geometry_wide_and_tall(qwen_pad):
    """160 x 80 sits on a 160 px square 40 px down; tokens are 40 px. The tall image is its transpose."""
    a = qwen_pad
    # wide: GT (50, 10, 90, 30) is (50, 50, 90, 70) on the square -> row 1, columns 1..2
    assert a.grid_box((50, 10, 90, 30), 160, 80) == (1, 1, 1, 2)
    assert a.grid_span((50, 10, 90, 30), 160, 80) == (1.25, 1.25, 1.75, 2.25)
    assert a.source_box((1, 1, 2, 2), 160, 80) == (40, 0, 120, 80)
    assert a.source_box((0, 0, 3, 3), 160, 80) == (0, 0, 160, 80)  # the full grid is the image, padding cut away
    _, y0, _, y1 = a.source_box((0, 0, 0, 3), 160, 80)
    assert y1 <= y0  # row 0 is all padding
    # tall
    assert a.grid_box((10, 50, 30, 90), 80, 160) == (1, 1, 2, 1)
    assert a.source_box((2, 1, 2, 2), 80, 160) == (0, 80, 80, 120)
    # a GT box maps to exactly the tokens it overlaps; each token maps back to the pixels under it
    for w, h in ((160, 80), (80, 160), (150, 64)):
        for gy in range(4):
            for gx in range(4):
                box = a.source_box((gy, gx, gy, gx), w, h)
                if box[2] > box[0] and box[3] > box[1]:
                    y0, x0, y1, x1 = a.grid_box(box, w, h)  # whole pixels: at most one more token each side
                    assert gy - 1 <= y0 <= gy <= y1 <= gy + 1 and gx - 1 <= x0 <= gx <= x1 <= gx + 1
                    exact = (w, h) != (150, 64)  # 40 px tokens on a 40 px-offset pad fall on whole pixels
                    assert not exact or (y0, x0, y1, x1) == (gy, gx, gy, gx)


def test_qwen_padding_tokens(qwen_pad):
    wide = qwen_pad.padding_tokens(160, 80).reshape(4, 4)
    assert wide.tolist() == [[True] * 4, [False] * 4, [False] * 4, [True] * 4]
    assert np.array_equal(qwen_pad.padding_tokens(80, 160).reshape(4, 4), wide.T)
    assert not qwen_pad.padding_tokens(90, 90).any()


def test_padding_token_mask_hand_worked():
    """The reference get_foreground_mask: scaled sides int(side / long * n), content rounded outward."""
    # 640 x 480 on 24: content 18 rows, starting (24 - 18) // 2 = 3, ending 18 + ceil(6 / 2) = 21
    m = padding_token_mask(640, 480, (24, 24)).reshape(24, 24)
    assert m[:3].all() and m[21:].all() and not m[3:21].any()
    assert np.array_equal(padding_token_mask(480, 640, (24, 24)).reshape(24, 24), m.T)
    # 100 x 50 on 5: 2 rows (int 2.5), from 1 to 2 + ceil(1.5) = 4: rows 1..3 content (odd pad rounds outward)
    m = padding_token_mask(100, 50, (5, 5)).reshape(5, 5)
    assert [bool(r.all()) for r in m] == [True, False, False, False, True] and not m[1:4].any()
    # a very thin image keeps at least one row
    m = padding_token_mask(1000, 1, (4, 4)).reshape(4, 4)
    assert m.sum(1).tolist() == [4, 0, 0, 4]  # start (4 - 1) // 2 = 1, end 1 + ceil(1.5) = 3: rows 1..2
    with pytest.raises(ValueError, match="square grid"):
        padding_token_mask(10, 5, (2, 3))


def test_qwen_pad_crops_are_padded_and_map_back(qwen_pad):
    """A 80 x 40 crop of the wide image is itself padded (20 px top and bottom): its rows 0 and 3 keep nothing."""
    a = qwen_pad
    image = noise(160, 80, seed=3)
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 0] = True
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(1, 0, 1, 1)], enclosing=(1, 0, 1, 1))
    (crop,) = crops_from_roi(roi, a, 160, 80, "masked")
    assert crop.box == (0, 0, 80, 40)  # source pixels under grid rows 1, columns 0..1
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, :2] = True  # crop columns 0..1 lie over grid column 0; crop rows 1..2 show the image
    np.testing.assert_array_equal(crop.keep, expected)
    (box_crop,) = crops_from_roi(roi, a, 160, 80, "box")
    assert box_crop.box == (0, 0, 80, 40) and box_crop.keep is None
    # the crop is encoded exactly as the padded cut, on the fixed grid
    cut = image.crop(crop.box)
    ref = a.processor.image_processor(
        [by_hand(cut, (127, 127, 127)).resize((112, 112), Image.Resampling.BICUBIC)], do_resize=False
    )
    assert torch.equal(a.encode_images([cut])["pixel_values"], torch.as_tensor(ref["pixel_values"]))
    s2 = build_stage2_inputs(a, [image], ["what is in the box ?"], [[crop]])
    assert s2.n_crop_tokens == [int(expected.sum())]
    assert s2.image_grid_thw.tolist() == [[1, 8, 8], [1, 8, 8]]


def test_resolution_pad_is_validated():
    assert Resolution.parse(PAD).pad is True
    with pytest.raises(ValueError, match="needs mode 'fixed'"):
        Resolution.parse({"mode": "native", "pad": True})
    with pytest.raises(ValueError, match="true or false"):
        Resolution(mode="fixed", size=112, pad="yes")
    assert ModelParams(path="m", resolution=PAD).adapter_options() == {"resolution": PAD}
    assert ModelParams(path="m", pad_to_square=True).adapter_options() == {"pad_to_square": True}
    assert ModelParams(path="m").adapter_options() == {}
    with pytest.raises(ValueError, match="pad_to_square is LLaVA's"):
        ModelParams(path="m", resolution=PAD, pad_to_square=True)


def test_pad_to_square_is_llava_only(qwen_pad, toy):
    with pytest.raises(ValueError, match="pad_to_square"):
        wrap_model(qwen_pad.model, qwen_pad.processor, "toy-qwen", pad_to_square=True)
    with pytest.raises(ValueError, match="resolution"):
        wrap_model(*toy, "toy", resolution=PAD)


# --- LLaVA pad_to_square ----------------------------------------------------------------------------


def test_llava_padded_image_is_the_reference_square(llava_pad):
    padded, clip_like = llava_pad
    ip = padded.processor.image_processor
    assert padded.pad_fill == tuple(int(x * 255) for x in ip.image_mean)
    assert clip_like.view_spec == ViewSpec(pad_to_square=False, shortest_edge=64, crop_hw=(64, 64))
    assert padded.view_spec == ViewSpec(pad_to_square=True)
    for w, h in ((70, 30), (30, 70)):
        image = noise(w, h, seed=1)
        ref = by_hand(image, padded.pad_fill).resize((64, 64), Image.Resampling(ip.resample))
        ref_px = ip([ref], do_resize=False, do_center_crop=False, do_pad=False, return_tensors="pt")["pixel_values"]
        batch = padded.build_batch([image], [padded.render_prompt("what is in the box ?")])
        assert torch.equal(batch.inputs["pixel_values"], ref_px)
        assert torch.equal(padded.pixel_values([image]), ref_px)
        plain = clip_like.build_batch([image], [clip_like.render_prompt("what is in the box ?")])
        assert not torch.equal(plain.inputs["pixel_values"], ref_px)  # llava-hf's short side + centre crop
        assert int((batch.inputs["input_ids"] == padded.image_token_id).sum()) == 16


def test_llava_pad_geometry_wide_and_tall(llava_pad):
    """70 x 30 on a 70 px square, 20 px down; tokens are 17.5 px."""
    a, clip_like = llava_pad
    assert a.grid_box((10, 10, 30, 30), 70, 30) == (1, 0, 2, 1)  # y 30..50 on the square
    assert a.grid_box((10, 20, 30, 35), 70, 30) == (2, 0, 2, 1)  # clipped to the image first: y 40..50
    assert a.source_box((1, 1, 2, 2), 70, 30) == (17, 0, 53, 30)
    assert a.grid_box((10, 10, 30, 30), 30, 70) == (0, 1, 1, 2)
    assert a.source_box((1, 1, 2, 2), 30, 70) == (0, 17, 30, 53)
    assert clip_like.grid_box((10, 10, 30, 30), 70, 30) != (1, 0, 2, 1)  # the centre crop is another frame
    assert a.padding_tokens(70, 30).reshape(4, 4).any(1).tolist() == [True, False, False, True]
    assert clip_like.padding_tokens(70, 30) is None


def test_llava_pad_crops_are_stretched(llava_pad):
    """The reference resizes its LLaVA crops to 336 x 336 before its padding process_images: nothing to pad."""
    a, _ = llava_pad
    assert a.crop_view == ViewSpec(pad_to_square=False)
    image = noise(70, 30, seed=2)
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    roi = RoI(smoothed=mask.astype(float), mask=mask, boxes=[(1, 1, 2, 2)], enclosing=(1, 1, 2, 2))
    (crop,) = crops_from_roi(roi, a, 70, 30, "masked")
    assert crop.box == (17, 0, 53, 30)
    s2 = build_stage2_inputs(a, [image], ["what is in the box ?"], [[crop]])
    assert s2.n_crop_tokens == [int(crop.keep.sum())]
