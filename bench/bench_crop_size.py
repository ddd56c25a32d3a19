"""Accuracy and throughput of SD-RPN (masked upscaling) against the baseline, per stage-2 crop size.

Runs on the embedded default's trained artifacts (after ``dvc repro``): the evaluation manifest, the base model
and the trained RPN. For each LLaVA ``crop_size`` (pixels of the square view a crop is re-encoded at; the base
view is 224 = 14x14 tokens) it answers the whole manifest with the baseline and with SD-RPN, batch by batch,
and prints accuracy and throughput relative to the baseline timed in the same loop (the target of issue 5 is
>= 0.7x). Smaller crops mean fewer stage-2 tokens and less zoom; the vision tower's position embeddings are
interpolated for them, which the embedded model never saw in training, so accuracy is the question.

    .venv/bin/python bench/bench_crop_size.py                        # 224 160 128 112 96
    .venv/bin/python bench/bench_crop_size.py --sizes 224 112 --n 96
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.roi import RoIParams
from pipeline.inference.scoring import score
from pipeline.inference.two_stage import two_stage_batch
from pipeline.io.contracts import read_parquet
from pipeline.io.images import load_images
from pipeline.models import load_adapter
from pipeline.student.rpn import RPN
from pipeline.teacher.decode import decode_batch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 128, 112, 96])
    ap.add_argument("--n", type=int, default=None, help="first n manifest rows (default: all)")
    ap.add_argument("--rpn", type=Path, default=ROOT / "artifacts/rpn")
    ap.add_argument("--manifest", type=Path, default=ROOT / "artifacts/eval/manifest.parquet")
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    ev = params["evaluate"]
    rows = read_parquet(args.manifest, "manifest").to_pylist()[: args.n]
    print(f"{len(rows)} samples, batch {ev['batch_size']}, {ev['max_new_tokens']} new tokens, roi {ev['roi']}")
    for size in args.sizes:
        adapter = load_adapter(ROOT / params["model"]["path"], "cpu", "float32", crop_size=size)
        rpn = RPN.load(adapter, args.rpn).eval()
        roi = RoIParams(**{**ev["roi"], "mode": "masked"})
        t_base = t_two = 0.0
        acc_base, acc_two, tokens = [], [], []
        for start in range(0, len(rows), ev["batch_size"]):
            chunk = rows[start : start + ev["batch_size"]]
            images = load_images([r["image"] for r in chunk], [r["sample_id"] for r in chunk])
            qs = [r["question"] for r in chunk]
            t0 = time.perf_counter()
            base = decode_batch(adapter, images, qs, ev["max_new_tokens"])
            t1 = time.perf_counter()
            two, _ = two_stage_batch(adapter, images, qs, rpn_maps(rpn, ev["reuse_prefix"]), roi, ev["max_new_tokens"])
            t2 = time.perf_counter()
            t_base += t1 - t0
            t_two += t2 - t1
            for r, b, s in zip(chunk, base, two, strict=True):
                acc_base.append(score(b["response"], r.get("answer"), r.get("answers"), ev["scoring"]))
                acc_two.append(score(s["response"], r.get("answer"), r.get("answers"), ev["scoring"]))
                tokens.append(s["n_crop_tokens"])
        n = len(acc_base)
        print(
            f"crop_size {size:4d} ({adapter.crop_grid(0, 0)[0]:2d}x{adapter.crop_grid(0, 0)[1]:<2d} tokens): "
            f"baseline acc {sum(acc_base) / n:.3f}  sdrpn_masked acc {sum(acc_two) / n:.3f}  "
            f"mean crop tokens {sum(tokens) / n:6.1f}  "
            f"RATIO throughput vs baseline {t_base / t_two:.2f}x  (target >= 0.7x)"
        )


if __name__ == "__main__":
    main()
