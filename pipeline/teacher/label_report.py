"""How well attention and labels localise, where ground-truth boxes exist (DVC metrics + paper Fig. 3).

For the raw layer/head-mean attention map (the labels' fg rule, ``strict`` included, applied without sink
removal) and for the final labels: precision (share of fg tokens inside the GT box), recall (share of
the GT box's tokens labelled fg), and the argmax-inside-box rate (argmax of the map after sink removal
for the labels); plus the histogram of Fig. 3, the share of tokens inside the GT box per bin of
a / a_max, and what the sink detector removed, with the max/median hidden-norm ratio on the layer the
sink detector reads. Labels, maps and sinks come from :func:`pipeline.teacher.labels.label_block`, the
``label`` stage's own code path, so the label figures describe exactly the labels that stage writes.
"""

from __future__ import annotations

import numpy as np

from pipeline.io.attention_store import AttentionStore
from pipeline.teacher.labels import LabelParams, fg_mask, label_block, label_plan


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


class _Acc:
    """Running sums for one map kind."""

    def __init__(self, bins: int):
        self.precision: list[np.ndarray] = []
        self.recall: list[np.ndarray] = []
        self.argmax_in: list[np.ndarray] = []
        self.bin_in = np.zeros(bins, np.int64)
        self.bin_all = np.zeros(bins, np.int64)
        self.bins = bins

    def add(self, a: np.ndarray, fg: np.ndarray, gt: np.ndarray, real: np.ndarray) -> None:
        inter = (fg & gt).sum(1)
        self.precision.append(_safe_div(inter, fg.sum(1)))
        self.recall.append(_safe_div(inter, gt.sum(1)))
        masked = np.where(real, a, -np.inf)
        a_max = masked.max(1)
        self.argmax_in.append(np.where(a_max > 0, gt[np.arange(len(a)), masked.argmax(1)], np.nan))
        ratio = np.where(a_max[:, None] > 0, a / np.where(a_max > 0, a_max, 1)[:, None], np.nan)
        idx = np.clip((ratio * self.bins).astype(np.int64, copy=False), 0, self.bins - 1)
        ok = real & np.isfinite(ratio)
        self.bin_in += np.bincount(idx[ok & gt], minlength=self.bins)
        self.bin_all += np.bincount(idx[ok], minlength=self.bins)

    def metrics(self) -> dict[str, float]:
        def mean(xs: list[np.ndarray]) -> float:
            x = np.concatenate(xs) if xs else np.array([np.nan])
            return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

        return {
            "fg_precision": mean(self.precision),
            "fg_recall": mean(self.recall),
            "argmax_in_box": mean(self.argmax_in),
        }

    def histogram(self) -> list[float]:
        return [float(x) for x in _safe_div(self.bin_in, self.bin_all)]


def label_quality(
    store: AttentionStore, params: LabelParams, gt_masks: np.ndarray, has_gt: np.ndarray, bins: int = 10
) -> tuple[dict, list[dict]]:
    """Metrics and Fig. 3 rows for the samples of ``store`` that have a ground-truth box.

    ``gt_masks`` (n_samples, max_visual) marks the visual tokens inside each sample's GT box (store order);
    ``has_gt`` (n_samples,) says which samples have one. Returns (metrics dict, histogram rows).
    """
    raw, final = _Acc(bins), _Acc(bins)
    n_sink = sink_in_box = n_samples = n_kept = 0
    norm_ratio: list[np.ndarray] = []
    norm_pos = label_plan(params, store.layers, store.heads).sink_norm_pos
    for block in store.iter_chunks():
        sel = has_gt[block.start : block.stop]
        if not sel.any():
            continue
        out = label_block(store, block, params, return_maps=True)
        v = out["map"].shape[1]
        nv = (block.grid[:, 0] * block.grid[:, 1])[sel]
        real = np.arange(v) < nv[:, None]
        gt = gt_masks[block.start : block.stop, :v][sel] & real
        raw_map = out["raw_map"][sel]
        raw_max = np.where(real, raw_map, -np.inf).max(1)
        raw.add(raw_map, fg_mask(raw_map, raw_max, params, real), gt, real)
        kept = out["kept"][sel]
        labels = out["labels"][sel][:, :v]
        final.add(out["map"][sel][kept], (labels == 1)[kept], gt[kept], real[kept])
        sink = out["sink"][sel] & real
        n_sink += int(sink.sum())
        sink_in_box += int((sink & gt).sum())
        n_samples += int(sel.sum())
        n_kept += int(kept.sum())
        norms = block.hidden_norm[sel][:, norm_pos, :v]
        med = np.array([np.median(nr[:k]) for nr, k in zip(norms, nv, strict=True)])
        norm_ratio.append(np.where(real, norms, 0).max(1) / np.maximum(med, 1e-12))
    ratios = np.concatenate(norm_ratio) if norm_ratio else np.array([np.nan])
    metrics = {
        "n_samples_with_gt": n_samples,
        "n_kept": n_kept,
        "raw_attention": raw.metrics(),
        "labels": final.metrics(),
        "sinks": {
            "per_sample": n_sink / max(n_samples, 1),
            "share_inside_gt_box": sink_in_box / n_sink if n_sink else float("nan"),
            "max_over_median_norm_mean": float(np.nanmean(ratios)),
            "max_over_median_norm_max": float(np.nanmax(ratios)),
        },
    }
    edges = np.linspace(0, 1, bins + 1)
    hist = [
        {"bin": f"{edges[i]:.1f}-{edges[i + 1]:.1f}", "raw_inside_gt": r, "denoised_inside_gt": f}
        for i, (r, f) in enumerate(zip(raw.histogram(), final.histogram(), strict=True))
    ]
    return metrics, hist
