"""Each reference preset labels exactly as the authors' label function does, token for token.

The authors' code (github YuHengsss/SD-RPN) is restated below in plain numpy/torch from reading it, in their
float types, inequalities and order of operations (the restatement is ours; none of their code is copied):

- Head maps: their ``get_attn_weights_map`` (``LLaVA/llava/ana_utils.py``, ``Qwen2.5-VL/qwen_src/ana_utils.py``)
  casts attention to float16 and averages over generation steps with ``np.mean``, so every per-head map the
  label scripts see is a float16 array. Our store holds float32; float16 values are exact in it.
- Aggregation: ``LLaVA/llava/eval/model_vqa_label.py`` (7B: ``(h24 + h13 + h26) / 3`` on float16 arrays, sink
  map = layer 2's float16 heads ``.mean(0)``; 13B: ``np.zeros`` float64 accumulator over {16: [2, 21, 30],
  15: [2], 13: [21, 23, 26]} divided by 7, sink layer 16 heads [17, 22] likewise), and
  ``Qwen2.5-VL/make_pseudo_label_natural.py`` / ``_textual.py`` (float64 accumulators; the textual heads have
  no sink heads, so the sink map is all zero).
- Labels: ``create_pseudo_labels`` in ``LLaVA/llava/mm_utils.py`` (called by ``LLaVA/llava/train/train.py``'s
  ``ROITrainingDataset`` with sink threshold 1e-3, fg coefficient 0.2, box limit 0.5, bg coefficient 0.1) and
  in ``Qwen2.5-VL/qwen_src/mm_utils.py`` (called by ``qwen-vl-finetune/qwenvl/data/data_qwen.py`` with sink
  threshold 1e-2 and ``mask_known_bg`` = ``fix_res``; it also blurs the fg-masked map before the box and drops
  maps peaking below 5e-3).

The restated label functions return -100 for ignore and all -100 for a dropped sample; ours keeps the computed
labels of a dropped sample and says why in ``kept``/``skip_reason``. So the test compares (1) kept, (2) the
training labels (ours set to -1 where not kept), (3) the labels before the drop rule for every sample with a
positive map (the restatement's fg/bg masks), (4) the fg box and (5) the sink count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipeline.inference.roi import smooth
from pipeline.teacher.label_presets import resolve_label_params
from pipeline.teacher.labels import LabelParams, assign_labels

SIDE = 24  # both references label a fixed 24 x 24 grid (LLaVA-1.5 336 px / 14; Qwen2.5-VL 672 px / 28)
F16 = np.float16


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The restated blur runs thousands of tiny torch ops: one thread is ten times faster than two here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# The authors' label function, restated
# ---------------------------------------------------------------------------------------------------------------


def authors_llava_7b_maps(layer2: np.ndarray, layer14: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA-1.5-7B label script: float16 (heads, V) maps in; its sink map and grounding map out (float16)."""
    grounding = (layer14[24] + layer14[13] + layer14[26]) / 3
    sink = layer2.mean(0)
    grounding *= (sink < 1e-3).astype(float)  # in place: stays float16
    return sink, grounding


def authors_flat_maps(maps: dict[int, dict[int, np.ndarray]], heads: dict[int, list[int]], n: int) -> np.ndarray:
    """LLaVA-1.5-13B and Qwen2.5-VL label scripts: float64 accumulator, every head once, divided by the count."""
    total = np.zeros(n)
    count = sum(len(h) for h in heads.values())
    if count > 0:
        for layer, hs in heads.items():
            for h in hs:
                total += maps[layer][h]
        total /= count
    return total


