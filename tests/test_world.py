"""The synthetic world: determinism, GT boxes that match the pixels, the glyph inside the named frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.world.generator import (
    COLOURS,
    GLYPH_MASKS,
    TEXTURE_TILES,
    TEXTURES,
    WorldParams,
    crop_box,
    generate_sample,
    question_for,
    world_vocabulary,
    write_world,
)

PARAMS = WorldParams()
CHECKER = WorldParams(glyph_style="checker")


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_deterministic_per_seed_and_index():
    a, b = generate_sample(PARAMS, 7, 3), generate_sample(PARAMS, 7, 3)
    assert (a.question, a.answer, a.box, a.colour, a.sample_id) == (b.question, b.answer, b.box, b.colour, b.sample_id)
    assert np.array_equal(_arr(a.image), _arr(b.image))
    others = [generate_sample(PARAMS, 7, 4), generate_sample(PARAMS, 8, 3)]
    assert all(not np.array_equal(_arr(a.image), _arr(o.image)) for o in others)


@pytest.mark.parametrize("index", range(12))
def test_gt_box_matches_drawn_frame(index):
    s = generate_sample(PARAMS, 11, index)
    img = _arr(s.image)
    x0, y0, x1, y1 = s.box
    cell = PARAMS.cell
    assert all(v % cell == 0 for v in s.box), "boxes lie on the token grid"
    assert 0 <= x0 < x1 <= s.image.width and 0 <= y0 < y1 <= s.image.height
    rgb = np.array(COLOURS[s.colour])
    tol = 4 * PARAMS.noise_std + 2
    sides = {
        "top": img[y0, x0:x1],
        "bottom": img[y1 - 1, x0:x1],
        "left": img[y0:y1, x0],
        "right": img[y0:y1, x1 - 1],
    }
    for name, px in sides.items():
        dev = np.abs(px - rgb).max(axis=-1)
        assert (dev <= tol).mean() > 0.97, f"{name} border of the {s.colour} box is not drawn in its colour"
    # one pixel outside the box is not the frame colour (the box is tight)
    outside = []
    if y0 > 0:
        outside.append(img[y0 - 1, x0:x1])
    if y1 < s.image.height:
        outside.append(img[y1, x0:x1])
    if x0 > 0:
        outside.append(img[y0:y1, x0 - 1])
    if x1 < s.image.width:
        outside.append(img[y0:y1, x1])
    for px in outside:
        assert (np.abs(px - rgb).max(axis=-1) <= tol).mean() < 0.5
    # inside the border the interior is the tint, not the border colour
    b = PARAMS.border_px
    interior = img[y0 + b + 1 : y1 - b - 1, x0 + b + 1 : x1 - b - 1]
    assert (np.abs(interior - rgb).max(axis=-1) <= tol).mean() < 0.05
    # exactly one frame of the named colour
    assert sum(f.colour == s.colour for f in s.frames) == 1
    assert s.question == question_for(s.colour)


def _assert_glyph_inside_box(s, params: WorldParams, one_cell: bool = True) -> None:
    t = s.target
    assert t.glyph == s.answer and t.box == s.box
    gx0, gy0, gx1, gy1 = t.glyph_box
    x0, y0, x1, y1 = s.box
    assert x0 + params.border_px <= gx0 < gx1 <= x1 - params.border_px
    assert y0 + params.border_px <= gy0 < gy1 <= y1 - params.border_px
    if one_cell:  # it sits in the token cell recorded for it, inside the box
        r, c = t.glyph_cell
        assert gx0 // params.cell == c == (gx1 - 1) // params.cell
        assert gy0 // params.cell == r == (gy1 - 1) // params.cell


@pytest.mark.parametrize("fill", [True, False], ids=["fill", "patch"])
@pytest.mark.parametrize("index", range(10))
def test_answer_texture_is_drawn_inside_the_box(index, fill):
    params = WorldParams(noise_std=0.0, texture_fill=fill)
    s = generate_sample(params, 13, index)
    assert s.answer in TEXTURES
    _assert_glyph_inside_box(s, params, one_cell=not fill)
    gx0, gy0, gx1, gy1 = s.target.glyph_box
    assert gx0 % 2 == gy0 % 2 == (gx1 - gx0) % 2 == (gy1 - gy0) % 2 == 0, "2x2 tiles align with the 2x downscale"
    if fill:  # the texture covers the frame's interior, a small gap inside the border
        x0, y0, x1, y1 = s.box
        assert max(gx0 - x0, gy0 - y0, x1 - gx1, y1 - gy1) <= params.border_px + 4
    else:
        assert gx1 - gx0 == gy1 - gy0 == params.texture_px
    img = _arr(s.image).mean(axis=-1)
    patch = img[gy0:gy1, gx0:gx1]
    inner = patch[8:-8, 8:-8]
    # away from its edges the patch is the frame's flat interior plus +-amplitude in the texture's 2x2 tile
    # (starting on the tile's top-left pixel at the patch's corner: the inner part starts at an even offset)
    dev = inner - np.median(img[gy0 - 2 : gy1 + 2, gx0 - 2 : gx1 + 2][[0, -1]])
    sign = np.tile(TEXTURE_TILES[s.answer], (inner.shape[0] // 2, inner.shape[1] // 2))
    if s.answer == "nothing":
        assert np.abs(dev).max() <= 1
    else:
        assert (np.abs(dev) > 20).all()
        assert np.array_equal(np.sign(np.round(dev)), sign)
    # and the alphabet names every texture's tile uniquely
    assert len({t.tobytes() for t in TEXTURE_TILES.values()}) == len(TEXTURES)


@pytest.mark.parametrize("index", range(6))
def test_answer_character_is_drawn_inside_the_box(index):
    s = generate_sample(CHECKER, 13, index)
    _assert_glyph_inside_box(s, CHECKER)
    gx0, gy0, gx1, gy1 = s.target.glyph_box
    img = _arr(s.image).mean(axis=-1)
    patch = img[gy0:gy1, gx0:gx1]
    # the glyph pixels stand out from the frame's interior by the checker amplitude
    mask = np.kron(GLYPH_MASKS[s.answer], np.ones((CHECKER.glyph_scale,) * 2, dtype=bool))
    ink = np.abs(patch - np.median(img[gy0 - 3 : gy1 + 3, gx0 - 3 : gx1 + 3])) > 20
    assert np.array_equal(ink, mask)


@pytest.mark.parametrize("style", ["texture", "checker"])
def test_glyph_is_invisible_at_base_view_and_visible_in_crop(style):
    no_noise = WorldParams(noise_std=0.0, glyph_style=style)
    blank = WorldParams(noise_std=0.0, glyph_style=style, glyph_contrast=(0, 0))
    seen = set()
    for i in range(8):
        a, b = generate_sample(no_noise, 17, i), generate_sample(blank, 17, i)
        assert a.box == b.box
        seen.add(a.answer)
        base_a = _arr(a.image.resize((224, 224), Image.BICUBIC))
        base_b = _arr(b.image.resize((224, 224), Image.BICUBIC))
        # the 2x downscale cancels the pattern, edges included (textures: only the pixels' rounding remains)
        assert np.abs(base_a - base_b).max() <= (1 if style == "texture" else 8)
        c = crop_box(a.box, 0.25)
        crop_a = _arr(a.image.crop(c).resize((224, 224), Image.BICUBIC))
        crop_b = _arr(b.image.crop(c).resize((224, 224), Image.BICUBIC))
        if a.answer != "nothing":
            assert np.abs(crop_a - crop_b).max() >= 40  # a crop at >= 1x keeps it
    assert len(seen) >= 3


def test_crop_box_contains_the_box_centre():
    s = generate_sample(PARAMS, 3, 0)
    x0, y0, x1, y1 = s.box
    assert crop_box(s.box, 0.25) == crop_box(s.box, 0.25)
    rng = np.random.default_rng(0)
    for _ in range(50):
        cx0, cy0, cx1, cy1 = crop_box(s.box, 0.25, rng, s.image.size)
        assert 0 <= cx0 < (x0 + x1) / 2 < cx1 <= s.image.width
        assert 0 <= cy0 < (y0 + y1) / 2 < cy1 <= s.image.height


@pytest.mark.parametrize("params", [PARAMS, CHECKER], ids=["texture", "checker"])
def test_vocabulary_covers_questions_and_answers(params):
    vocab = set(world_vocabulary(params))
    for i in range(20):
        s = generate_sample(params, 5, i)
        assert set(s.question.split()) <= vocab
        assert s.answer in vocab and s.answer in params.glyphs


def test_write_world(tmp_path):
    path = write_world(tmp_path / "w", 3, seed=21)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        s = generate_sample(PARAMS, 21, i)
        assert row["sample_id"] == s.sample_id and row["source"] == "world"
        assert (row["question"], row["answer"], tuple(row["box"])) == (s.question, s.answer, s.box)
        img = Image.open(path.parent / row["image"])
        assert (row["width"], row["height"]) == img.size == s.image.size
        assert np.array_equal(_arr(img.convert("RGB")), _arr(s.image))
