"""The embedded world's premise, held by construction: the answer is not in the base view, and is in a crop.

The base view is what the embedded model sees: its own image processor (pad to square, 2x bicubic downscale,
normalise). A classifier on simple features of the named frame in that view, trained on one world seed,
must not beat the majority answer on another seed; every texture must still look different in the crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from pipeline.world.generator import TEXTURES, WorldParams, crop_box, generate_sample, texture_pattern, texture_profile

MODEL = Path(__file__).resolve().parent.parent / "models" / "sdrpn-toy-llava"


@pytest.fixture(scope="module")
def processor():
    return AutoImageProcessor.from_pretrained(MODEL)


def _levels(processor, image: Image.Image) -> np.ndarray:
    """[H, W, 3] processed view in 8-bit levels (the normalisation undone)."""
    pv = processor(images=image, return_tensors="np")["pixel_values"][0]
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    return ((pv * std + mean) * 255.0).transpose(1, 2, 0)


def _frame_features(view: np.ndarray, box: tuple[int, int, int, int], scale: float) -> np.ndarray:
    """Interior and border means, edge strips, row/column profiles and variances of one frame in the view."""
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    frame = view[y0:y1, x0:x1].astype(np.float64)
    inner = frame[2:-2, 2:-2]  # inside the drawn border (4 source px)
    grey = inner.mean(axis=-1)
    centre = grey.mean()
    rows, cols = grey.mean(axis=1) - centre, grey.mean(axis=0) - centre
    edge = [rows[:3], rows[-3:], cols[:3], cols[-3:]]
    feats = [
        *inner.mean(axis=(0, 1)),
        *frame[:2].mean(axis=(0, 1)) - inner.mean(axis=(0, 1)),  # the border's own level
        *(v for e in edge for v in e),
        grey.var(),
        np.diff(grey, axis=0).var(),
        np.diff(grey, axis=1).var(),
        np.abs(np.diff(rows)).mean(),
        np.abs(np.diff(cols)).mean(),
        rows[:3].mean() - rows[-3:].mean(),
        cols[:3].mean() - cols[-3:].mean(),
        (grey[:3, :3].mean() + grey[-3:, -3:].mean() - grey[:3, -3:].mean() - grey[-3:, :3].mean()),
    ]
    return np.array(feats)


def _dataset(processor, seed: int, n: int, params: WorldParams) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(n):
        s = generate_sample(params, seed, i)
        view = _levels(processor, s.image)
        xs.append(_frame_features(view, s.box, view.shape[0] / s.image.height))
        ys.append(TEXTURES.index(s.answer))
    return np.stack(xs), np.array(ys)


def _fit_softmax(x: np.ndarray, y: np.ndarray, k: int, l2: float = 1e-3, steps: int = 3000) -> np.ndarray:
    """Multinomial logistic regression by full-batch gradient descent; returns [features + 1, k] weights."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros((xb.shape[1], k))
    onehot = np.eye(k)[y]
    for _ in range(steps):
        z = xb @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= 0.5 * (xb.T @ (p - onehot) / len(x) + l2 * w)
    return w


def base_view_leak(processor, seed_fit: int, seed_test: int, n: int, params: WorldParams) -> tuple[float, float]:
    """(classifier accuracy on ``seed_test``, majority-answer rate there) for a classifier fit on ``seed_fit``."""
    x_fit, y_fit = _dataset(processor, seed_fit, n, params)
    x_test, y_test = _dataset(processor, seed_test, n, params)
    mu, sd = x_fit.mean(axis=0), x_fit.std(axis=0) + 1e-9
    w = _fit_softmax((x_fit - mu) / sd, y_fit, len(TEXTURES))
    pred = (np.hstack([(x_test - mu) / sd, np.ones((len(x_test), 1))]) @ w).argmax(axis=1)
    return float((pred == y_test).mean()), float(np.bincount(y_test).max() / len(y_test))