def authors_llava_labels(sink_attn, grounding_attn_o2i, sink_thresh=1e-3, binary_coff=0.2, max_ratio=0.5, bg_coff=0.1):
    """LLaVA ``create_pseudo_labels`` (numpy, one sample, 24 x 24)."""
    n_tok = SIDE * SIDE
    sink_attn = sink_attn.flatten()
    o2i = grounding_attn_o2i.flatten()
    ga = o2i * (sink_attn < sink_thresh).astype(float)  # float64 from here on
    ga = ga * (ga > ga.max() * binary_coff).astype(float)
    sink_mask = sink_attn >= sink_thresh
    fg = ga > 0
    rows, cols = np.where(ga.reshape(SIDE, SIDE) > 0)
    box = (0, 0, SIDE - 1, SIDE - 1) if len(rows) == 0 else (rows.min(), cols.min(), rows.max(), cols.max())
    r, c = np.divmod(np.arange(n_tok), SIDE)
    in_box = (r >= box[0]) & (r <= box[2]) & (c >= box[1]) & (c <= box[3])
    o2i_no_sink = o2i * (sink_attn < sink_thresh).astype(float)
    bg = np.zeros(n_tok, dtype=bool)
    cand = np.where(~in_box)[0]
    if len(cand) > 0:
        bg[cand[o2i_no_sink[cand] < ga.max() * bg_coff]] = True
    kept = (box[3] - box[1] + 1) * (box[2] - box[0] + 1) < max_ratio * n_tok
    labels = np.full(n_tok, -100)
    if kept:
        labels[bg] = 0
        labels[fg] = 1
    return {"labels": labels, "fg": fg, "bg": bg, "box": box, "kept": kept, "n_sink": int(sink_mask.sum())}


def torchvision_gaussian_blur_3(img: torch.Tensor) -> torch.Tensor:
    """torchvision ``gaussian_blur(img, kernel_size=3, sigma=1.0)`` on an (h, w) float64 tensor, restated:
    float32 1-D kernel ``exp(-x^2 / 2)`` over x = -1, 0, 1, normalised, outer product in the image dtype,
    'reflect' padding (reflect-101), 2-D convolution."""
    x = torch.linspace(-1.0, 1.0, 3)
    pdf = torch.exp(-0.5 * (x / 1.0).pow(2))
    k1 = (pdf / pdf.sum()).to(img.dtype)
    k2 = torch.mm(k1[:, None], k1[None, :])
    padded = torch.nn.functional.pad(img[None, None], (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv2d(padded, k2[None, None])[0, 0]


def authors_qwen_known_fg(original_size: tuple[int, int], target: int) -> np.ndarray:
    """Qwen ``get_foreground_mask``: which cells of the square ``expand2square`` view show the image."""
    width, height = original_size
    max_dim = max(width, height)
    new_h = max(int(height / max_dim * target), 1)
    new_w = max(int(width / max_dim * target), 1)
    if new_w > new_h:
        x1, y1, x2, y2 = 0, (target - new_h) // 2, new_w, new_h + math.ceil((target - new_h) / 2)
    elif new_h > new_w:
        x1, y1, x2, y2 = (target - new_w) // 2, 0, new_w + math.ceil((target - new_w) / 2), new_h
    else:
        x1, y1, x2, y2 = 0, 0, target, target
    mask = np.zeros((target, target), dtype=bool)
    mask[y1 : min(y2, target), x1 : min(x2, target)] = True
    return mask


def authors_qwen_labels(
    sink_attn, grounding_attn_o2i, known_fg=None, sink_thresh=1e-2, binary_coff=0.2, max_ratio=0.5, bg_coff=0.1
):
    """Qwen ``create_pseudo_labels`` (one sample, (h, w) maps); ``known_fg`` None is ``mask_known_bg=False``."""
    h, w = grounding_attn_o2i.shape
    o2i = grounding_attn_o2i.flatten()
    sink_attn = sink_attn.flatten()
    sink_mask = sink_attn >= sink_thresh
    if known_fg is not None:
        sink_mask = sink_mask | ~known_fg.flatten()
    ga = o2i * (~sink_mask).astype(float)
    ga = ga * (ga > ga.max() * binary_coff).astype(float)
    fg = ga > 0
    blurred = torchvision_gaussian_blur_3(torch.tensor(ga.reshape(h, w)))
    rows, cols = np.where((blurred > 0).numpy())
    box = (0, 0, h - 1, w - 1) if len(rows) == 0 else (rows.min(), cols.min(), rows.max(), cols.max())
    r, c = np.divmod(np.arange(h * w), w)
    in_box = (r >= box[0]) & (r <= box[2]) & (c >= box[1]) & (c <= box[3])
    o2i_no_sink = o2i * (sink_attn < sink_thresh).astype(float)  # attention sinks only, not the padding
    bg = np.zeros(h * w, dtype=bool)
    cand = np.where(~in_box)[0]
    if len(cand) > 0:
        bg[cand[o2i_no_sink[cand] < ga.max() * bg_coff]] = True
    if known_fg is not None:
        bg = bg | ~known_fg.flatten()
    kept = (box[3] - box[1] + 1) * (box[2] - box[0] + 1) < max_ratio * h * w and ga.max() >= 5e-3
    labels = np.full(h * w, -100)
    if kept:
        labels[bg] = 0
        labels[fg] = 1
    return {"labels": labels, "fg": fg, "bg": bg, "box": box, "kept": kept, "n_sink": int(sink_mask.sum())}


# ---------------------------------------------------------------------------------------------------------------
# Per-preset head tables, as the authors' label scripts write them (independent of label_presets.PRESETS)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    preset: str
    label_heads: dict[int, list[int]]
    sink_heads: dict[int, list[int]]  # empty: no sink heads (all-zero sink map)
    sink_thresh: float
    n_heads: int
    qwen: bool

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.label_heads) | set(self.sink_heads))

    @property
    def heads(self) -> list[int]:
        """Heads the store keeps: LLaVA-7B all (its sink map averages every head of layer 2), else those named."""
        if self.preset == "llava_1_5_7b":
            return list(range(self.n_heads))
        named = {h for t in (self.label_heads, self.sink_heads) for hs in t.values() for h in hs}
        return sorted(named)


