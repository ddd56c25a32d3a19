"""What the benchmark scripts share: real model shapes (random weights), a vocabulary, and a timer.

Importing it also makes the repository root importable (the scripts run as ``python bench/<script>.py``
and build their models with ``toymodels``, which is not part of the installed package).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toymodels.embedded import SIZES  # noqa: E402
from toymodels.llava import ToyLlavaSizes  # noqa: E402

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24x24 = 576 tokens) + Llama-2-7B (32 layers, 4096 hidden)
LLAVA7B = ToyLlavaSizes(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    text_hidden=4096,
    text_layers=32,
    text_heads=32,
    text_intermediate=11008,
    vocab_size=32064,
    max_position_embeddings=4096,
)
# the embedded default's shape (models/sdrpn-toy-llava): 14x14 grid, 8-layer decoder
EMBEDDED = SIZES
WORDS = [f"w{i}" for i in range(64)] + ["what", "is", "in", "the", "red", "box", "?"]


def random_llava(sizes: ToyLlavaSizes, device: torch.device, name: str):
    """A LLaVA adapter of shape ``sizes`` with random weights, built on ``device`` in bf16 on a GPU and float32
    on the CPU; returns (adapter, dtype)."""
    from pipeline.models import wrap_model
    from toymodels.llava import build_toy_llava

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, processor = build_toy_llava(WORDS, sizes)
    finally:
        torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return wrap_model(model, processor, name), dtype


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(fns: list, device: torch.device, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn within every round (after one warm-up round), so a
    machine that slows down or speeds up mid-run moves every side of a ratio alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]
