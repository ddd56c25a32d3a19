"""Benchmark the head-selection dump (every layer, every head) against the label dump (one layer, head-mean).

Prints, measured in one run on the same model and batch:
  time per sample of the selection capture (all layers per head) and of the label dump's capture, their ratio
  peak memory of the selection capture (GPU: torch's peak allocated; CPU: the process's peak RSS growth)
  time per sample of ranking (head_scores on the captured maps, sink removal included)
  the projected cost of `sdrpn select-heads` for 500 samples (dump + ranking; the greedy passes are a few more
  reads of the same store)

    python bench/bench_select_heads.py --preset embedded              # CPU, the embedded default's shape
    python bench/bench_select_heads.py --preset llava7b --device cuda  # LLaVA-1.5-7B shape, bf16
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from shapes import EMBEDDED, LLAVA7B, random_llava, sync, timeit

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.head_selection import head_scores
from pipeline.teacher.labels import LabelParams

PRESETS = {
    "llava7b": dict(sizes=LLAVA7B, label_layers=[14], batch=8, new_tokens=16),
    "embedded": dict(sizes=EMBEDDED, label_layers=[3], batch=8, new_tokens=8),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    bsz = args.batch or preset["batch"]
    adapter, dtype = random_llava(preset["sizes"], device, args.preset)
    n_layers = len(adapter.decoder_layers)
    n_heads = adapter.attention_geometry[0]

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)) for _ in range(bsz)]
    prompts = [adapter.render_prompt("what is in the red box ?")] * bsz
    responses = [list(rng.integers(10, 60, preset["new_tokens"])) for _ in range(bsz)]
    batch = adapter.build_batch(images, prompts, responses).to(device)
    every = list(range(n_layers))
    print(
        f"preset {args.preset} on {device} ({dtype}), batch {bsz}, {n_layers} layers x {n_heads} heads, "
        f"{batch.visual_index.shape[1]} visual tokens"
    )

    rss0 = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t_all = timeit(lambda: capture_attention(adapter, batch, every, per_head=True), device, args.repeats)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        what = "GPU peak allocated above the weights"
    else:
        peak, what = rss_mib() - rss0, "CPU peak RSS growth"
    t_label = timeit(lambda: capture_attention(adapter, batch, preset["label_layers"]), device, args.repeats)
    print(f"selection capture (all layers, per head)  {t_all / bsz * 1e3:9.1f} ms/sample")
    print(f"label dump capture ({preset['label_layers']}, head-mean)    {t_label / bsz * 1e3:9.1f} ms/sample")
    print(f"RATIO selection capture vs label dump capture: {t_all / t_label:.2f}x")
    print(f"peak memory of the selection capture: {peak:.0f} MiB ({what}, batch {bsz})")

    # ranking on a store of these maps (sink removal by norms, every head scored against a central GT box)
    cap = capture_attention(adapter, batch, every, per_head=True)
    v = batch.visual_index.shape[1]
    side = int(round(v**0.5))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        w = AttentionStoreWriter.create(path, bsz, every, v, heads=list(range(n_heads)))
        w.write(
            0,
            [f"s{i}" for i in range(bsz)],
            np.asarray(batch.grids, dtype=np.int32),
            cap.n_rows.cpu().numpy().astype(np.int32),
            cap.attention.float().cpu().numpy(),
            cap.hidden_norm.float().cpu().numpy(),
        )
        w.finalize()
        store = open_attention_store(path)
        gt = np.zeros((bsz, v), bool)
        box = np.zeros((side, side), bool)
        box[side // 3 : side // 3 + 4, side // 3 : side // 3 + 4] = True
        gt[:] = box.ravel()
        rule = {"sink_method": "norm", "sink_norm_layer": 0, "sink_norm_factor": 10.0}
        sync(device)
        t0 = time.perf_counter()
        head_scores(store, gt, np.ones(bsz, bool), LabelParams(**rule), rule)
        t_rank = (time.perf_counter() - t0) / bsz
    print(f"ranking (head_scores)                     {t_rank * 1e3:9.1f} ms/sample")
    per_sample = t_all / bsz + t_rank
    print(f"PROJECTED select-heads for 500 samples: {500 * per_sample / 60:.1f} min (dump + ranking)")


if __name__ == "__main__":
    main()