REFS = {
    r.preset: r
    for r in [
        Ref("llava_1_5_7b", {14: [24, 13, 26]}, {2: list(range(32))}, 1e-3, 32, False),
        Ref("llava_1_5_13b", {16: [2, 21, 30], 15: [2], 13: [21, 23, 26]}, {16: [17, 22]}, 1e-3, 40, False),
        Ref("qwen2_5_vl_3b", {21: [9, 11], 22: [0, 7]}, {8: [1, 13]}, 1e-2, 16, True),
        Ref("qwen2_5_vl_3b_text", {20: [1, 4], 22: [14]}, {}, 1e-2, 16, True),
        Ref("qwen2_5_vl_7b", {16: [1, 7, 17], 19: [17, 20]}, {9: [4, 22]}, 1e-2, 28, True),
        Ref("qwen2_5_vl_7b_text", {22: [1, 4], 23: [6, 11]}, {}, 1e-2, 28, True),
    ]
}


def authors_sample(ref: Ref, att_i: np.ndarray, grid: tuple[int, int], known_fg: np.ndarray | None) -> dict:
    """Run the restated label script + label function on one sample's float16 store slice (L, H, V)."""
    h, w = grid
    nv = h * w
    pos_l = {lay: i for i, lay in enumerate(ref.layers)}
    pos_h = {hd: i for i, hd in enumerate(ref.heads)}
    maps = {lay: {hd: att_i[pos_l[lay], pos_h[hd], :nv] for hd in ref.heads} for lay in ref.layers}
    if ref.preset == "llava_1_5_7b":
        sink, grounding = authors_llava_7b_maps(att_i[pos_l[2], :, :nv], att_i[pos_l[14], :, :nv])
    else:
        grounding = authors_flat_maps(maps, ref.label_heads, nv)
        sink = authors_flat_maps(maps, ref.sink_heads, nv)
    if ref.qwen:
        return authors_qwen_labels(sink.reshape(h, w), grounding.reshape(h, w), known_fg, ref.sink_thresh)
    return authors_llava_labels(sink, grounding, ref.sink_thresh)


# ---------------------------------------------------------------------------------------------------------------
# Maps: random, and adversarial (ties at the thresholds, all sinks, all zero, edges, boxes at half the grid)
# ---------------------------------------------------------------------------------------------------------------


