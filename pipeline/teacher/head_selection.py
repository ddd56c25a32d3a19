"""Choosing label layers, heads and sinks for a model from data (``sdrpn select-heads``, issue 19).

Input: an attention store with per-head maps of many layers (``dump`` with ``per_head``) over samples that
carry a ground-truth box, and each sample's GT token mask. Every function streams the store chunk by chunk and
keeps running sums or small per-sample arrays, never the maps:

- :func:`sink_layers`: per layer, a log-scale histogram of each visual token's hidden-state norm over its
  sample's median; a layer has *massive-norm* tokens when the histogram has an empty gap above
  ``min_ratio``; the layer with the widest gap and the threshold in its middle make the norm-based sink rule
  (paper eq. 1: ``sink_norm_layer``, ``sink_norm_factor``).
- :func:`sink_heads`: per (layer, head), how well its attention singles out those sink tokens (AUROC of the
  attention value, sink vs other tokens, from log-scale histograms) and the threshold that separates them best:
  the candidates of the reference's attention-based sink variant.
- :func:`head_scores`: per sample and (layer, head), after sink removal, the labels' fg rule on that head's
  map alone: fg precision (share of fg tokens in the box), fg recall, and whether the argmax lies in the box;
  :func:`bootstrap_ci` gives the means' confidence intervals over samples.
- :func:`greedy_heads`: the best heads combined by one flat mean (as the reference combines its heads), added
  best first while the label fg precision of the combination (the ``label`` stage's own code path,
  :func:`pipeline.teacher.label_report.label_quality`) improves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.config import check_indices, check_min, check_positive
from pipeline.io.attention_store import AttentionStore
from pipeline.teacher.label_report import label_quality
from pipeline.teacher.labels import LabelParams, fg_mask, label_block

# log10 bins of norm / median (1e-1 .. 1e4) and of attention (1e-9 .. 1)
RATIO_EDGES = np.linspace(-1.0, 4.0, 501)
ATTN_EDGES = np.linspace(-9.0, 0.0, 361)


@dataclass
class SelectParams:
    """The ``select_heads`` section of params.yaml."""

    n_samples: int = 300  # samples with a GT box and an answer, in manifest order
    layers: list[int] | None = None  # decoder layers scored; None = every layer
    batch_size: int = 8
    top_k: int = 8  # label candidates the greedy combination tries, best first
    bootstrap: int = 1000  # resamples of the samples for the confidence intervals
    seed: int = 0
    min_sink_ratio: float = 5.0  # massive-norm tokens lie above this x their sample's median norm

    def __post_init__(self) -> None:
        check_min("n_samples", self.n_samples)
        check_indices("layers", self.layers, optional=True, what="decoder layer indices")
        check_min("batch_size", self.batch_size)
        check_min("top_k", self.top_k)
        check_min("bootstrap", self.bootstrap, 0)
        check_min("seed", self.seed, 0)
        check_positive("min_sink_ratio", self.min_sink_ratio)


def _real(block, v: int) -> tuple[np.ndarray, np.ndarray]:
    nv = (block.grid[:, 0] * block.grid[:, 1]).astype(np.int64)
    return nv, np.arange(v) < nv[:, None]


def _median(x: np.ndarray, nv: np.ndarray) -> np.ndarray:
    return np.array([np.median(row[:k]) if k else np.nan for row, k in zip(x, nv, strict=True)])


@dataclass
class SinkLayer:
    """Massive-norm tokens of one layer: the threshold (x the sample median) in the widest empty gap of the
    norm-ratio histogram above the minimum, the gap's width (hi / lo), and the sinks per sample above it."""

    layer: int
    threshold: float | None
    gap: float
    per_sample: float
    max_ratio: float


def sink_layers(store: AttentionStore, min_ratio: float = 5.0) -> list[SinkLayer]:
    """Per stored layer, whether some visual tokens have massive hidden-state norms, and the threshold."""
    n_layers = len(store.layers)
    hist = np.zeros((n_layers, len(RATIO_EDGES) - 1), np.int64)
    top = np.zeros(n_layers)
    for block in store.iter_chunks():
        v = block.hidden_norm.shape[-1]
        nv, real = _real(block, v)
        for li in range(n_layers):
            norms = block.hidden_norm[:, li].astype(np.float64)
            ratio = norms / np.maximum(_median(norms, nv), 1e-12)[:, None]
            r = ratio[real & (ratio > 0)]
            hist[li] += np.histogram(np.log10(r), RATIO_EDGES)[0]
            top[li] = max(top[li], float(r.max(initial=0.0)))
    out = []
    lo_bin = int(np.searchsorted(RATIO_EDGES, np.log10(min_ratio)))
    for li, layer in enumerate(store.layers):
        h = hist[li]
        best_gap, thr = 0.0, None
        filled = np.flatnonzero(h)
        # an empty run of bins between two filled ones, its upper side above min_ratio
        for a, b in zip(filled[:-1], filled[1:], strict=True):
            if b - a > 1 and RATIO_EDGES[b] >= RATIO_EDGES[lo_bin]:
                gap = RATIO_EDGES[b] - RATIO_EDGES[a + 1]  # log10 width of the empty run
                if gap > best_gap:
                    best_gap, thr = gap, 10 ** ((RATIO_EDGES[a + 1] + RATIO_EDGES[b]) / 2)
        above = 0 if thr is None else int(h[np.searchsorted(RATIO_EDGES, np.log10(thr)) :].sum())
        out.append(SinkLayer(int(layer), thr, float(10**best_gap), above / max(len(store), 1), float(top[li])))
    return out


