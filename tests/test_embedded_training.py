"""The embedded model's trainer (toymodels/embedded, scripts/train_embedded_model.py) on tiny configurations."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.student.train import TrainParams, cosine_lr, lr_at
from pipeline.world.generator import WorldParams, world_vocabulary
from toymodels.embedded.data import generate_data
from toymodels.embedded.loop import LR_FLOOR, run
from toymodels.embedded.losses import answer_attention, box_masks, point_loss, positions, read_loss
from toymodels.llava import ToyLlavaSizes, build_toy_llava

ROOT = Path(__file__).resolve().parent.parent
# 56 px views in 4 px patches: the world's 14 x 14 token grid, at a fraction of the embedded model's cost
TINY = ToyLlavaSizes(
    image_size=56,
    patch_size=4,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    text_hidden=32,
    text_layers=3,
    text_heads=2,
    text_intermediate=64,
    max_position_embeddings=512,
)


def _script():
    spec = importlib.util.spec_from_file_location("train_embedded_model", ROOT / "scripts/train_embedded_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_schedule_is_lr_at_without_floor_and_the_recipe_with_it():
    for total, frac in ((100, 0.1), (37, 0.03), (5, 0.0)):
        p = TrainParams(lr=3e-4, warmup_frac=frac)
        warmup = math.ceil(frac * total)
        assert [cosine_lr(s, total, p.lr, warmup) for s in range(total + 2)] == [
            lr_at(s, total, p) for s in range(total + 2)
        ]
    lr, total, warmup = 7e-4, 60, 5
    lrs = [cosine_lr(s, total, lr, warmup, floor=LR_FLOOR, peak_in_warmup=True) for s in range(total + 1)]
    # the embedded recipe's schedule, as its checkpoint was trained: warmup (s+1)/warmup, cosine to 5%
    for s, v in enumerate(lrs):
        want = lr * min(1.0, (s + 1) / warmup)
        if s >= warmup:
            want = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup)))))
        assert v == want
    assert lrs[warmup - 1] == lr and lrs[-1] == pytest.approx(LR_FLOOR * lr)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))


def test_point_loss_is_zero_on_the_target_and_positive_elsewhere():
    grid, image = 14, slice(2, 2 + 14 * 14)
    cells = torch.tensor([[[3, 4, 6, 8]]])  # one row, frame rows 3-5, cols 4-7
    inside = box_masks(cells, grid)[0, 0]
    on = torch.zeros(1, 2, 1, 2 + 196 + 5)
    on[..., image] = inside.float() / inside.sum()
    assert point_loss(on, cells, 2, image, grid).abs() < 1e-5
    off = torch.zeros_like(on)
    off[..., image] = (~inside).float() / (~inside).sum()
    half = (on + off) / 2
    assert point_loss(off, cells, 2, image, grid) > point_loss(half, cells, 2, image, grid) > 0.5
    # the read loss is the same rule on the crop's glyph cells
    crop = slice(5, 5 + 196)
    glyph_cells = torch.zeros(1, 196, dtype=torch.bool)
    glyph_cells[0, 40:43] = True
    att = torch.zeros(1, 2, 1, 5 + 196)
    att[..., 45] = 1.0  # first crop token 40
    assert read_loss(att, glyph_cells, 2, crop).abs() < 1e-5
    assert read_loss(torch.roll(att, 10, -1), glyph_cells, 2, crop) > 10


def test_answer_attention_is_the_forward_pass_attention():
    model, processor = build_toy_llava(world_vocabulary(), ToyLlavaSizes(), seed=0)
    model.set_attn_implementation("eager")
    ids = torch.randint(5, len(processor.tokenizer), (2, 12))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, 2:5] = False  # dropped tokens: masked out and skipped by the positions, as masked crops are fed
    lm = model.model.language_model
    rows = torch.tensor([7, 11])
    with torch.no_grad():
        for k in (None, keep):
            kw = {} if k is None else {"attention_mask": k.long(), "position_ids": positions(k)}
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True, **kw)
            for li, layer in enumerate(lm.layers):
                att = answer_attention(layer, lm.rotary_emb, out.hidden_states[li], rows, k)
                torch.testing.assert_close(att, out.attentions[li][:, :, rows], rtol=1e-5, atol=1e-6)


def test_crops_show_the_named_frame(tmp_path):
    params = WorldParams()
    generate_data(tmp_path, [(5, params, 6)], workers=1, margin=0.2, jitter=0.15, image_size=56)
    a = {k: np.load(tmp_path / f"{k}.npy") for k in ("crop", "crop_colour", "base_colour", "target", "frame_colour")}
    assert a["crop"].shape == (6, 56, 56, 3) and a["crop"].dtype == np.uint8
    for i in range(6):
        colour = a["frame_colour"][i, a["target"][i]] + 1  # the named frame's colour class
        assert colour >= 1
        on_crop = (a["crop_colour"][i] == colour).mean()
        # the crop is the frame plus a margin: the frame fills most of it, and a small part of the base view
        assert on_crop > 0.3 and on_crop > 3 * (a["base_colour"][i] == colour).mean()
    assert json.loads((tmp_path / "meta.json").read_text())["parts"][0][0] == 5


def test_training_lowers_the_loss_and_writes_the_model(tmp_path):
    argv = (
        f"--out {tmp_path / 'model'} --cache {tmp_path / 'cache'} --seed 0 --n-images 24 --n-easy 8 --n-heldout 4"
        " --workers 1 --steps 20 --batch 2 --turns 2 --crop-batch 2 --lr 1e-2 --warmup 2 --curriculum-steps 2"
        " --eval-every 100 --point-weight 0.5 --point-layer 1 --point-heads 1 --point-rows both --sink-weight 0.1"
        " --sink-layers 1,2 --sink-heads 1 --read-weight 0.5 --read-layer 2 --read-heads 1 --crop-mask-prob 0.5"
        " --threads 1"  # a tiny model on a shared CPU: a second thread only waits for the first
    ).split()
    threads = torch.get_num_threads()
    try:
        res = run(_script().parse_args(argv), sizes=TINY)
    finally:
        torch.set_num_threads(threads)
    assert len(res.losses) == 20 and all(math.isfinite(v) for v in res.losses)
    assert np.mean(res.losses[-5:]) < 0.8 * np.mean(res.losses[:5])
    summary = json.loads((res.out / "training_summary.json").read_text())
    assert summary["steps"] == 20 and summary["history"][-1]["step"] == 20
    assert (res.out / "model.safetensors").exists() and (res.out / "tokenizer.json").exists()
