"""RoI post-processing against slow, independent references: explicit convolution, flood fill, the filters.

``sep_smooth`` is the hand-written separable blur ``pipeline.inference.roi.smooth`` used before it became
``scipy.ndimage.gaussian_filter``; the scipy version must agree with it (and with a direct 2-D convolution)
to float64 rounding, and binarise identically.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.inference.roi import RoIParams, postprocess, smooth

# --- the slow reference -----------------------------------------------------------------------


def gaussian_kernel1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, as cv2.getGaussianKernel / torchvision build them for sigma > 0."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def sep_smooth(prob: np.ndarray, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """The former hand-written blur: separable Gaussian, numpy reflect-101 padding, one axis at a time."""
    prob = np.asarray(prob, dtype=np.float64)
    if sigma <= 0 or size == 1:
        return prob.copy()
    k = gaussian_kernel1d(size, sigma)
    r = size // 2
    out = prob
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        # numpy's 'reflect' is reflect-101 (repeated for pads longer than the axis); a length-1 axis
        # mirrors onto itself, which numpy only accepts as 'edge'.
        padded = np.pad(out, pad, mode="reflect" if n > 1 else "edge")
        out = sum(k[i] * (padded[i : i + n] if axis == 0 else padded[:, i : i + n]) for i in range(size))
    return out


def ref_smooth(prob: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Direct 2-D convolution, kernel built from the Gaussian formula, reflect-101 borders by index."""
    if sigma <= 0 or size == 1:
        return prob.astype(np.float64)
    h, w = prob.shape
    r = size // 2
    g = [np.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-r, r + 1)]
    kernel = np.array([[a * b for b in g] for a in g])
    kernel /= kernel.sum()

    def reflect101(i: int, n: int) -> int:
        if n == 1:
            return 0
        while i < 0 or i >= n:
            i = -i if i < 0 else 2 * (n - 1) - i
        return i

    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            acc = 0.0
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    acc += kernel[dy + r, dx + r] * prob[reflect101(y + dy, h), reflect101(x + dx, w)]
            out[y, x] = acc
    return out


