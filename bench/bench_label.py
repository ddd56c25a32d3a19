"""Benchmark the label stage (zarr attention store -> labels.parquet) at paper scale.

Builds a synthetic store of 152,000 samples with 24x24 maps (1 layer, head-mean; smooth blob + noise +
a few high-norm sink tokens), then times ``label_store``. Store creation is not timed. Also times a naive
baseline on a subset and extrapolates it: "per-sample loop" = the same chunked zarr reads, then one numpy
call sequence per sample and per-row Python lists into Arrow (what a straightforward implementation does).

    .venv/bin/python bench/bench_label.py [--store PATH] [--n 152000] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store  # noqa: E402
from pipeline.teacher.labels import LabelParams, label_store  # noqa: E402

TARGET_S = 20.0
GRID = 24


def synthetic_block(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention (n, 1, V) and norms (n, 1, V): Gaussian blob + noise, plus 1-4 sinks per sample."""
    v = GRID * GRID
    yy, xx = np.mgrid[0:GRID, 0:GRID].reshape(2, 1, v).astype(np.float32)
    cy, cx = rng.uniform(0, GRID, (2, n, 1)).astype(np.float32)
    sig = rng.uniform(1.0, 5.0, (n, 1)).astype(np.float32)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))
    att = blob + rng.random((n, v), dtype=np.float32) * 0.15
    norms = rng.normal(40.0, 4.0, (n, v)).astype(np.float32)
    n_sink = rng.integers(1, 5, n)
    sink_pos = rng.integers(0, v, (n, 4))
    rows = np.repeat(np.arange(n), 4)
    keep = (np.arange(4)[None, :] < n_sink[:, None]).ravel()
    r, c = rows[keep], sink_pos.ravel()[keep]
    att[r, c] += rng.uniform(2.0, 8.0, len(r)).astype(np.float32)  # sinks soak up attention
    norms[r, c] *= rng.uniform(15.0, 40.0, len(r)).astype(np.float32)  # ...and have massive norms
    att *= 0.3 / att.sum(axis=1, keepdims=True)  # visual tokens get ~30% of the softmax mass
    return att[:, None], norms[:, None]


def make_store(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = AttentionStoreWriter.create(path, n, layers=[14], max_visual=GRID * GRID, attrs={"model_id": "synthetic"})
    step = writer.chunk_samples * 4
    for s in range(0, n, step):
        e = min(s + step, n)
        att, norms = synthetic_block(rng, e - s)
        ids = np.array([f"gqa_{i:07d}" for i in range(s, e)], dtype=object)
        grid = np.full((e - s, 2), GRID, np.int32)
        writer.write(s, ids, grid, rng.integers(1, 6, e - s), att, norms)
    writer.finalize()


def naive_label(store_path: Path, params: LabelParams, n_max: int) -> tuple[float, int]:
    """Per-sample loop baseline over the first ``n_max`` samples; returns (seconds, samples)."""
    t0 = time.perf_counter()
    store = open_attention_store(store_path)
    rows: dict[str, list] = {k: [] for k in ("sample_id", "labels", "n_fg", "n_bg", "a_max", "kept")}
    done = 0
    for block in store.iter_chunks(prefetch=False):
        for i in range(len(block.sample_ids)):
            h, w = (int(x) for x in block.grid[i])
            a = block.attention[i, 0, : h * w].astype(np.float64)
            nrm = block.hidden_norm[i, 0, : h * w]
            a[nrm > params.sink_norm_factor * np.median(nrm)] = 0.0
            a_max = a.max()
            fg = a >= params.tau_fg * a_max
            ys, xs = np.nonzero(fg.reshape(h, w))
            inbox = np.zeros((h, w), bool)
            inbox[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            bg = ~inbox.ravel() & (a <= params.tau_bg * a_max)
            lab = np.full(h * w, -1, np.int8)
            lab[fg], lab[bg] = 1, 0
            rows["sample_id"].append(str(block.sample_ids[i]))
            rows["labels"].append(lab.tolist())
            rows["n_fg"].append(int(fg.sum()))
            rows["n_bg"].append(int(bg.sum()))
            rows["a_max"].append(float(a_max))
            rows["kept"].append(bool(a_max > 0))
            done += 1
        if done >= n_max:
            break
    pa.table(rows)
    return time.perf_counter() - t0, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="store path (default: a temp dir); reused if it is complete")
    ap.add_argument("--n", type=int, default=152_000)
    ap.add_argument("--baseline-n", type=int, default=4096)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_label_"))
    store = args.store or tmp / "attention.zarr"
    try:
        try:
            reuse = open_attention_store(store).n_samples == args.n
        except Exception:
            reuse = False
        if not reuse:
            t0 = time.perf_counter()
            make_store(store, args.n)
            print(f"synthetic store: {args.n} samples in {time.perf_counter() - t0:.1f} s (not counted) at {store}")
        params = LabelParams()
        out = tmp / "labels.parquet"
        t0 = time.perf_counter()
        counts = label_store(store, params, out, inputs={"attention": "synthetic"}, progress=False)
        elapsed = time.perf_counter() - t0
        print(f"label_store: {elapsed:.2f} s for {args.n} samples ({args.n / elapsed:,.0f} samples/s), {counts}")
        cols = pq.read_table(out, columns=["n_fg", "n_bg", "n_sink"])
        stats = {c: round(pc.mean(cols[c]).as_py(), 1) for c in cols.column_names}
        print(f"  per-sample means {stats}")
        print(f"  vs 20 s target: {elapsed / TARGET_S:.2f}x of target ({'PASS' if elapsed < TARGET_S else 'FAIL'})")
        t_naive, n_naive = naive_label(Path(store), params, args.baseline_n)
        est = t_naive / n_naive * args.n
        print(f"baseline 'per-sample numpy loop' on {n_naive} samples: {t_naive:.2f} s -> {est:.1f} s extrapolated")
        print(f"  speed-up of label_store over the baseline: {est / elapsed:.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