def choose_sink_rule(layers: list[SinkLayer], within: float = 0.8) -> dict:
    """The label keys of the norm-based sink rule (``sink_method: none`` when no layer has massive-norm tokens).

    The layer is the earliest whose gap is at least ``within`` of the widest one (in log width): massive norms
    persist once they appear, and their width varies a little from layer to layer, so the earliest clearly
    separated layer is taken (the reference reads LLaVA-7B's sinks at layer 2).
    """
    found = [s for s in layers if s.threshold is not None]
    if not found:
        return {"sink_method": "none"}
    widest = max(np.log10(s.gap) for s in found)
    best = min((s for s in found if np.log10(s.gap) >= within * widest), key=lambda s: s.layer)
    return {"sink_method": "norm", "sink_norm_layer": best.layer, "sink_norm_factor": round(float(best.threshold), 3)}


def _sink_masks(store: AttentionStore, block, sink_rule: dict) -> np.ndarray | None:
    """(n, V) sinks of ``block`` by ``sink_rule``, through the label stage's own code (None: no sink rule)."""
    if sink_rule.get("sink_method", "none") == "none":
        return None
    params = LabelParams(layers=[sink_rule["sink_norm_layer"]], **sink_rule)
    return label_block(store, block, params, return_maps=True)["sink"]


@dataclass
class SinkHeads:
    """Per (layer, head): AUROC of its attention at telling sink tokens from the rest, and the best threshold."""

    auroc: np.ndarray  # (L, H)
    threshold: np.ndarray  # (L, H) attention value maximising TPR - FPR
    n_sinks: int


def sink_heads(store: AttentionStore, sink_rule: dict) -> SinkHeads | None:
    """How well each stored head's attention singles out the sinks of ``sink_rule`` (None without sinks)."""
    if store.heads is None or sink_rule.get("sink_method", "none") == "none":
        return None
    shape = (len(store.layers), len(store.heads), len(ATTN_EDGES) - 1)
    pos, neg = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    n_sinks = 0
    for block in store.iter_chunks():
        sink = _sink_masks(store, block, sink_rule)
        _, real = _real(block, block.attention.shape[-1])
        n_sinks += int(sink.sum())
        logs = np.log10(np.maximum(block.attention.astype(np.float64), 1e-12))  # (n, L, H, V)
        # bin k holds [edge k, edge k+1): a value on an edge counts as reaching it
        idx = np.clip(np.searchsorted(ATTN_EDGES, logs, side="right") - 1, 0, shape[2] - 1)
        for li in range(shape[0]):
            for hi in range(shape[1]):
                b = idx[:, li, hi]
                pos[li, hi] += np.bincount(b[sink], minlength=shape[2])
                neg[li, hi] += np.bincount(b[real & ~sink], minlength=shape[2])
    if n_sinks == 0:
        return None
    # cumulative from the top bin down: TPR / FPR of "attention >= bin's lower edge"
    tp = np.cumsum(pos[..., ::-1], -1)[..., ::-1] / np.maximum(pos.sum(-1, keepdims=True), 1)
    fp = np.cumsum(neg[..., ::-1], -1)[..., ::-1] / np.maximum(neg.sum(-1, keepdims=True), 1)
    # AUROC = P(sink > other) + P(tie) / 2, ties within a bin
    p = pos / np.maximum(pos.sum(-1, keepdims=True), 1)
    q = neg / np.maximum(neg.sum(-1, keepdims=True), 1)
    below = np.cumsum(q, -1) - q
    auroc = (p * (below + q / 2)).sum(-1)
    best = np.argmax(tp - fp, -1)
    return SinkHeads(auroc, 10 ** ATTN_EDGES[best], n_sinks)


@dataclass
class HeadScores:
    """Per sample and (layer, head): the labels' fg rule on that head's sink-removed map, scored against the GT.

    ``precision`` / ``recall`` are NaN where undefined (no fg token; no GT token); ``argmax_in`` NaN where the
    map is all zero. ``layer_precision`` (n, L) is the same for each layer's head-mean map.
    """

    precision: np.ndarray  # (n, L, H)
    recall: np.ndarray
    argmax_in: np.ndarray
    layer_precision: np.ndarray  # (n, L)


