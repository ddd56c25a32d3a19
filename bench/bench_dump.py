"""Benchmark the dump (truncated SDPA forward + captured rows) against full prefills, and decode+dump
against the reference code's style (batch 1, eager, attentions returned at every generation step).

Prints, measured in one run on the same model and batch:
  dump vs full SDPA prefill          (target on GPU with a LLaVA-1.5-7B-shaped model: >= 1.5x)
  dump vs full eager output_attentions prefill
  batched decode + dump vs reference (target >= 8x)

    python bench/bench_dump.py --preset embedded            # CPU, the embedded default's shape
    python bench/bench_dump.py --preset llava7b --device cuda  # one H100, random weights, bf16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from shapes import EMBEDDED, LLAVA7B, random_llava, timeit

from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import decode_batch

PRESETS = {
    "llava7b": dict(sizes=LLAVA7B, layers=[14], batch=48, new_tokens=16),
    "embedded": dict(sizes=EMBEDDED, layers=[3], batch=16, new_tokens=8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-samples", type=int, default=4, help="samples timed for the batch-1 reference")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    batch_size = args.batch or preset["batch"]

    adapter, dtype = random_llava(preset["sizes"], device, args.preset)
    model = adapter.model
    # random weights never say EOS on purpose: force every response to full length for equal work
    model.generation_config.eos_token_id = None

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)) for _ in range(batch_size)]
    questions = ["what is in the red box ?"] * batch_size
    prompts = [adapter.render_prompt(q) for q in questions]
    responses = [list(rng.integers(10, 60, preset["new_tokens"])) for _ in range(batch_size)]
    batch = adapter.build_batch(images, prompts, responses).to(device)
    seq = batch.inputs["input_ids"].shape[1]
    print(
        f"preset {args.preset} on {device} ({dtype}), batch {batch_size}, sequence {seq} tokens, "
        f"{adapter.tokens_per_image} visual, layers {preset['layers']}"
    )

    def dump():
        capture_attention(adapter, batch, preset["layers"])

    def sdpa_prefill():
        with torch.no_grad():
            model(**adapter.forward_inputs(batch), use_cache=False)

    def eager_prefill():
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                model(**adapter.forward_inputs(batch), use_cache=False, output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_dump = timeit(dump, device, args.repeats)
    mem_dump = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    t_sdpa = timeit(sdpa_prefill, device, args.repeats)
    try:
        t_eager = timeit(eager_prefill, device, args.repeats)
    except torch.OutOfMemoryError:
        t_eager = float("nan")
        torch.cuda.empty_cache()
    print(f"dump                 {t_dump * 1e3:9.1f} ms/batch   (peak GPU {mem_dump:.1f} GiB)")
    print(f"full SDPA prefill    {t_sdpa * 1e3:9.1f} ms/batch")
    print(f"full eager prefill   {t_eager * 1e3:9.1f} ms/batch   (output_attentions=True, all layers)")
    print(f"RATIO dump vs full SDPA prefill:  {t_sdpa / t_dump:.2f}x  (target >= 1.5x)")
    print(f"RATIO dump vs full eager prefill: {t_eager / t_dump:.2f}x")

    # decode + dump, batched, vs the reference style: batch 1, eager, attentions at every step
    new = preset["new_tokens"]

    def ours():
        rows = decode_batch(adapter, images, questions, max_new_tokens=new)
        b = adapter.build_batch(images, prompts, [r["response_token_ids"] for r in rows]).to(device)
        capture_attention(adapter, b, preset["layers"])

    n_ref = min(args.reference_samples, batch_size)

    def reference():
        model.set_attn_implementation("eager")
        try:
            for i in range(n_ref):
                one = adapter.build_batch(images[i : i + 1], prompts[i : i + 1]).to(device)
                with torch.no_grad():
                    model.generate(
                        **one.inputs,
                        do_sample=False,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        output_attentions=True,
                        return_dict_in_generate=True,
                        pad_token_id=adapter.pad_token_id,
                    )
        finally:
            model.set_attn_implementation("sdpa")

    t_ours = timeit(ours, device, args.repeats) / batch_size
    t_ref = timeit(reference, device, max(1, args.repeats - 1)) / n_ref
    print(f"decode+dump batched  {t_ours * 1e3:9.1f} ms/sample ({new} new tokens, batch {batch_size})")
    print(f"reference style      {t_ref * 1e3:9.1f} ms/sample (batch 1, eager, output_attentions every step)")
    print(f"RATIO decode+dump vs reference style: {t_ref / t_ours:.2f}x  (target >= 8x)")


if __name__ == "__main__":
    main()
