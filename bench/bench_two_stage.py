"""Benchmark two-stage RoI inference against the baseline, measured in one run on the same model and batch.

Prints:
  stage 1 (frozen B layers + RPN, up to the last prompt token) vs a full SDPA prefill   (target <= 0.6x)
  two-stage throughput (stage 1 + stage 2 with a masked crop) vs the baseline          (target >= 0.7x; paper 0.62x),
    end to end, with the plain stage 2 and with stage 2 starting from stage 1's prefix cache
    (pipeline.inference.prefix_cache)
  Qwen presets also: the dump (truncated forward + captured rows) vs a full SDPA prefill (576 or 4096 visual tokens);
    Qwen has no prefix reuse, its stage 2 takes the original views' visual tokens from stage 1 instead

    python bench/bench_two_stage.py --preset embedded                       # CPU, the embedded default's shape
    python bench/bench_two_stage.py --preset llava7b --device cuda          # LLaVA-1.5-7B shape, bf16, B=15 R=3
    python bench/bench_two_stage.py --preset qwen7b --visual 4096 --device cuda   # Qwen2.5-VL-7B shape, B=16 R=3
    python bench/bench_two_stage.py --preset embedded --R 1 --crop-size 112       # a shallower RPN, smaller crops
    python bench/bench_two_stage.py --preset qwen_small --visual 196              # CPU, a small Qwen2.5-VL
    python bench/bench_two_stage.py --preset deepseek1_3b --batch 2 --repeats 1   # DeepSeek-VL-1.3B shape, B=9 R=3

Weights are random (no download); every answer is forced to the same length so both sides do equal work.
The stage-2 crop is a fixed 4x4-token region per image (a typical RoI), so the timing does not depend on
what an untrained RPN happens to predict.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from shapes import EMBEDDED, LLAVA7B, WORDS, timeit, timeit_interleaved

from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.roi import RoIParams
from pipeline.inference.two_stage import Stage1Output, two_stage_batch
from pipeline.models import wrap_model
from pipeline.student.rpn import RPN
from pipeline.teacher.attention_capture import capture_attention
from pipeline.teacher.decode import decode_batch
from toymodels.llava import build_toy_llava

PRESETS = {
    "embedded": dict(family="llava", sizes=EMBEDDED, B=3, R=3, batch=16, new_tokens=8, dump_layer=3),
    "llava7b": dict(family="llava", sizes=LLAVA7B, B=15, R=3, batch=32, new_tokens=16, dump_layer=14),
    "qwen7b": dict(family="qwen", B=16, R=3, batch=8, new_tokens=16, dump_layer=16),
    # CPU-sized Qwen2.5-VL (windowed vision tower, M-RoPE) of about the embedded LLaVA's size
    "qwen_small": dict(family="qwen", B=3, R=3, batch=8, new_tokens=8, dump_layer=3),
    # DeepSeek-VL-1.3B: SigLIP-L/16 at 384 px (576 tokens), 24-layer LLaMA decoder; the authors' K9T3 RPN
    "deepseek1_3b": dict(family="deepseek", B=9, R=3, batch=8, new_tokens=16, dump_layer=10),
}
QWEN_SMALL = dict(
    vision_hidden=128,
    vision_layers=8,
    vision_heads=4,
    window_size=112,
    fullatt_block_indexes=[3, 7],
    text_hidden=192,
    text_layers=8,
    text_heads=6,
    text_kv_heads=2,
    text_intermediate=384,
    mrope_section=[4, 6, 6],
)


def build(preset: dict, device: torch.device, dtype: torch.dtype, visual: int, crop_size: int | None = None):
    """A random-weight model of the preset's shape, wrapped in its adapter (LLaVA, DeepSeek-VL: stage-2 crops at
    ``crop_size``)."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if preset["family"] == "llava":
                model, processor = build_toy_llava(WORDS, preset["sizes"])
                kwargs = {"crop_size": crop_size}
            elif preset["family"] == "deepseek":
                from toymodels.deepseek import build_toy_deepseek, deepseek_vl_sizes

                model, processor = build_toy_deepseek(WORDS, deepseek_vl_sizes("1.3b"))
                kwargs = {"crop_size": crop_size}
            else:
                from toymodels.qwen import ToyQwenSizes, build_toy_qwen, qwen25_vl_sizes

                sizes = ToyQwenSizes(**QWEN_SMALL) if preset is PRESETS["qwen_small"] else qwen25_vl_sizes("7b")
                model, processor = build_toy_qwen(WORDS, sizes)
                side = int(round((visual**0.5) * 28))  # fixed resolution: (side / 28)^2 merged tokens
                kwargs = {"resolution": {"mode": "fixed", "size": side}}
    finally:
        torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return wrap_model(model, processor, "bench", **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--visual", type=int, default=576, help="Qwen: visual tokens per image (576 or 4096)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--B", type=int, default=None, help="frozen layers (default: the preset's)")
    ap.add_argument("--R", type=int, default=None, help="RPN layers (default: the preset's)")
    ap.add_argument("--crop-size", type=int, default=None, help="LLaVA/DeepSeek: stage-2 crop side, px (default: base)")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bsz = args.batch or preset["batch"]
    adapter = build(preset, device, dtype, args.visual, args.crop_size)
    preset = {**preset, **{k: v for k, v in (("B", args.B), ("R", args.R)) if v is not None}}
    model = adapter.model
    model.generation_config.min_new_tokens = preset["new_tokens"]  # equal work on both sides
    rpn = RPN.from_base(adapter, preset["B"], preset["R"]).to(device).eval()

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)) for _ in range(bsz)]
    questions = ["what is in the red box ?"] * bsz
    prompts = [adapter.render_prompt(q) for q in questions]
    batch = adapter.build_batch(images, prompts).to(device)
    h, w = batch.grids[0]
    print(
        f"preset {args.preset} on {device} ({dtype}), batch {bsz}, prompt {batch.inputs['input_ids'].shape[1]} "
        f"tokens, {h}x{w} visual grid, B={preset['B']} R={preset['R']}"
        + (f", crops at {args.crop_size} px" if args.crop_size else "")
    )

    def stage1():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            rpn(batch)

    def prefill():
        with torch.no_grad():
            model(**adapter.forward_inputs(batch), use_cache=False)

    t_stage1, t_prefill = timeit_interleaved([stage1, prefill], device, args.repeats)
    print(f"stage 1 (B + RPN)        {t_stage1 * 1e3:9.1f} ms/batch")
    print(f"full SDPA prefill        {t_prefill * 1e3:9.1f} ms/batch")
    print(f"RATIO stage-1 latency vs full prefill: {t_stage1 / t_prefill:.2f}x  (target <= 0.6x)")

    if preset["family"] == "qwen":
        responses = [list(rng.integers(10, 60, preset["new_tokens"])) for _ in range(bsz)]
        rbatch = adapter.build_batch(images, prompts, responses).to(device)
        t_dump = timeit(lambda: capture_attention(adapter, rbatch, [preset["dump_layer"]]), device, args.repeats)

        def full():
            with torch.no_grad():
                model(**adapter.forward_inputs(rbatch), use_cache=False)

        t_full = timeit(full, device, args.repeats)
        print(f"dump                     {t_dump * 1e3:9.1f} ms/batch")
        print(f"full SDPA prefill (+ans) {t_full * 1e3:9.1f} ms/batch")
        print(f"RATIO dump vs full SDPA prefill: {t_full / t_dump:.2f}x  (target >= 1.5x)")

    roi_map = np.zeros((h, w))
    roi_map[h // 3 : h // 3 + 4, w // 3 : w // 3 + 4] = 0.9  # a 4x4-token region (masked upscaling)
    maps = [roi_map] * bsz
    new = preset["new_tokens"]

    def baseline():
        decode_batch(adapter, images, questions, new)

    def two_stage(reuse: bool):
        """End to end as the evaluate stage runs it (prompt building, stage 1, crops, stage 2), with the RPN's
        map swapped for the fixed region after stage 1 ran."""
        run_stage1 = rpn_maps(rpn, reuse_prefix=reuse)

        def stage1_fixed(ims, qs):
            out = run_stage1(ims, qs)
            return Stage1Output(maps, out.prefix, out.features)

        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                two_stage_batch(adapter, images, questions, stage1_fixed, RoIParams(mode="masked"), new)

        return run

    t_base, t_plain, t_reuse = timeit_interleaved([baseline, two_stage(False), two_stage(True)], device, args.repeats)
    print(f"baseline (original view) {t_base * 1e3:9.1f} ms/batch ({new} new tokens)")
    what = "stage 2 starts from stage 1's cache" if adapter.supports_prefix_reuse else "stage 1's visual tokens"
    print(f"two-stage, plain stage 2 {t_plain * 1e3:9.1f} ms/batch (re-encodes the original view and prefix)")
    print(f"two-stage, prefix reuse  {t_reuse * 1e3:9.1f} ms/batch ({what})")
    print(f"RATIO two-stage (plain) throughput vs baseline: {t_base / t_plain:.2f}x")
    ratio = t_base / t_reuse
    print(f"RATIO two-stage (prefix reuse) throughput vs baseline: {ratio:.2f}x  (target >= 0.7x; paper 0.62x)")
    print(f"RATIO prefix reuse vs plain stage 2 (end to end): {t_plain / t_reuse:.2f}x faster")


if __name__ == "__main__":
    main()