def _scores(a: np.ndarray, gt: np.ndarray, real: np.ndarray, label: LabelParams):
    """fg precision, recall, argmax-in-box of maps ``a`` (m, V) against ``gt`` (m, V)."""
    masked = np.where(real, a, -np.inf)
    a_max = masked.max(1)
    fg = fg_mask(a, a_max, label, real)
    inter = (fg & gt).sum(1)
    n_fg, n_gt = fg.sum(1), gt.sum(1)
    precision = np.where(n_fg > 0, inter / np.maximum(n_fg, 1), np.nan)
    recall = np.where(n_gt > 0, inter / np.maximum(n_gt, 1), np.nan)
    arg = gt[np.arange(len(a)), masked.argmax(1)].astype(np.float64)
    return precision, recall, np.where(a_max > 0, arg, np.nan)


def head_scores(
    store: AttentionStore, gt_masks: np.ndarray, has_gt: np.ndarray, label: LabelParams, sink_rule: dict
) -> HeadScores:
    """Score every stored (layer, head) on the samples with a GT box (``gt_masks`` (n_samples, max_visual))."""
    if store.heads is None:
        raise ValueError(f"{store.path}: head selection needs a per-head store (dump.per_head)")
    n_l, n_h = len(store.layers), len(store.heads)
    prec, rec, arg, lay = [], [], [], []
    for block in store.iter_chunks():
        sel = has_gt[block.start : block.stop]
        if not sel.any():
            continue
        att = block.attention[sel].astype(np.float64)  # (n, L, H, V)
        n, v = len(att), att.shape[-1]
        _, real = _real(block, v)
        real = real[sel]
        sink = _sink_masks(store, block, sink_rule)
        if sink is not None:
            att = np.where(sink[sel][:, None, None, :], 0.0, att)
        gt = gt_masks[block.start : block.stop, :v][sel] & real
        flat = att.reshape(n * n_l * n_h, v)
        rep = np.repeat(np.arange(n), n_l * n_h)
        p, r, a = _scores(flat, gt[rep], real[rep], label)
        prec.append(p.reshape(n, n_l, n_h))
        rec.append(r.reshape(n, n_l, n_h))
        arg.append(a.reshape(n, n_l, n_h))
        lm = att.mean(2).reshape(n * n_l, v)
        rep = np.repeat(np.arange(n), n_l)
        lay.append(_scores(lm, gt[rep], real[rep], label)[0].reshape(n, n_l))
    if not prec:
        raise ValueError(f"{store.path}: no sample has a ground-truth box to select heads with")
    return HeadScores(np.concatenate(prec), np.concatenate(rec), np.concatenate(arg), np.concatenate(lay))


