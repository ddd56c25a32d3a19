"""Evaluate the embedded default model on held-out world samples (CPU or GPU).

Measures, through the ordinary ``from_pretrained`` + processor + chat-template path:

(a) accuracy with the base view alone vs with the GT-region crop appended as a second image
    (greedy first answer token = the glyph);
(b) per decoder layer, the response->image attention of the position that produces the first
    answer token (mean over heads, eager attention): the rate at which its argmax falls inside the
    GT box, the precision / recall of the fg rule (tokens with a >= 0.2 * a_max), and the share of
    the image attention mass inside the box;
(c) per layer, visual-token hidden-state norms (input of layer l; index n_layers = after the last
    layer): max / median per image, the largest ratio seen, and where the max-norm tokens sit, to
    tell whether sink tokens exist.

    python scripts/evaluate_embedded_model.py --model models/sdrpn-toy-llava --n 400 --json eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.world.generator import WorldParams, crop_box, generate_sample  # noqa: E402

FG_RATIO = 0.2
SINK_FACTOR = 10.0


def load(model_dir: str, device: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    return model.to(device).eval(), processor


def prompt(processor, question: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def box_cell_mask(box: tuple[int, int, int, int], width: int, height: int, grid: int) -> np.ndarray:
    """[grid*grid] bool: token cells whose centre lies inside ``box`` (source px; pad-to-square view)."""
    side = max(width, height)
    centres = (np.arange(grid) + 0.5) * side / grid
    xs = centres - (side - width) // 2
    ys = centres - (side - height) // 2
    x0, y0, x1, y1 = box
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return inside.reshape(-1)


@torch.no_grad()
def evaluate(model, processor, samples, batch: int, crop_margin: float, device: str) -> dict:
    tok = processor.tokenizer
    image_id = model.config.image_token_id
    n_layers = model.config.text_config.num_hidden_layers
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    correct_base, correct_crop = [], []
    argmax_in, prec, rec, mass, prec_d, argmax_d = ([[] for _ in range(n_layers)] for _ in range(6))
    norm_ratio = [[] for _ in range(n_layers + 1)]
    norm_argmax_cells = [Counter() for _ in range(n_layers + 1)]
    norm_argmax_in_box = [[] for _ in range(n_layers + 1)]
    for s0 in range(0, len(samples), batch):
        chunk = samples[s0 : s0 + batch]
        texts = [prompt(processor, s.question, 1) for s in chunk]
        enc = processor(images=[s.image for s in chunk], text=texts, return_tensors="pt", padding=True).to(device)
        out = model(**enc, output_attentions=True, output_hidden_states=True)
        answers = [tok.convert_tokens_to_ids(s.answer) for s in chunk]
        pred = out.logits[:, -1].argmax(-1).tolist()
        correct_base += [int(p == a) for p, a in zip(pred, answers, strict=True)]
        for b, s in enumerate(chunk):
            img_pos = (enc["input_ids"][b] == image_id).nonzero()[:, 0]
            mask = torch.from_numpy(box_cell_mask(s.box, s.image.width, s.image.height, grid)).to(device)
            for li in range(n_layers):
                a = out.attentions[li][b, :, -1, img_pos].float().mean(0)  # head-mean, answer row
                argmax_in[li].append(int(mask[a.argmax()]))
                fg = a >= FG_RATIO * a.max()
                prec[li].append(float((fg & mask).sum() / fg.sum()))
                rec[li].append(float((fg & mask).sum() / mask.sum()))
                mass[li].append(float(a[mask].sum() / a.sum()))
                # the paper's sink removal (eq. 1, the label stage's default): zero tokens whose input norm at
                # this layer is > 10x the image's median, then the same fg rule
                norms = out.hidden_states[li][b, img_pos].float().norm(dim=-1)
                d = a.masked_fill(norms > SINK_FACTOR * norms.median(), 0)
                fg = d >= FG_RATIO * d.max()
                prec_d[li].append(float((fg & mask).sum() / fg.sum()))
                argmax_d[li].append(int(mask[d.argmax()]))
            for li in range(n_layers + 1):
                norms = out.hidden_states[li][b, img_pos].float().norm(dim=-1)
                norm_ratio[li].append(float(norms.max() / norms.median()))
                j = int(norms.argmax())
                norm_argmax_cells[li][j] += 1
                norm_argmax_in_box[li].append(int(mask[j]))
        crops = [s.image.crop(crop_box(s.box, crop_margin, None, s.image.size)) for s in chunk]
        images = [im for s, c in zip(chunk, crops, strict=True) for im in (s.image, c)]
        texts = [prompt(processor, s.question, 2) for s in chunk]
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
        pred = model(**enc).logits[:, -1].argmax(-1).tolist()
        correct_crop += [int(p == a) for p, a in zip(pred, answers, strict=True)]
    n = len(samples)
    layers = []
    for li in range(n_layers):
        layers.append(
            {
                "layer": li,
                "argmax_in_box": float(np.mean(argmax_in[li])),
                "fg_precision": float(np.mean(prec[li])),
                "fg_recall": float(np.mean(rec[li])),
                "mass_in_box": float(np.mean(mass[li])),
                "fg_precision_without_sinks": float(np.mean(prec_d[li])),
                "argmax_in_box_without_sinks": float(np.mean(argmax_d[li])),
            }
        )
    norms = []
    for li in range(n_layers + 1):
        cell, count = norm_argmax_cells[li].most_common(1)[0]
        norms.append(
            {
                "hidden_state": li,
                "max_over_median_mean": float(np.mean(norm_ratio[li])),
                "max_over_median_max": float(np.max(norm_ratio[li])),
                "top_cell": [cell // grid, cell % grid],
                "top_cell_share": count / n,
                "max_norm_token_in_box": float(np.mean(norm_argmax_in_box[li])),
            }
        )
    box_share = float(np.mean([box_cell_mask(s.box, s.image.width, s.image.height, grid).mean() for s in samples]))
    return {
        "n": n,
        "acc_base": float(np.mean(correct_base)),
        "acc_crop": float(np.mean(correct_crop)),
        "gt_box_token_share": box_share,
        "attention": layers,
        "hidden_norms": norms,
    }


def print_report(r: dict) -> None:
    print(f"held-out samples: {r['n']}   GT box covers {100 * r['gt_box_token_share']:.1f}% of the tokens")
    print(f"(a) accuracy  base view only: {r['acc_base']:.3f}   base + GT crop: {r['acc_crop']:.3f}")
    print("(b) answer-row attention, head mean      (c) visual-token hidden norms (input of layer)")
    print(
        " layer  argmax_in_box  fg_prec  fg_recall  mass_in_box  (no sinks: argmax  fg_prec)"
        " | max/median mean  max  top cell (share)  in box"
    )
    for a, h in zip(r["attention"] + [None], r["hidden_norms"], strict=True):
        left = (
            f" {a['layer']:>5}  {a['argmax_in_box']:>13.3f}  {a['fg_precision']:>7.3f}  {a['fg_recall']:>9.3f}"
            f"  {a['mass_in_box']:>11.3f}  {a['argmax_in_box_without_sinks']:>17.3f}"
            f"  {a['fg_precision_without_sinks']:>7.3f}"
            if a
            else f" {'out':>5}  {'':>13}  {'':>7}  {'':>9}  {'':>11}  {'':>17}  {'':>7}"
        )
        print(
            f"{left} | {h['max_over_median_mean']:>15.2f}  {h['max_over_median_max']:>4.1f}"
            f"  {str(tuple(h['top_cell'])):>9} ({h['top_cell_share']:.2f})  {h['max_norm_token_in_box']:.2f}"
        )


def write_reference(model_dir: str, seed: int = 31337, n: int = 32) -> None:
    """Record the pipeline-path accuracy (base view, GT crop) on a fixed small held-out set, CPU float32."""
    from pipeline.models import load_adapter
    from pipeline.world.embedded_check import world_accuracy

    adapter = load_adapter(model_dir, device="cpu", dtype="float32")
    acc = world_accuracy(adapter, seed=seed, n=n)
    ref = {"seed": seed, "n": n, "device": "cpu", "dtype": "float32", "accuracy": acc}
    (Path(model_dir) / "reference_accuracy.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(f"reference accuracy (seed {seed}, {n} samples): {acc}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/sdrpn-toy-llava")
    p.add_argument("--n", type=int, default=400, help="held-out samples")
    p.add_argument("--world-seed", type=int, default=9001, help="held-out world seed (training used 1000-3999)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop-margin", type=float, default=0.25, help="GT crop = box grown by this share per side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--world", default=None, help="JSON WorldParams; default: the pipeline default world")
    p.add_argument(
        "--write-reference",
        action="store_true",
        help="also record the accuracy tests/test_embedded_model.py reproduces (reference_accuracy.json, seed 31337)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = load(args.model, args.device)
    # the pipeline's world (not the one recorded in training_summary.json: the generator has changed since)
    params = WorldParams(**(json.loads(args.world) if args.world else {}))
    samples = [generate_sample(params, args.world_seed, i) for i in range(args.n)]
    report = evaluate(model, processor, samples, args.batch, args.crop_margin, args.device)
    report.update(
        model=args.model,
        world_seed=args.world_seed,
        crop_margin=args.crop_margin,
        fg_ratio=FG_RATIO,
        seconds=round(time.time() - t0, 1),
        device=args.device,
    )
    print_report(report)
    if args.write_reference:
        write_reference(args.model)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
