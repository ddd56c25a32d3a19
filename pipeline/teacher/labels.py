"""Sink removal and tri-state RoI pseudo-labels (SPEC 1.3-1.4), vectorised over blocks of samples.

Numerics are pinned so a plain loop can reproduce them bit for bit. The map is one flat mean over every
selected (layer, head) map, as the reference label scripts take it: the maps are summed in selection order
(layers in the order given, each layer's heads in the order given) in float64 and the sum is divided by the
number of maps. With a single selected map it is the stored value, untouched. ``map_dtype="float16"``
reproduces the LLaVA-1.5-7B label script's float16 arithmetic instead (see :class:`LabelParams`).
Thresholds are ``tau * a_max`` in float64; the norm median is taken in float64.

Every consumer of the label rules goes through this module's public pieces, so they cannot drift:
:func:`label_block` labels a block of an attention store exactly as the ``label`` stage does (the stage,
``label_report`` and ``inspect`` call it), :func:`label_plan` resolves params to store axis positions
(incl. the sink detector's norm layer), :func:`attention_map` is the layer/head aggregation (also used
for the raw-attention ablation in ``evaluate``) and :func:`fg_mask` the foreground rule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import FieldError, check_choice, check_indices, check_min, check_range
from pipeline.inference.roi import smooth
from pipeline.io.attention_store import AttentionStore, Block, open_attention_store
from pipeline.io.contracts import write_parquet

SINK_METHODS = ("norm", "attention", "none")
MAP_DTYPES = ("float64", "float16")
# skip_code -> skip_reason; code 0 means kept (null reason).
SKIP_REASONS: tuple[str | None, ...] = (
    None,
    "a_max == 0: attention map is all zero",
    "a_max == 0: every visual token is a sink",
    "a_max < min_a_max",
    "fg box area >= max_box_frac of the grid",
    "empty response: no answer tokens to attend from",
)
ZERO_MAP, ALL_SINKS, LOW_A_MAX, BIG_BOX, NO_RESPONSE = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class LabelParams:
    """Label-assignment parameters; layer/head numbers are model indices as stored in the store's attrs."""

    layers: list[int] | None = None  # stored layers averaged into the map; None = all stored
    heads: list[int] | dict[int, list[int]] | None = None  # None = all stored / head-mean; dict = per layer
    sink_method: str = "norm"  # "norm" (paper eq. 1) | "attention" (reference code) | "none"
    sink_norm_factor: float = 10.0  # sink if norm > factor * per-sample median norm of real visual tokens
    sink_norm_abs: float | None = None  # absolute tau_norm; overrides the factor when set
    sink_norm_layer: int | None = None  # stored layer whose norms are used; None = first label layer
    sink_attn_layer: int | None = None  # "attention" variant: stored layer (LLaVA-7B reference: 2)
    sink_attn_heads: list[int] | None = None  # None = all stored heads / head-mean
    sink_attn_threshold: float = 1e-3  # sink if head-mean attention >= this
    tau_fg: float = 0.2
    tau_bg: float = 0.1
    strict: bool = False  # reference code: fg a > tau_fg*a_max, bg a < tau_bg*a_max
    max_box_frac: float | None = None  # reference 0.5: drop the sample when the fg box covers >= this
    min_a_max: float | None = None  # Qwen reference 5e-3: drop the sample when a_max < this
    soft_targets: bool = False  # also write a / a_max per token (ablation: an RPN regressing the map, no assignment)
    # Arithmetic of the label and sink maps. "float64": flat float64 mean (see the module doc). "float16": the
    # LLaVA-1.5-7B label script's (its maps are float16 arrays): each selected map is rounded to float16, summed
    # in order in float16 and divided by the count in float16 (((h1 + h2) + h3) / 3); the sink map is numpy's
    # float16 mean (float32 running sum in order, divided in float32, rounded to float16) and is compared with
    # the threshold rounded to float16.
    map_dtype: str = "float64"
    # Qwen2.5-VL reference: the fg box is the box of the fg-masked map blurred by a 3x3 Gaussian (sigma 1,
    # reflect-101 borders; pipeline.inference.roi.smooth) and thresholded at > 0, i.e. the fg box grown by one
    # token on every side, clipped to the grid. It then decides bg (outside the box) and max_box_frac.
    box_blur: bool = False
    # Qwen2.5-VL reference (mask_known_bg = fix_res): the tokens over the padding of a square view, which the
    # store's optional known_bg array lists, are sinks and background (assign_labels' known_bg). A store
    # without that array (a view without padding, or a store from before it) labels as if none were padding.
    # LLaVA's create_pseudo_labels has no such rule: its padding tokens are ordinary tokens.
    mask_known_bg: bool = False

    def __post_init__(self) -> None:
        check_indices("layers", self.layers, optional=True, what="layer indices")
        if isinstance(self.heads, dict):
            if not self.heads:
                raise FieldError("heads", "a per-layer mapping needs at least one layer (or null for all heads)")
            check_indices("heads", list(self.heads), what="layer indices")
            for layer, heads in self.heads.items():
                check_indices(f"heads.{layer}", heads, what="head indices")
            missing = sorted(set(self.layers or ()) - set(self.heads))
            if missing:  # each label layer needs its head list (extra layers in heads are left out)
                raise FieldError("heads", f"has no head list for layer(s) {missing} of layers {self.layers}")
        else:
            check_indices("heads", self.heads, optional=True, what="head indices")
        check_choice("sink_method", self.sink_method, SINK_METHODS)
        # 0 is allowed (every visual token a sink): tests and ablations use it
        check_min("sink_norm_factor", self.sink_norm_factor, 0)
        check_min("sink_norm_abs", self.sink_norm_abs, 0, optional=True)
        check_min("sink_norm_layer", self.sink_norm_layer, 0, optional=True)
        check_min("sink_attn_layer", self.sink_attn_layer, 0, optional=True)
        check_indices("sink_attn_heads", self.sink_attn_heads, optional=True, what="head indices")
        # >= 0 only: on real attention (probabilities) a value above 1 finds no sink, but stores of other scales exist
        check_min("sink_attn_threshold", self.sink_attn_threshold, 0)
        if self.sink_method == "attention" and self.sink_attn_layer is None:
            raise FieldError("sink_attn_layer", "sink_method 'attention' needs sink_attn_layer (got None)")
        check_range("tau_fg", self.tau_fg, 0, 1)
        check_range("tau_bg", self.tau_bg, 0, 1)
        if self.tau_bg > self.tau_fg:  # background must lie below foreground, or tokens could be both
            raise FieldError("tau_bg", f"must be <= tau_fg ({self.tau_fg}) (got {self.tau_bg})")
        check_range("max_box_frac", self.max_box_frac, 0, 1, low_open=True, optional=True)
        check_min("min_a_max", self.min_a_max, 0, optional=True)  # >= 0 only, as sink_attn_threshold
        check_choice("map_dtype", self.map_dtype, MAP_DTYPES)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LabelParams:
        """Build from a params.yaml ``label`` mapping with the one params parser (unknown keys are an error)."""
        from pipeline.config import parse_section  # here: config's pydantic is only needed when parsing

        return parse_section(cls, d, "label")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Select = list[tuple[int, list[int] | None]]  # (layer position, head positions or None for the head-mean axis)