def _blobs(rng, n, side, edge=False):
    yy, xx = np.divmod(np.arange(side * side), side)
    if edge:  # centres on the border or in a corner
        cy = rng.choice([0, side - 1], n).astype(float)
        cx = rng.integers(0, side, n).astype(float)
        flip = rng.random(n) < 0.5
        cy[flip], cx[flip] = cx[flip], cy[flip]
    else:
        cy, cx = rng.uniform(-1, side, n), rng.uniform(-1, side, n)
    r = rng.uniform(0.4, 5.0, n)
    d2 = (yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2
    return np.exp(-d2 / (2 * r[:, None] ** 2)) * rng.uniform(0.3, 1.0, (n, 1))


def _random_label_heads(rng, n, k, side, edge=False):
    base = rng.random((n, side * side)) ** rng.integers(1, 6, (n, 1)) * rng.uniform(0.0, 0.4, (n, 1))
    common = base + _blobs(rng, n, side, edge)
    heads = common[:, None] * rng.uniform(0.2, 1.8, (n, k, 1)) + 0.2 * rng.random((n, k, side * side)) ** 6
    return heads * 10 ** rng.uniform(-3.3, -0.5, (n, 1, 1))  # a_max straddles Qwen's 5e-3


def _random_sink_heads(rng, n, k, side, thr):
    base = thr * rng.random((n, 1, side * side)) * rng.uniform(0.2, 1.1, (n, 1, 1))
    spikes = (rng.random((n, 1, side * side)) < 0.04) * thr * rng.uniform(0.5, 30, (n, 1, side * side))
    return (base + spikes) * rng.uniform(0.5, 1.5, (n, k, 1))


def _quantised_map(rng, n, side):
    """Multiples of half a unit, 0..10 units, a bright patch on a dim field: tau_fg * a_max and tau_bg * a_max
    land exactly on map values (0.2 * 10 u == 2 u, 0.1 * 5 u == 0.5 u, 0.2 * 7.5 u == 1.5 u in float64)."""
    m = rng.integers(0, 5, (n, side, side)) / 2
    for i in range(n):
        y, x = rng.integers(-2, side, 2)
        hh, ww = rng.integers(1, 8, 2)
        m[i, max(y, 0) : y + hh, max(x, 0) : x + ww] = rng.integers(0, 21, (1,)) / 2
        m[i, rng.integers(0, side), rng.integers(0, side)] = rng.choice([5, 7.5, 10])
    return m.reshape(n, side * side)


def _corner_box_map(rng, n, side, blur):
    """Two bright tokens at opposite corners of a box whose area (grown by one when blurred) is about half."""
    dims = [(12, 24), (24, 12), (16, 18), (18, 16), (13, 22), (22, 13), (11, 26), (17, 17), (12, 23), (16, 17)]
    m = np.full((n, side, side), 0.01) * rng.random((n, side, side)) ** 2
    for i in range(n):
        bh, bw = dims[rng.integers(len(dims))]
        bh, bw = min(bh, side), min(bw, side)
        if blur and rng.random() < 0.7:
            bh, bw = max(bh - 2, 1), max(bw - 2, 1)
        y, x = rng.integers(0, side - bh + 1), rng.integers(0, side - bw + 1)
        m[i, y, x] = m[i, y + bh - 1, x + bw - 1] = 1.0
    return m.reshape(n, side * side)


def _f16_neighbours(x: float, n: int) -> np.ndarray:
    """float16 values just below, at and just above float16(x)."""
    c = np.float16(x)
    lo, hi = c, c
    out = [c]
    for _ in range(n):
        lo, hi = np.nextafter(lo, F16(0)), np.nextafter(hi, F16(1))
        out += [lo, hi]
    return np.array(out, dtype=F16)


def make_block(ref: Ref, rng, n: int, kind: str, side: int = SIDE) -> np.ndarray:
    """float16 store slice (n, L, H, V) for ``ref``'s layers/heads; ``kind`` picks the recipe."""
    v = side * side
    att = np.zeros((n, len(ref.layers), len(ref.heads), v), dtype=F16)
    pos_l = {lay: i for i, lay in enumerate(ref.layers)}
    pos_h = {hd: i for i, hd in enumerate(ref.heads)}
    label_pairs = [(lay, hd) for lay, hs in ref.label_heads.items() for hd in hs]
    sink_pairs = [(lay, hd) for lay, hs in ref.sink_heads.items() for hd in hs]
    k = len(label_pairs)
    scale = 10 ** rng.uniform(-3.0, -0.5, (n, 1))
    if kind == "random":
        lab = _random_label_heads(rng, n, k, side)
    elif kind == "edge":
        lab = _random_label_heads(rng, n, k, side, edge=True)
    elif kind in ("ties", "ties_unequal"):
        unit = 2.0 ** rng.choice([-11, -9, -7], (n, 1, 1))
        m = _quantised_map(rng, n, side)[:, None]
        lab = np.repeat(m, k, axis=1)
        if kind == "ties_unequal" and k > 1:
            # per-head offsets that cancel in the sum (exact in float16 and float64): the mean is still m
            d = rng.integers(-1, 2, (n, k - 1, v)) / 2 * (m >= k)
            lab[:, :-1] += d
            lab[:, -1] -= d.sum(axis=1)
        lab = lab * unit
    elif kind == "box_half":
        lab = np.repeat(_corner_box_map(rng, n, side, ref.qwen)[:, None], k, axis=1) * scale[:, :, None] * 10
    elif kind == "zero":
        lab = np.zeros((n, k, v))
    elif kind == "a_max_edge":  # Qwen: a_max at float16 neighbours of 5e-3 (all heads equal: the mean is exact)
        m = _random_label_heads(rng, n, 1, side)[:, 0]
        m = m / m.max(axis=1, keepdims=True)
        peak = rng.choice(_f16_neighbours(5e-3, 3), n).astype(np.float64)
        lab = np.repeat((m * peak[:, None]).astype(F16)[:, None], k, axis=1).astype(np.float64)
        lab[np.arange(n), :, m.argmax(axis=1)] = peak[:, None]
    elif kind == "mixed_heads":  # 13B: the lone layer-15 head looks elsewhere than the others
        lab = _random_label_heads(rng, n, k, side)
        lone = [i for i, (lay, _) in enumerate(label_pairs) if len(ref.label_heads[lay]) == 1]
        for i in lone:
            lab[:, i] = _random_label_heads(rng, n, 1, side)[:, 0] * 3
    else:
        raise ValueError(kind)
    for j, (lay, hd) in enumerate(label_pairs):
        att[:, pos_l[lay], pos_h[hd]] = lab[:, j].astype(F16)

    if sink_pairs:
        s = _random_sink_heads(rng, n, len(sink_pairs), side, ref.sink_thresh)
        if kind == "ties":
            # sink heads all equal near / at float16(threshold): the float16 mean is that value exactly; for
            # the float64 means, pairs of neighbours straddle the threshold
            vals = _f16_neighbours(ref.sink_thresh, 2).astype(np.float64)
            pick = rng.choice(vals, (n, len(sink_pairs), v))
            same = rng.random((n, 1, 1)) < 0.5
            pick = np.where(same, pick[:, :1], pick)
            where = rng.random((n, 1, v)) < 0.5
            s = np.where(where, pick, s)
        if kind == "zero" or (kind == "edge" and rng.random() < 0.3):
            s = np.where(rng.random((n, 1, 1)) < 0.5, 0.0, s)
        allsink = rng.random(n) < (0.5 if kind == "zero" else 0.04)
        s[allsink] = ref.sink_thresh * 4
        for j, (lay, hd) in enumerate(sink_pairs):
            att[:, pos_l[lay], pos_h[hd]] = s[:, j].astype(F16)
    if ref.preset == "llava_1_5_7b":
        # heads of layer 14 the map does not use: arbitrary values, must not matter
        others = [hd for hd in ref.heads if hd not in ref.label_heads[14]]
        att[:, pos_l[14], [pos_h[h] for h in others]] = rng.random((n, len(others), v)).astype(F16)
    return att


KINDS = {  # recipe: maps per run (>= 2,000 per preset in all)
    "random": 800,
    "edge": 250,
    "ties": 300,
    "ties_unequal": 250,
    "box_half": 250,
    "zero": 60,
    "mixed_heads": 100,
    "a_max_edge": 100,
}


def _known_fg(rng, n: int, side: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Random original image sizes (a third square) and the authors' known-fg masks of the square view."""
    sizes = []
    for _ in range(n):
        a = int(rng.integers(20, 1200))
        b = a if rng.random() < 0.33 else int(rng.integers(20, 1200))
        sizes.append((a, b))
    return np.stack([authors_qwen_known_fg(sz, side).ravel() for sz in sizes]), sizes


# ---------------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------------


def compare(ref: Ref, att16: np.ndarray, grid: np.ndarray, known_fg: np.ndarray | None, tag: str) -> int:
    """Label with the preset and with the restatement; return how many maps were compared (raises on any diff)."""
    n, v = len(att16), att16.shape[-1]
    params = resolve_label_params({"preset": ref.preset})
    out = assign_labels(
        att16.astype(np.float32),
        np.ones((n, len(ref.layers), v), dtype=np.float32),
        grid,
        [f"{tag}{i}" for i in range(n)],
        params,
        store_layers=ref.layers,
        store_heads=ref.heads,
        known_bg=None if known_fg is None else ~known_fg,
    )
    problems = []
    n_tokens_differ = 0
    for i in range(n):
        h, w = (int(x) for x in grid[i])
        nv = h * w
        a = authors_sample(ref, att16[i], (h, w), None if known_fg is None else known_fg[i].reshape(h, w))
        ours = out["labels"][i, :nv].astype(np.int64)
        theirs = np.where(a["labels"] == -100, -1, a["labels"])
        trained = ours if out["kept"][i] else np.full(nv, -1)
        before_drop = np.where(a["fg"], 1, np.where(a["bg"], 0, -1))
        diff = int((trained != theirs).sum())
        if out["a_max"][i] > 0:
            diff = max(diff, int((ours != before_drop).sum()))
            box = (out["fg_y0"][i], out["fg_x0"][i], out["fg_y1"][i], out["fg_x1"][i])
            if tuple(int(b) for b in a["box"]) != tuple(int(b) for b in box):
                problems.append(f"{tag}{i}: box {box} != authors' {a['box']}")
        n_tokens_differ += diff
        if diff:
            problems.append(f"{tag}{i}: {diff} labels differ")
        if bool(out["kept"][i]) != bool(a["kept"]):
            problems.append(f"{tag}{i}: kept {out['kept'][i]} ({out['skip_reason'][i]}) != authors' {a['kept']}")
        if int(out["n_sink"][i]) != a["n_sink"]:
            problems.append(f"{tag}{i}: n_sink {out['n_sink'][i]} != authors' {a['n_sink']}")
    assert not problems, f"{ref.preset}: {n_tokens_differ} differing tokens; " + "; ".join(problems[:8])
    return n


@pytest.mark.parametrize("preset", list(REFS))
def test_preset_reproduces_the_authors_labels(preset):
    ref = REFS[preset]
    rng = np.random.default_rng(sum(map(ord, preset)))
    compared, kept, ties = 0, 0, 0
    for kind, n in KINDS.items():
        if kind == "mixed_heads" and preset != "llava_1_5_13b":
            n = 20
        att16 = make_block(ref, rng, n, kind)
        grid = np.full((n, 2), SIDE)
        known = None
        if ref.qwen and kind != "zero":
            known, _ = _known_fg(rng, n, SIDE)  # the reference's setting: mask_known_bg with the original sizes
        compared += compare(ref, att16, grid, known, f"{kind}-")
        if kind == "ties":
            # the adversarial block really puts map values on the thresholds
            lab = resolve_label_params({"preset": preset})
            out = assign_labels(
                att16.astype(np.float32),
                np.ones((n, len(ref.layers), SIDE * SIDE), np.float32),
                grid,
                [str(i) for i in range(n)],
                lab,
                store_layers=ref.layers,
                store_heads=ref.heads,
                return_maps=True,
            )
            m, a_max = out["map"].astype(np.float64), out["a_max"].astype(np.float64)[:, None]
            ties += int(((m == 0.2 * a_max) | (m == 0.1 * a_max)).sum())
            kept += int(out["kept"].sum())
    assert compared >= 2000
    assert ties > 100 and kept > 0


@pytest.mark.parametrize("preset", ["qwen2_5_vl_3b", "qwen2_5_vl_7b_text"])
def test_qwen_presets_without_padding_mask_and_on_other_grids(preset):
    """The label stage today (no padding mask: ``mask_known_bg=False``), on the 24 x 24 grid, a 16 x 30 grid
    and mixed grids in one block (the ragged path of the blurred box)."""
    ref = REFS[preset]
    rng = np.random.default_rng(7)
    att16 = np.concatenate([make_block(ref, rng, 150, "random"), make_block(ref, rng, 100, "ties")])
    compare(ref, att16, np.full((len(att16), 2), SIDE), None, "square-")
    wide = make_block(ref, rng, 120, "random", side=30)[..., : 16 * 30]
    compare(ref, wide, np.tile([16, 30], (120, 1)), None, "wide-")
    mixed = make_block(ref, rng, 120, "random", side=20)
    grids = rng.integers(3, 21, (120, 2))
    for i, (h, w) in enumerate(grids):  # each sample's map is the first h*w tokens; the rest is store padding
        mixed[i, ..., h * w :] = 0
    compare(ref, mixed, grids, None, "ragged-")


def test_project_blur_is_torchvisions():
    """roi.smooth (scipy, mode='mirror') equals the restated torchvision blur (reflect padding) on fg-masked maps
    up to torchvision's float32 kernel, and their supports (> 0, what the box uses) agree exactly, edges and
    corners included."""
    rng = np.random.default_rng(3)
    for h, w in [(24, 24), (16, 30), (2, 5)]:
        for _ in range(30):
            m = rng.random((h, w)) * (rng.random((h, w)) < rng.uniform(0.02, 0.3))
            m[rng.integers(0, h), 0] = rng.random()
            ours = smooth(m)
            theirs = torchvision_gaussian_blur_3(torch.tensor(m)).numpy()
            # torchvision computes its kernel in float32 (then casts it to the image dtype): values agree to ~1e-8
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
            assert ((ours > 0) == (theirs > 0)).all()


def test_known_bg_is_a_sink_and_background():
    """The hook for the padding of a square view: zeroed before a_max, counted as sinks, bg even inside the box."""
    att = np.zeros((2, 1, 36), np.float32)
    att[:, 0, [14, 15, 21]] = [1.0, 0.9, 0.5]  # fg (2, 2), (2, 3), (3, 3): blurred box rows 1-4, cols 1-4
    att[:, 0, 0] = 5.0  # brighter than all, but padding in sample 0
    known = np.zeros((2, 36), bool)
    known[0, :6] = True  # the top row is padding
    known[0, 10] = True  # and (1, 4), inside the box
    params = LabelParams(strict=True, max_box_frac=0.5, min_a_max=5e-3, sink_method="none", box_blur=True)
    out = assign_labels(att, np.ones((2, 1, 36), np.float32), np.full((2, 2), 6), ["a", "b"], params, known_bg=known)
    assert out["a_max"].tolist() == [1.0, 5.0] and out["n_sink"].tolist() == [7, 0]
    assert (out["fg_y0"][0], out["fg_x0"][0], out["fg_y1"][0], out["fg_x1"][0]) == (1, 1, 4, 4)
    lab = out["labels"][0].reshape(6, 6)
    assert (lab[0] == 0).all() and lab[1, 4] == 0 and lab[1, 1] == -1 and lab[5, 5] == 0
    assert out["kept"][0] and out["labels"][0, [14, 15, 21]].tolist() == [1, 1, 1]
    assert out["labels"][1, 0] == 1 and out["n_fg"][1] == 1  # no padding: token 0 is the peak
    ref = authors_qwen_labels(np.zeros((6, 6)), att[0, 0].astype(np.float64).reshape(6, 6), ~known[0].reshape(6, 6))
    assert (
        ref["kept"] and ref["n_sink"] == 7 and (np.where(ref["labels"] == -100, -1, ref["labels"]) == lab.ravel()).all()
    )
