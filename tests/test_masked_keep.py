"""masked_keep against a token-by-token loop: each crop token's centre, placed through the crop's own view
(padding included), mapped back onto the source grid; kept when it lies on the crop's pixels and its grid token is
masked inside the enclosing box. Cases with a non-zero span start, a centre exactly on the crop's first pixel row,
and padding past the far edge (centres beyond the grid) are the ones mutation testing found unpinned."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pipeline.inference.two_stage import masked_keep
from pipeline.models.geometry import Frame


def _loop(mask, box, crop_hw, span=None, frame=None, size=None):
    gh, gw = mask.shape
    y0, x0, y1, x1 = box
    sy0, sx0, sy1, sx1 = span if span is not None else (y0, x0, y1 + 1, x1 + 1)
    ch, cw = crop_hw
    out = np.zeros((ch, cw), dtype=bool)
    for i in range(ch):
        for j in range(cw):
            if frame is None:
                gy = sy0 + (i + 0.5) * (sy1 - sy0) / ch
                gx = sx0 + (j + 0.5) * (sx1 - sx0) / cw
            else:
                pw, ph = size
                py = float(frame.y0) + (i + 0.5) * float(frame.h) / ch
                px = float(frame.x0) + (j + 0.5) * float(frame.w) / cw
                if not (0 <= py < ph and 0 <= px < pw):
                    continue  # the centre lies in the crop view's padding
                gy = sy0 + py / ph * (sy1 - sy0)
                gx = sx0 + px / pw * (sx1 - sx0)
            r, c = min(max(math.floor(gy), 0), gh - 1), min(max(math.floor(gx), 0), gw - 1)
            out[i, j] = bool(mask[r, c]) and y0 <= r <= y1 and x0 <= c <= x1
    return out


def _mask(seed, shape=(6, 8)):
    return np.random.default_rng(seed).random(shape) > 0.4


CASES = {
    "stretched": dict(box=(1, 2, 4, 6), crop_hw=(5, 7)),
    "span": dict(box=(1, 2, 4, 6), crop_hw=(6, 6), span=(1.25, 2.5, 4.75, 6.5)),
    # a centre exactly on pixel row 0: py = -1 + 0.5 * 8 / 4 = 0 is on the crop, -1 is padding
    "pad-top": dict(
        box=(0, 1, 3, 5), crop_hw=(4, 4), frame=Frame(Fraction(0), Fraction(-1), Fraction(4), Fraction(8)), size=(4, 6)
    ),
    # the crop fills the frame's top half; the lower centres fall past the grid's last row
    "pad-bottom": dict(
        box=(2, 0, 5, 7),
        crop_hw=(6, 5),
        span=(2, 0, 6, 8),
        frame=Frame(Fraction(0), Fraction(0), Fraction(8), Fraction(16)),
        size=(8, 8),
    ),
    "pad-left": dict(
        box=(0, 3, 5, 7),
        crop_hw=(5, 6),
        span=(0.5, 3, 6, 8),
        frame=Frame(Fraction(-3), Fraction(0), Fraction(12), Fraction(10)),
        size=(6, 10),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_keep_matches_a_token_loop(case, seed):
    kw = dict(CASES[case])
    mask = _mask(seed)
    want = _loop(mask, kw["box"], kw["crop_hw"], kw.get("span"), kw.get("frame"), kw.get("size"))
    got = masked_keep(mask.astype(np.uint8), kw["box"], kw["crop_hw"], kw.get("span"), kw.get("frame"), kw.get("size"))
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want)
    if kw.get("frame") is not None:
        assert not want.all()  # some centres lie in padding: the case tests the placement


def test_a_padded_crop_needs_its_size():
    with pytest.raises(ValueError, match="crop_frame needs crop_size"):
        masked_keep(
            _mask(0), (0, 0, 1, 1), (2, 2), crop_frame=Frame(Fraction(0), Fraction(0), Fraction(2), Fraction(2))
        )


def test_cache_keyword_follows_the_forward_signature():
    """transformers renamed the KV-cache keyword (past_key_values -> cache): prefix reuse passes whichever the
    model's forward takes."""
    import torch

    from pipeline.inference.prefix_cache import cache_kwarg

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert (cache_kwarg(New()), cache_kwarg(Old())) == ("cache", "past_key_values")