def bootstrap_ci(x: np.ndarray, reps: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """(mean, low, high) over the first axis of ``x`` (n, ...), NaNs left out, by resampling the n rows.

    Each resample draws n rows with replacement (multinomial counts), so the means of all columns come from one
    matrix product; ``reps`` 0 gives NaN bounds.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    ok = np.isfinite(flat)
    vals = np.where(ok, flat, 0.0)
    mean = vals.sum(0) / np.maximum(ok.sum(0), 1)
    mean = np.where(ok.any(0), mean, np.nan)
    if reps == 0:
        nan = np.full_like(mean, np.nan)
        return mean.reshape(x.shape[1:]), nan.reshape(x.shape[1:]), nan.reshape(x.shape[1:])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=reps).astype(np.float64)  # (reps, n)
    boot = (counts @ vals) / np.maximum(counts @ ok, 1)
    boot = np.where(counts @ ok > 0, boot, np.nan)
    alpha = (1 - level) / 2
    with np.errstate(all="ignore"):
        low, high = np.nanquantile(boot, alpha, 0), np.nanquantile(boot, 1 - alpha, 0)
    shape = x.shape[1:]
    return mean.reshape(shape), low.reshape(shape), high.reshape(shape)


def ranked_heads(scores: np.ndarray, store: AttentionStore) -> list[tuple[int, int]]:
    """(layer, head) model indices by mean score, best first (NaN last; ties: earlier layer, lower head)."""
    mean = np.nanmean(scores, 0) if len(scores) else scores
    order = sorted(
        ((li, hi) for li in range(mean.shape[0]) for hi in range(mean.shape[1])),
        key=lambda lh: (-(mean[lh] if np.isfinite(mean[lh]) else -np.inf), lh),
    )
    return [(int(store.layers[li]), int(store.heads[hi])) for li, hi in order]


def heads_dict(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    """{layer: [heads]} in layer order, heads sorted."""
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return {k: sorted(out[k]) for k in sorted(out)}


def label_precision(
    store: AttentionStore, params: LabelParams, gt_masks: np.ndarray, has_gt: np.ndarray
) -> tuple[float, int]:
    """(label fg precision, samples kept) of ``params`` on ``store``: the ``label_report`` figure."""
    metrics, _ = label_quality(store, params, gt_masks, has_gt)
    return float(metrics["labels"]["fg_precision"]), int(metrics["n_kept"])


def greedy_heads(
    store: AttentionStore,
    candidates: list[tuple[int, int]],
    base: LabelParams,
    gt_masks: np.ndarray,
    has_gt: np.ndarray,
) -> tuple[list[tuple[int, int]], list[dict]]:
    """Add ``candidates`` (best first) to one flat-mean combination while its label fg precision improves.

    ``base`` carries the label rule and the sink rule; its ``heads``/``layers`` are replaced. Returns the chosen
    heads and the trace (each candidate tried, the precision with it and whether it was kept).
    """
    chosen: list[tuple[int, int]] = []
    best = -np.inf
    trace = []
    for cand in candidates:
        trial = [*chosen, cand]
        params = replace(base, heads=heads_dict(trial), layers=None)
        prec, kept = label_precision(store, params, gt_masks, has_gt)
        better = bool(np.isfinite(prec) and prec > best + 1e-12)
        trace.append({"layer": cand[0], "head": cand[1], "fg_precision": prec, "n_kept": kept, "kept": better})
        if better:
            chosen, best = trial, prec
    return chosen, trace


@dataclass
class Selection:
    """Everything :func:`select_heads` found: the preset, its evidence and the baseline it was compared with."""

    preset: dict  # label keys: heads, sink rule
    dump: dict  # what ``dump`` must store for the preset (layers, per_head)
    precision: float  # label fg precision of the preset on the selection samples
    n_kept: int
    baseline_precision: float  # the same for the baseline label params
    baseline_kept: int
    n_samples: int
    layers: list[int]
    heads: list[int]
    mean: dict  # per metric: (L, H) means
    ci: dict  # per metric: ((L, H) low, (L, H) high)
    layer_precision: np.ndarray  # (L,) head-mean map's fg precision per layer
    sink_layers: list[SinkLayer]
    sink_heads: SinkHeads | None
    trace: list[dict]


def select_heads(
    store: AttentionStore,
    gt_masks: np.ndarray,
    has_gt: np.ndarray,
    label: LabelParams,
    baseline: LabelParams,
    params: SelectParams,
) -> Selection:
    """Rank heads and sinks on ``store`` and combine the best heads (see the module doc).

    ``label`` gives the label rule (tau_fg, tau_bg, strict, ...) the preset keeps; ``baseline`` is what the
    preset is compared with (e.g. the project's current label settings) on the same samples.
    """
    from pipeline.teacher.label_presets import dump_requirements  # label_presets imports config's pydantic

    found = sink_layers(store, params.min_sink_ratio)
    rule = choose_sink_rule(found)
    base = replace(
        label,
        sink_method=rule["sink_method"],
        sink_norm_layer=rule.get("sink_norm_layer"),
        sink_norm_factor=rule.get("sink_norm_factor", label.sink_norm_factor),
        sink_norm_abs=None,
    )
    scores = head_scores(store, gt_masks, has_gt, base, rule)
    stats = {}
    for name, x in (
        ("fg_precision", scores.precision),
        ("fg_recall", scores.recall),
        ("argmax_in_box", scores.argmax_in),
    ):
        stats[name] = bootstrap_ci(x, params.bootstrap, params.seed)
    candidates = ranked_heads(scores.precision, store)[: params.top_k]
    chosen, trace = greedy_heads(store, candidates, base, gt_masks, has_gt)
    preset = {"heads": heads_dict(chosen), **rule}
    precision, kept = label_precision(store, replace(base, heads=heads_dict(chosen), layers=None), gt_masks, has_gt)
    b_prec, b_kept = label_precision(store, baseline, gt_masks, has_gt)
    return Selection(
        preset=preset,
        dump=dump_requirements(LabelParams(heads=preset["heads"], **rule)),
        precision=precision,
        n_kept=kept,
        baseline_precision=b_prec,
        baseline_kept=b_kept,
        n_samples=int(has_gt.sum()),
        layers=[int(x) for x in store.layers],
        heads=[int(x) for x in store.heads],
        mean={k: v[0] for k, v in stats.items()},
        ci={k: (v[1], v[2]) for k, v in stats.items()},
        layer_precision=np.nanmean(scores.layer_precision, 0),
        sink_layers=found,
        sink_heads=sink_heads(store, rule),
        trace=trace,
    )