@dataclass(frozen=True)
class LabelPlan:
    """Params resolved to axis positions of a block."""

    select: Select  # what :func:`attention_map` averages into the map
    sink_norm_pos: int  # layer position of the norms the "norm" sink detector reads
    sink_attn: tuple[int, list[int] | None] | None  # "attention" variant: (layer position, head positions)


def label_plan(params: LabelParams, store_layers: Sequence[int], store_heads: Sequence[int] | None) -> LabelPlan:
    """Resolve ``params`` against the stored layers/heads (``store_heads`` None: the store holds the head-mean).

    The norm layer is ``sink_norm_layer``, else the first label layer. Raises ValueError naming the bad field.
    """
    layer_pos = {int(lay): i for i, lay in enumerate(store_layers)}
    head_pos = None if store_heads is None else {int(h): i for i, h in enumerate(store_heads)}

    def lpos(layer: int, what: str) -> int:
        if int(layer) not in layer_pos:
            raise ValueError(f"{what}: layer {layer} is not in the store (stored layers {list(store_layers)})")
        return layer_pos[int(layer)]

    def hpos(heads: Sequence[int] | None, what: str) -> list[int] | None:
        if heads is None:
            return None if head_pos is None else list(range(len(head_pos)))
        if head_pos is None:
            raise ValueError(f"{what}: head subset {list(heads)} needs a per-head store, this one holds the head-mean")
        missing = [h for h in heads if int(h) not in head_pos]
        if missing or not heads:
            raise ValueError(f"{what}: heads {missing or '[]'} not in the store (stored heads {list(store_heads)})")
        return [head_pos[int(h)] for h in heads]

    heads = params.heads
    layers = list(heads) if isinstance(heads, dict) and params.layers is None else params.layers
    layers = list(store_layers) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers: empty selection")
    select = []
    for lay in layers:
        hs = heads.get(lay, heads.get(str(lay))) if isinstance(heads, dict) else heads
        if isinstance(heads, dict) and hs is None:
            raise ValueError(f"heads: no head list for layer {lay}")
        select.append((lpos(lay, "layers"), hpos(hs, "heads")))
    norm_layer = layers[0] if params.sink_norm_layer is None else params.sink_norm_layer
    sink_attn = None
    if params.sink_method == "attention":
        sink_attn = (lpos(params.sink_attn_layer, "sink_attn_layer"), hpos(params.sink_attn_heads, "sink_attn_heads"))
    return LabelPlan(select, lpos(norm_layer, "sink_norm_layer"), sink_attn)


