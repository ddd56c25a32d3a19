"""RoI post-processing defaults pinned to SPEC section 3 (3x3 Gaussian blur with sigma 1, tau 0.15, drop area-1
components, grow components under 4 tokens to 3x3, drop components over 225 tokens), each by value and by what
it does to a hand-made map; evaluate and the API take these defaults (issue 20, mutant 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.inference.params import EvalParams, InferenceSettings
from pipeline.inference.roi import RoIParams, postprocess

# the 3-tap Gaussian of sigma 1, normalised: exp(-x^2 / 2) at x = -1, 0, 1 over their sum
W = math.exp(-0.5)
K1 = 1 / (1 + 2 * W)  # centre tap, 0.45186...
K0 = W / (1 + 2 * W)  # side taps, 0.27407...


def test_defaults_are_the_spec_values():
    p = RoIParams()
    assert p.smooth_size == 3
    assert p.smooth_sigma == 1.0
    assert p.tau == 0.15
    assert p.drop_area_1 is True
    assert p.grow_below == 4
    assert p.max_area == 225
    assert p.mode == "masked"  # the paper's default upscaling


def test_evaluate_and_the_api_use_the_defaults():
    spec = RoIParams(3, 1.0, 0.15, True, 4, 225, "masked")
    assert EvalParams().roi_params("masked") == spec
    assert InferenceSettings().roi == spec


def test_default_blur_of_a_single_token_by_hand():
    """A 1 at the centre of a 5x5 grid spreads as the outer product of the 3-tap kernel; nothing beyond it."""
    prob = np.zeros((5, 5))
    prob[2, 2] = 1.0
    roi = postprocess(prob)
    want = np.zeros((5, 5))
    want[1:4, 1:4] = np.outer([K0, K1, K0], [K0, K1, K0])
    np.testing.assert_allclose(roi.smoothed, want, rtol=1e-12, atol=1e-15)
    assert roi.smoothed[2, 2] == pytest.approx(0.2041800, abs=1e-7)  # 1 / (1 + 2 exp(-1/2))^2
    assert roi.smoothed[2, 1] == pytest.approx(0.1238414, abs=1e-7)
    assert roi.smoothed[1, 1] == pytest.approx(0.0751136, abs=1e-7)
    # only the centre passes tau (0.204 > 0.15 > 0.124): a single token, dropped as area 1
    assert not roi.found and not roi.mask.any()
    kept = postprocess(prob, RoIParams(drop_area_1=False))  # kept, it grows to 3x3
    assert kept.boxes == [(1, 1, 3, 3)] and kept.mask.sum() == 9


def test_default_tau_is_strict_and_at_0_15():
    """A flat map stays flat under the normalised blur: just above 0.15 is one region, just below none."""
    assert postprocess(np.full((6, 6), 0.151)).boxes == [(0, 0, 5, 5)]
    assert not postprocess(np.full((6, 6), 0.149)).found


def test_default_growth_below_4_tokens():
    """Components of 2 and 3 tokens grow to 3x3 boxes; one of 4 tokens keeps its own shape."""
    prob = np.zeros((12, 12))
    prob[2, 2:4] = 0.6  # two tokens: smoothed 0.6*K1*(K1+K0) = 0.197 on them, at most 0.6*K0*(K1+K0) = 0.120 around
    prob[7, 2:5] = 0.5  # three: 0.226 in the middle, 0.164 at the ends, at most 0.5*K0 = 0.137 around
    prob[7:9, 8:10] = 0.5  # a 2x2 block: 0.5*(K1+K0)^2 = 0.263 on it, at most 0.5*K0*(K1+K0) = 0.0995 around
    assert 0.6 * K1 * (K1 + K0) > 0.15 >= 0.6 * K0 * (K1 + K0)
    assert 0.5 * K1 * (K1 + K0) > 0.15 >= 0.5 * K0
    roi = postprocess(prob)
    assert roi.boxes == [(1, 1, 3, 3), (6, 2, 8, 4), (7, 8, 8, 9)]
    want = np.zeros((12, 12), bool)
    want[1:4, 1:4] = True  # the pair, grown (an odd shortfall takes the extra token on the low side)
    want[6:9, 2:5] = True  # the triple, grown across
    want[7:9, 8:10] = True  # the 2x2 block as it is
    np.testing.assert_array_equal(roi.mask, want)
    assert roi.enclosing == (1, 1, 8, 9)


@pytest.mark.parametrize(("h", "w", "found"), [(15, 15, True), (15, 16, False)])
def test_default_max_area_is_225_tokens(h, w, found):
    """A flat map above tau is one component of h*w tokens: 225 is kept, 240 dropped."""
    roi = postprocess(np.full((h, w), 0.5))
    assert roi.found is found
    assert roi.boxes == ([(0, 0, h - 1, w - 1)] if found else [])