def ref_components(binary: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first flood fill, in raster order of their first pixel."""
    h, w = binary.shape
    seen = np.zeros_like(binary, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if not binary[y, x] or seen[y, x]:
                continue
            comp, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                comp.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and binary[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            comps.append(comp)
    return comps


def ref_grow(lo: int, hi: int, n: int) -> tuple[int, int]:
    if hi - lo == 0:  # one token: one more on each side
        lo, hi = lo - 1, hi + 1
    elif hi - lo == 1:  # two tokens: one more before them
        lo = lo - 1
    return max(0, lo), min(n - 1, hi)


def ref_postprocess(prob: np.ndarray, p: RoIParams):
    h, w = prob.shape
    blurred = ref_smooth(prob, p.smooth_size, p.smooth_sigma)
    binary = blurred > p.tau
    mask = np.zeros((h, w), dtype=bool)
    boxes = []
    for comp in ref_components(binary):
        if p.drop_area_1 and len(comp) == 1:
            continue
        if p.max_area is not None and len(comp) > p.max_area:
            continue
        ys = [c[0] for c in comp]
        xs = [c[1] for c in comp]
        y0, y1, x0, x1 = min(ys), max(ys), min(xs), max(xs)
        if len(comp) < p.grow_below:
            y0, y1 = ref_grow(y0, y1, h)
            x0, x1 = ref_grow(x0, x1, w)
            for y in range(y0, y1 + 1):
                for x in range(x0, x1 + 1):
                    mask[y, x] = True
        else:
            for y, x in comp:
                mask[y, x] = True
        boxes.append((y0, x0, y1, x1))
    enclosing = None
    if boxes:
        enclosing = (
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )
    return blurred, mask, boxes, enclosing


def random_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sparse peaks of assorted sizes on a low background, so every filter gets exercised."""
    m = rng.random((h, w)) * 0.1
    for _ in range(rng.integers(0, 6)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        r = rng.integers(0, 4)
        m[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] += rng.random() * 0.9
    return np.clip(m, 0, 1)


# --- tests -----------------------------------------------------------------------------------


def test_kernel_matches_cv2_for_sigma_1():
    # cv2.getGaussianKernel(3, 1.0) -> [0.27406862, 0.45186276, 0.27406862]
    cv2_taps = [0.27406862, 0.45186276, 0.27406862]
    np.testing.assert_allclose(gaussian_kernel1d(3, 1.0), cv2_taps, atol=1e-8)
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0  # the blur of a centred impulse is the 2-D kernel itself
    np.testing.assert_allclose(smooth(delta, 3, 1.0)[1:4, 1:4], np.outer(cv2_taps, cv2_taps), atol=1e-8)


SMOOTH_SHAPES = [(1, 1), (1, 2), (1, 7), (1, 24), (2, 1), (9, 1), (24, 1), (2, 2), (2, 3), (3, 3), (5, 9), (24, 24)]
SMOOTH_SETTINGS = [(3, 1.0), (3, 0.5), (5, 1.0), (5, 1.5), (7, 0.8), (7, 2.3), (3, 0.0), (5, 0.0), (1, 1.0)]


@pytest.mark.parametrize(("size", "sigma"), SMOOTH_SETTINGS)
def test_scipy_smooth_equals_hand_written_blur(size, sigma):
    """gaussian_filter(mode='mirror', radius) vs the former separable blur and a direct 2-D convolution."""
    rng = np.random.default_rng(size * 100 + int(sigma * 10))
    noop = sigma <= 0 or size == 1
    for h, w in SMOOTH_SHAPES * 4:
        prob = rng.random((h, w))
        got = smooth(prob, size, sigma)
        assert got.dtype == np.float64 and got.shape == (h, w)
        expected = sep_smooth(prob, size, sigma)
        if noop:
            np.testing.assert_array_equal(got, prob)  # a copy, bit for bit
            assert got is not prob
        # Different summation order only: a few ulps on values <= 1.
        assert np.abs(got - expected).max() <= 1e-12
        if max(h, w) <= 9:
            assert np.abs(got - ref_smooth(prob, size, sigma)).max() <= 1e-12


def test_scipy_smooth_binarises_like_hand_written_blur():
    """At tau, masks are identical on maps like the embedded default's: float32 sigmoid outputs on small grids."""
    rng = np.random.default_rng(11)
    for trial in range(400):
        h, w = [(24, 24), (16, 16), (12, 12), (7, 7), (1, 16), (16, 1)][trial % 6]
        logits = rng.normal(-4, 2, (h, w))
        for _ in range(rng.integers(0, 4)):  # a few confident blobs, as the RPN draws them
            y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(0, 3)
            logits[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] += rng.uniform(2, 10)
        prob = (1 / (1 + np.exp(-logits))).astype(np.float32)
        for tau in (0.15, 0.2, 0.3):
            np.testing.assert_array_equal(smooth(prob) > tau, sep_smooth(prob) > tau)


def test_smooth_matches_torch_reflect_padding():
    """torchvision's gaussian_blur (what the reference calls): reflect-pad, then a 2-D Gaussian conv."""
    rng = np.random.default_rng(1)
    for h, w in [(24, 24), (5, 9), (2, 2)]:
        prob = rng.random((h, w))
        k1 = torch.tensor(gaussian_kernel1d(3, 1.0))
        k2 = torch.outer(k1, k1)[None, None]
        padded = F.pad(torch.tensor(prob)[None, None], (1, 1, 1, 1), mode="reflect")
        expected = F.conv2d(padded, k2)[0, 0].numpy()
        np.testing.assert_allclose(smooth(prob, 3, 1.0), expected, atol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        RoIParams(),
        RoIParams(tau=0.1),
        RoIParams(tau=0.3, max_area=20),
        RoIParams(tau=0.15, smooth_sigma=0.0),
        RoIParams(tau=0.2, drop_area_1=False, grow_below=0, max_area=None),
        RoIParams(tau=0.12, smooth_size=5, smooth_sigma=1.5, grow_below=6),
    ],
)
def test_postprocess_matches_slow_reference(params):
    rng = np.random.default_rng(7)
    shapes = [(24, 24), (6, 6), (7, 11), (11, 5), (3, 3), (2, 2), (1, 6)]
    n_found = 0
    for trial in range(42):
        h, w = shapes[trial % len(shapes)]
        prob = random_map(rng, h, w)
        roi = postprocess(prob, params)
        blurred, mask, boxes, enclosing = ref_postprocess(prob, params)
        np.testing.assert_allclose(roi.smoothed, blurred, atol=1e-12)
        np.testing.assert_array_equal(roi.mask, mask)
        assert roi.boxes == boxes
        assert roi.enclosing == enclosing
        assert roi.found == bool(boxes)
        n_found += roi.found
    assert n_found >= 5  # the random maps do produce regions


def test_filters_on_hand_made_maps():
    p = RoIParams(smooth_sigma=0.0, tau=0.5)
    m = np.zeros((8, 8))
    m[0, 7] = 1  # area 1: dropped
    m[0:2, 0] = 1  # area 2 at the corner: grows to 3x3, clipped to rows 0..1, cols 0..1
    m[5:8, 4:7] = 1  # area 9: kept as is
    roi = postprocess(m, p)
    assert roi.boxes == [(0, 0, 1, 1), (5, 4, 7, 6)]
    assert roi.enclosing == (0, 0, 7, 6)
    assert roi.mask[0:2, 0:2].all() and roi.mask.sum() == 4 + 9
    assert not roi.mask[0, 7]

    m = np.zeros((8, 8))
    m[4, 4] = m[4, 5] = 1  # area 2 inside the grid: [4, 5] x [4, 4] -> rows 3..5, cols 3..5
    assert postprocess(m, p).boxes == [(3, 3, 5, 5)]


def test_max_area_and_empty():
    p = RoIParams(smooth_sigma=0.0, tau=0.5, max_area=225)
    m = np.zeros((24, 24))
    m[0:15, 0:15] = 1
    assert postprocess(m, p).boxes == [(0, 0, 14, 14)]  # 225 tokens: kept
    m[15, 0] = 1
    roi = postprocess(m, p)  # 226 tokens: dropped
    assert not roi.found and roi.enclosing is None and not roi.mask.any()
    assert not postprocess(np.zeros((24, 24))).found