def attention_map(
    attention: np.ndarray, select: Select, dtype: str = "float64", accumulate: str | None = None
) -> np.ndarray:
    """(n, V) map: one flat mean over every selected (layer, head) map, summed in selection order.

    ``attention`` is (n, L, V) head-mean or (n, L, H, V) per-head; ``select`` as in :class:`LabelPlan`. Each
    selected head counts once, whatever its layer (LLaVA-13B's 3 + 1 + 3 heads each weigh 1/7). On a head-mean
    store (no head axis) the pairs are the layers: each stored head-mean counts once.

    Each map is taken in ``dtype``, summed left to right in ``accumulate`` (default ``dtype``), divided by the
    number of maps in that dtype and returned in ``dtype``. The default (float64) returns a single selected map
    untouched, in the stored dtype. ``dtype="float16"`` is the LLaVA-7B label map, ``dtype="float16",
    accumulate="float32"`` numpy's float16 mean (its sink map); see :class:`LabelParams`.
    """
    pairs = [(lp, h) for lp, hp in select for h in ([None] if hp is None else hp)]
    if not pairs:
        raise ValueError("attention_map: empty selection")

    def one(lp: int, h: int | None) -> np.ndarray:
        return attention[:, lp] if h is None else attention[:, lp, h]

    dt = np.dtype(dtype)
    acc = dt if accumulate is None else np.dtype(accumulate)
    if len(pairs) == 1 and dt == np.float64 and acc == np.float64:
        return one(*pairs[0])
    total = one(*pairs[0]).astype(dt)  # a fresh array
    if acc != dt:
        total = total.astype(acc)
    for lp, h in pairs[1:]:
        m = one(lp, h)
        # Sequential adds (not np.mean's pairwise sum) so a plain loop reproduces them; float32 -> float64 is
        # exact, so the default adds the stored map as is.
        total += m if dt == np.float64 else m.astype(dt)
    if len(pairs) > 1:
        total /= len(pairs)
    return total.astype(dt, copy=False)


def fg_mask(a: np.ndarray, a_max: np.ndarray, params: LabelParams, real: np.ndarray | None = None) -> np.ndarray:
    """Foreground rule: ``a > tau_fg * a_max`` when ``strict`` else ``>=``, threshold in float64.

    ``a`` (n, V), ``a_max`` (n,); rows whose ``a_max`` is not positive have no fg; ``real`` (n, V), when
    given, masks out padding.
    """
    a_max = np.asarray(a_max)
    thr = params.tau_fg * a_max.astype(np.float64)[:, None]
    fg = a > thr if params.strict else a >= thr
    fg[~(a_max > 0)] = False
    if real is not None:
        fg &= real
    return fg