def test_base_view_classifier_does_not_beat_the_majority_answer(processor):
    acc, majority = base_view_leak(processor, seed_fit=4242, seed_test=4343, n=300, params=WorldParams())
    print(f"base-view classifier accuracy {acc:.3f}, majority rate {majority:.3f}")
    assert acc <= majority + 0.05


def _forced(texture: str) -> WorldParams:
    """World params whose every frame and stray holds ``texture`` (the random draws stay the same)."""

    @dataclass
    class Forced(WorldParams):
        @property
        def glyphs(self) -> tuple[str, ...]:
            return (texture,) * len(TEXTURES)

    return Forced()


@pytest.mark.parametrize("index", range(3))
def test_every_answer_gives_the_same_base_view_and_a_different_crop(processor, index):
    samples = {t: generate_sample(_forced(t), 77, index) for t in TEXTURES}
    views = {t: _levels(processor, s.image) for t, s in samples.items()}
    ref = samples["nothing"]
    for t in TEXTURES:
        # only the rounding of the final pixels differs: no level or structure of the texture survives
        diff = views[t] - views["nothing"]
        assert np.abs(diff).max() <= 2.5, t
        assert abs(diff.mean()) < 0.01, t
    crop = crop_box(ref.box, 0.25, size=ref.image.size)
    x0, y0, x1, y1 = ref.target.glyph_box
    inside = (slice(y0 + 8 - crop[1], y1 - 8 - crop[1]), slice(x0 + 8 - crop[0], x1 - 8 - crop[0]))
    crops = {}
    for t, s in samples.items():
        region = s.image.crop(crop)
        big = _levels(processor, region)
        scale = big.shape[0] / region.height
        ys, xs = inside
        crops[t] = big[int(ys.start * scale) : int(ys.stop * scale), int(xs.start * scale) : int(xs.stop * scale)]
    for i, a in enumerate(TEXTURES):
        for b in TEXTURES[i + 1 :]:
            assert np.abs(crops[a] - crops[b]).mean() >= 10, (a, b)  # the crop view tells every pair apart


@pytest.mark.parametrize("pairs", [1, 2, 5, 16, 57])
@pytest.mark.parametrize("offset", [0, 2, 10])
def test_texture_profile_vanishes_under_pils_downscale(pairs, offset):
    """Checked against PIL's own float resampling (an independent implementation of the kernel)."""
    prof = texture_profile(pairs)
    assert prof.size == 2 * pairs + 8 and abs(prof.sum()) < 1e-12
    assert np.allclose(prof[7:-7], np.tile([-1.0, 1.0], pairs - 3)) if pairs > 3 else True
    line = np.zeros(prof.size + 2 * offset + 16)
    line[8 + offset : 8 + offset + prof.size] = prof
    img = Image.fromarray(np.tile(line, (4, 1)).astype(np.float32), mode="F")
    out = np.asarray(img.resize((line.size // 2, 2), Image.BICUBIC))
    assert np.abs(out).max() < 1e-5
    # an odd offset (the profile misaligned with the downscale's pixel pairs) does not cancel
    shifted = np.roll(line, 1)
    img = Image.fromarray(np.tile(shifted, (4, 1)).astype(np.float32), mode="F")
    assert np.abs(np.asarray(img.resize((line.size // 2, 2), Image.BICUBIC))).max() > 0.05


@pytest.mark.parametrize("name", TEXTURES)
def test_texture_pattern_is_its_tile_away_from_the_edges(name):
    from pipeline.world.generator import TEXTURE_TILES

    pat = texture_pattern(name, 30, 40)
    inner = pat[8:-8, 8:-8]
    assert np.array_equal(inner, np.tile(TEXTURE_TILES[name], (inner.shape[0] // 2, inner.shape[1] // 2)))
    img = Image.fromarray(np.pad(pat, 8), mode="F")
    assert np.abs(np.asarray(img.resize((img.width // 2, img.height // 2), Image.BICUBIC))).max() < 1e-5
