"""Benchmark RPN training: samples/s of the real training loop (images from disk, batch building, frozen
backbone forward, RPN forward/backward, AdamW) and peak GPU memory.

Reference: the paper trains 152K samples in about 2 h on 4x A6000, about 21 samples/s; the target on one
H100 is >= 42 samples/s (152K in under an hour).

    python bench/bench_train.py --preset embedded                  # CPU, the embedded default's shape
    python bench/bench_train.py --preset llava7b --device cuda     # one H100: LLaVA-1.5-7B shape, random bf16 weights
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from shapes import EMBEDDED, LLAVA7B, random_llava

from pipeline.student.params import TrainParams
from pipeline.student.train import Sample, train_rpn

PAPER_SAMPLES_PER_S = 152_000 / (2 * 3600)  # ~21: 152K samples in ~2 h on 4x A6000
TARGET_SAMPLES_PER_S = 42.0  # one H100: 152K in under an hour

PRESETS = {
    "llava7b": dict(sizes=LLAVA7B, B=15, R=3, global_batch=128, micro_batch=32, steps=4),
    "embedded": dict(sizes=EMBEDDED, B=3, R=3, global_batch=32, micro_batch=16, steps=4),
}
QUESTION = "what is in the red box ? w1 w2 w3 w4 w5 w6 w7 w8"  # about a GQA question's length


def make_samples(root: Path, n: int, grid: tuple[int, int], seed: int = 0) -> list[Sample]:
    """``n`` JPEGs of a typical source size on disk, with random tri-state labels."""
    rng = np.random.default_rng(seed)
    n_vis = grid[0] * grid[1]
    out = []
    for i in range(n):
        path = root / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        labels = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=n_vis, p=[0.5, 0.4, 0.1])
        out.append(Sample(f"b{i}", str(path), QUESTION, labels, grid))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--global-batch", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps; the first is not timed (warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    global_batch = args.global_batch or preset["global_batch"]
    micro_batch = args.micro_batch or preset["micro_batch"]
    steps = args.steps or preset["steps"]

    t0 = time.perf_counter()
    adapter, dtype = random_llava(preset["sizes"], device, args.preset)
    grid = adapter.grid_shape
    print(f"built {args.preset} on {device} ({dtype}) in {time.perf_counter() - t0:.1f} s")

    params = TrainParams(
        B=preset["B"],
        R=preset["R"],
        global_batch=global_batch,
        micro_batch=micro_batch,
        holdout_frac=0.0,
        bf16="auto",
        save_every=10**9,
        log_every=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(Path(tmp), global_batch * steps, grid)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = train_rpn(adapter, samples, params, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    rate = result.metrics["samples_per_s"]
    seq = adapter.build_batch([Image.new("RGB", (8, 8))], [adapter.render_prompt(QUESTION)]).inputs["input_ids"]
    print(
        f"preset {args.preset}: B={params.B} R={params.R}, global batch {global_batch}, micro batch {micro_batch}, "
        f"{steps} steps, sequence {seq.shape[1]} tokens ({grid[0] * grid[1]} visual), bf16 autocast "
        f"{'on' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'off'}"
    )
    for r in result.records:
        print(f"  step {r['step']}: {r['time_s']:.2f} s, loss {r['loss']:.4f}")
    mem = f"peak GPU {peak:.1f} GiB" if device.type == "cuda" else "peak GPU n/a (CPU)"
    print(f"training      {rate:9.1f} samples/s  (steps 2..{steps})   {mem}")
    print(f"RATIO vs paper (~{PAPER_SAMPLES_PER_S:.0f} samples/s on 4x A6000): {rate / PAPER_SAMPLES_PER_S:.2f}x")
    print(f"RATIO vs target ({TARGET_SAMPLES_PER_S:.0f} samples/s on one H100): {rate / TARGET_SAMPLES_PER_S:.2f}x")


if __name__ == "__main__":
    main()