def _check_finite(x: np.ndarray, real: np.ndarray | None, sample_ids: Sequence[str], field: str) -> None:
    # float64 sums of float32 cannot overflow, so a non-finite sum means a non-finite element.
    sums = x.reshape(len(x), -1).sum(axis=1, dtype=np.float64)
    for i in np.flatnonzero(~np.isfinite(sums)):
        bad = ~np.isfinite(x[i])
        if real is not None:
            bad &= real[i]
        if bad.any():
            where = tuple(int(k[0]) for k in np.nonzero(bad))
            raise ValueError(f"sample {sample_ids[i]!r}: non-finite value in {field} at index {where}")


def _median(x: np.ndarray, nv: np.ndarray, uniform: bool) -> np.ndarray:
    """Per-row median of the first nv[i] entries, np.median semantics with the midpoint taken in float64."""
    # Selecting in the input dtype is exact (order is preserved) and half the work of a float64 copy.
    if uniform:
        k = int(nv[0])
        part = np.partition(x, [(k - 1) // 2, k // 2], axis=1)
        lo, hi = part[:, (k - 1) // 2], part[:, k // 2]
    else:
        pad = np.arange(x.shape[1]) >= nv[:, None]
        s = np.sort(np.where(pad, np.inf, x), axis=1)
        lo = np.take_along_axis(s, ((nv - 1) // 2)[:, None], 1)[:, 0]
        hi = np.take_along_axis(s, (nv // 2)[:, None], 1)[:, 0]
    return (lo.astype(np.float64) + hi) / 2


def assign_labels(
    attention: np.ndarray,
    hidden_norm: np.ndarray,
    grid: np.ndarray,
    sample_ids: Sequence[str],
    params: LabelParams,
    *,
    store_layers: Sequence[int] | None = None,
    store_heads: Sequence[int] | None = None,
    n_response: np.ndarray | None = None,
    known_bg: np.ndarray | None = None,
    return_maps: bool = False,
) -> dict[str, np.ndarray]:
    """Label a block of samples.

    ``attention`` is (n, L, V) head-mean or (n, L, H, V) per-head, ``hidden_norm`` (n, L, V), ``grid`` (n, 2);
    tokens past grid_h*grid_w are padding. ``store_layers``/``store_heads`` name the stored layers/heads along
    the L/H axes (default 0..L-1 / 0..H-1). ``n_response`` (n,) lets a sample whose answer had no rows be
    reported as such rather than as an all-zero map. ``known_bg`` (n, V) bool marks tokens known to show no image
    content (the Qwen reference's ``mask_known_bg``: the grey padding of its square view); they are treated as
    the reference treats them: counted as sinks (zeroed before a_max, in ``n_sink``) and labelled background
    even inside the fg box (not when a_max == 0: such samples stay all -1). ``return_maps`` adds ``raw_map``
    (the layer/head mean before sink removal), ``map`` (after it) and ``sink`` (bool, incl. ``known_bg``), each
    (n, V) on the real tokens, for reports.
    Returns per-sample arrays: labels (n, V) int8 (-1 past n_visual), grid_h, grid_w, n_fg, n_bg, n_ignore,
    n_sink, fg_y0/fg_x0/fg_y1/fg_x1 (inclusive, -1 when no fg; with ``box_blur`` the blurred box the rules use),
    a_max float32, sink_tau float64 (NaN unless sink_method is "norm"), kept, skip_code, skip_reason.
    """
    n, n_layers, v = len(attention), attention.shape[1], attention.shape[-1]
    per_head = attention.ndim == 4
    if store_layers is None:
        store_layers = range(n_layers)
    if per_head and store_heads is None:
        store_heads = range(attention.shape[2])
    plan = label_plan(params, store_layers, store_heads if per_head else None)

    grid = np.asarray(grid, dtype=np.int64).reshape(n, 2)
    gh, gw = grid[:, 0], grid[:, 1]
    nv = gh * gw
    bad_grid = (nv > v) | (grid < 1).any(axis=1)
    if bad_grid.any():
        raise ValueError(f"grid_h*grid_w outside 1..{v} for samples {list(np.asarray(sample_ids)[bad_grid][:5])}")
    uniform = n > 0 and bool((grid == grid[0]).all())
    if uniform:
        # Same grid everywhere: drop the padding columns and skip all masking.
        v0 = int(nv[0])
        attention, hidden_norm, real = attention[..., :v0], hidden_norm[..., :v0], None
    else:
        v0 = v
        real = np.arange(v) < nv[:, None]
    if known_bg is not None:
        known_bg = np.asarray(known_bg, dtype=bool).reshape(n, v)[:, :v0]
        if real is not None:
            known_bg = known_bg & real
    _check_finite(
        attention, None if real is None else real[:, None, None] if per_head else real[:, None], sample_ids, "attention"
    )
    _check_finite(hidden_norm, None if real is None else real[:, None], sample_ids, "hidden_norm")

    a = raw_map = attention_map(attention, plan.select, params.map_dtype)
    sink, sink_tau = _sinks(attention, hidden_norm, params, plan, real, nv, uniform)
    if known_bg is not None:
        sink = known_bg if sink is None else sink | known_bg
    if sink is not None:
        a = np.where(sink, a.dtype.type(0), a)
    a_max = (a if real is None else np.where(real, a, -np.inf)).max(axis=1, initial=-np.inf)
    zero = ~(a_max > 0)
    fg = fg_mask(a, a_max, params, real)
    thr_bg = params.tau_bg * a_max.astype(np.float64)[:, None]

    box_of = _blurred_support(a, fg, gh, gw) if params.box_blur else fg
    if uniform:
        y0, x0, y1, x1, in_box = _box_uniform(box_of, int(gh[0]), int(gw[0]))
    else:
        y0, x0, y1, x1, in_box = _box_ragged(box_of, gw)
    bg = a < thr_bg if params.strict else a <= thr_bg
    bg &= ~in_box
    if known_bg is not None:
        bg |= known_bg & ~fg
    bg[zero] = False
    if real is not None:
        bg &= real
    # fg -> 1, bg -> 0, everything else (ignore, padding) -> -1
    lab = fg.view(np.int8) - (~(fg | bg)).view(np.int8)
    if uniform and v0 < v:
        labels = np.full((n, v), -1, dtype=np.int8)
        labels[:, :v0] = lab
    else:
        labels = lab

    n_fg = np.count_nonzero(fg, axis=1)
    n_bg = np.count_nonzero(bg, axis=1)
    n_sink = np.zeros(n, np.int64) if sink is None else np.count_nonzero(sink, axis=1)
    has_box = y0 >= 0
    area = np.where(has_box, (y1 - y0 + 1) * (x1 - x0 + 1), 0)

    code = np.zeros(n, dtype=np.int8)
    if params.max_box_frac is not None:
        code[has_box & (area >= params.max_box_frac * nv)] = BIG_BOX
    if params.min_a_max is not None:
        code[a_max.astype(np.float64) < params.min_a_max] = LOW_A_MAX
    code[zero] = ZERO_MAP
    code[zero & (n_sink == nv)] = ALL_SINKS
    if n_response is not None:
        code[np.asarray(n_response) == 0] = NO_RESPONSE

    i32 = np.int32
    if params.soft_targets:
        denom = np.where(zero, 1.0, a_max.astype(np.float64))[:, None]
        soft = np.where(zero[:, None], 0.0, a / denom).astype(np.float32)
        if real is not None:
            soft = np.where(real, soft, np.float32(0))
        if uniform and v0 < v:
            soft = np.pad(soft, ((0, 0), (0, v - v0)))
    maps = {"soft_target": soft} if params.soft_targets else {}
    if return_maps:
        no_sink = np.zeros(a.shape, dtype=bool)
        maps |= {"raw_map": raw_map, "map": a, "sink": no_sink if sink is None else sink}
    return maps | {
        "labels": labels,
        "grid_h": gh.astype(i32),
        "grid_w": gw.astype(i32),
        "n_fg": n_fg.astype(i32),
        "n_bg": n_bg.astype(i32),
        "n_ignore": (nv - n_fg - n_bg).astype(i32),
        "n_sink": n_sink.astype(i32),
        "fg_y0": y0.astype(i32),
        "fg_x0": x0.astype(i32),
        "fg_y1": y1.astype(i32),
        "fg_x1": x1.astype(i32),
        "a_max": a_max.astype(np.float32),
        "sink_tau": sink_tau,
        "kept": code == 0,
        "skip_code": code,
        "skip_reason": np.array(SKIP_REASONS, dtype=object)[code],
    }


def _sinks(attention, hidden_norm, params: LabelParams, plan: LabelPlan, real, nv, uniform):
    """Sink mask (None when sink_method is "none") and the per-sample norm threshold (NaN otherwise)."""
    n = len(attention)
    tau = np.full(n, np.nan)
    if params.sink_method == "none":
        return None, tau
    if params.sink_method == "norm":
        norms = hidden_norm[:, plan.sink_norm_pos]
        if params.sink_norm_abs is not None:
            tau = np.full(n, float(params.sink_norm_abs))
        else:
            tau = params.sink_norm_factor * _median(norms, nv, uniform)
        sink = norms > tau[:, None]
    elif params.map_dtype == "float16":
        # numpy's float16 mean of float16 maps, compared in float16 (a Python float meets a float16 array there)
        s = attention_map(attention, [plan.sink_attn], "float16", accumulate="float32")
        sink = s >= np.float16(params.sink_attn_threshold)
    else:
        s = attention_map(attention, [plan.sink_attn])
        # np.float64: a bare Python float would be cast down to the map's float32 (NEP 50)
        sink = s >= np.float64(params.sink_attn_threshold)
    if real is not None:
        sink &= real
    return sink, tau


def _blurred_support(a: np.ndarray, fg: np.ndarray, gh: np.ndarray, gw: np.ndarray) -> np.ndarray:
    """Tokens where the fg-masked map blurred by :func:`~pipeline.inference.roi.smooth` (3x3, sigma 1) is > 0.

    The Qwen reference takes its fg box from that blur; on each sample's own grid, one sample at a time.
    """
    support = np.zeros(fg.shape, dtype=bool)
    masked = np.where(fg, a, 0).astype(np.float64)
    for i in np.flatnonzero(fg.any(axis=1)):
        h, w = int(gh[i]), int(gw[i])
        support[i, : h * w] = (smooth(masked[i, : h * w].reshape(h, w)) > 0).ravel()
    return support


def _box_uniform(fg: np.ndarray, h: int, w: int):
    """Inclusive fg bounding box per sample on a shared h x w grid, and the in-box mask."""
    n = len(fg)
    g = fg.reshape(n, h, w)
    rows, cols = g.any(axis=2), g.any(axis=1)
    has = rows.any(axis=1)
    y0 = np.where(has, rows.argmax(axis=1), -1)
    y1 = np.where(has, h - 1 - rows[:, ::-1].argmax(axis=1), -1)
    x0 = np.where(has, cols.argmax(axis=1), -1)
    x1 = np.where(has, w - 1 - cols[:, ::-1].argmax(axis=1), -1)
    ar_h, ar_w = np.arange(h), np.arange(w)
    rin = (ar_h >= y0[:, None]) & (ar_h <= y1[:, None])
    cin = (ar_w >= x0[:, None]) & (ar_w <= x1[:, None])
    return y0, x0, y1, x1, (rin[:, :, None] & cin[:, None, :]).reshape(n, h * w)


def _box_ragged(fg: np.ndarray, gw: np.ndarray):
    """Same as :func:`_box_uniform` for per-sample grids (row-major, width gw[i])."""
    n, v = fg.shape
    pos = np.arange(v)
    r, c = pos // gw[:, None], pos % gw[:, None]
    has = fg.any(axis=1)
    first = fg.argmax(axis=1)
    last = v - 1 - fg[:, ::-1].argmax(axis=1)
    y0 = np.where(has, first // gw, -1)
    y1 = np.where(has, last // gw, -1)
    x0 = np.where(has, np.where(fg, c, v).min(axis=1), -1)
    x1 = np.where(has, np.where(fg, c, -1).max(axis=1), -1)
    in_box = (r >= y0[:, None]) & (r <= y1[:, None]) & (c >= x0[:, None]) & (c <= x1[:, None])
    return y0, x0, y1, x1, in_box


def label_block(
    store: AttentionStore, block: Block, params: LabelParams, return_maps: bool = False
) -> dict[str, np.ndarray]:
    """:func:`assign_labels` on one block of ``store``, with the store's layer/head names and response counts,
    and with ``mask_known_bg`` the store's padding tokens (``known_bg``; None when the store has none).

    The ``label`` stage writes exactly these labels; reports and inspection call this too, so they see them.
    A value error (a non-finite value, a bad grid, a layer the store lacks) is raised again naming the store.
    """
    try:
        return assign_labels(
            block.attention,
            block.hidden_norm,
            block.grid,
            block.sample_ids,
            params,
            store_layers=store.layers,
            store_heads=store.heads,
            n_response=block.n_response,
            known_bg=block.known_bg if params.mask_known_bg else None,
            return_maps=return_maps,
        )
    except ValueError as exc:
        if type(exc) is not ValueError:  # subclasses (ContractError, ParamsError) already say what they concern
            raise
        # assign_labels names the sample and field; the store is the file a user has to go and look at.
        raise ValueError(f"{store.path}: {exc}") from exc


def labels_table(out: dict[str, np.ndarray], sample_ids: np.ndarray) -> pa.Table:
    """Arrow table for the labels contract, built from flat numpy buffers."""
    gh, gw = out["grid_h"], out["grid_w"]
    nv = gh.astype(np.int64) * gw
    labels = _per_token(out["labels"], nv)
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(np.asarray(sample_ids, dtype=object), type=pa.string()),
        "grid_h": pa.array(gh),
        "grid_w": pa.array(gw),
        "labels": labels,
    }
    for k in ("n_fg", "n_bg", "n_ignore", "n_sink"):
        cols[k] = pa.array(out[k])
    for k in ("fg_y0", "fg_x0", "fg_y1", "fg_x1"):
        cols[k] = pa.array(out[k], mask=out[k] < 0)
    cols["a_max"] = pa.array(out["a_max"])
    tau = out["sink_tau"].astype(np.float32)
    cols["sink_tau"] = pa.array(tau, mask=np.isnan(tau))
    cols["kept"] = pa.array(out["kept"])
    cols["skip_reason"] = pa.array(list(SKIP_REASONS), type=pa.string()).take(pa.array(out["skip_code"]))
    if "soft_target" in out:
        cols["soft_target"] = _per_token(out["soft_target"], nv)
    return pa.table(cols)


def _per_token(values: np.ndarray, nv: np.ndarray) -> pa.Array:
    """(n, V) per-token values as a fixed-size list column when every grid matches, else trimmed lists."""
    if len(nv) and (nv == nv[0]).all():
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values[:, : nv[0]]).ravel()), int(nv[0]))
    flat = values[np.arange(values.shape[1]) < nv[:, None]]  # row-major: each row's real tokens, in order
    offsets = np.concatenate([[0], np.cumsum(nv)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def label_store(
    store: AttentionStore | str | os.PathLike,
    params: LabelParams,
    out_path: str | os.PathLike,
    inputs: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Label every sample of ``store`` chunk by chunk and write ``labels.parquet``; returns kept/skip counts."""
    from tqdm import tqdm

    if not isinstance(store, AttentionStore):
        store = open_attention_store(store)
    parts: list[dict[str, np.ndarray]] = []
    ids: list[np.ndarray] = []
    with tqdm(total=store.n_samples, desc="label", unit="sample", disable=not progress) as bar:
        for block in store.iter_chunks():
            parts.append(label_block(store, block, params))
            ids.append(block.sample_ids)
            bar.update(block.stop - block.start)
    merged = _concat(parts)
    table = labels_table(merged, np.concatenate(ids) if ids else np.array([], dtype=object))
    write_parquet(table, out_path, "labels", params=params.to_dict(), inputs=inputs)
    counts = np.bincount(merged["skip_code"].astype(np.int64), minlength=len(SKIP_REASONS))
    return {"n_samples": store.n_samples, "kept": int(counts[0])} | {
        str(r): int(c) for r, c in zip(SKIP_REASONS[1:], counts[1:], strict=True) if c
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
