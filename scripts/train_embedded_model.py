"""Train the embedded default model (a small LLaVA) on the synthetic world, from a seed.

Data are generated in-process with a process pool into ``.npy`` memory maps (the base view and
one training crop per image, already resized to the model's 224 px view, plus the frames'
colours, glyphs and token-cell boxes), then moved to the device once; a step only indexes them.

Each step mixes two kinds of sample:
* base view only, ``--turns`` QA turns about different frames of one image;
* base view + a high-resolution crop of the named frame (random margin and jitter) as a second
  image, one QA turn.
Loss is on the answer tokens (glyph and ``</s>``). Training-only extras, never saved: a
per-token auxiliary head on the projector output (glyph and frame colour of every token cell),
and optionally a "point" loss that asks ``--point-heads`` heads of decoder layer
``--point-layer`` to put the answer position's attention on the named frame's tokens.

The saved directory is a plain ``LlavaForConditionalGeneration`` + processor (fp32 safetensors).

    python scripts/train_embedded_model.py --out models/sdrpn-toy-llava --time-budget 380
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:  # older transformers (the GPU machine's) lack the PIL image processor; the processor is only saved, not used
    from transformers import LlavaImageProcessorPil  # noqa: F401
except ImportError:  # pragma: no cover
    import transformers

    transformers.LlavaImageProcessorPil = transformers.LlavaImageProcessor


from pipeline.world.generator import GLYPHS, WorldParams, WorldSample, crop_box, generate_sample, world_vocabulary  # noqa: E402
from toymodels.llava import ToyLlavaSizes, build_toy_llava, save_toy_llava  # noqa: E402

SIZES = ToyLlavaSizes(
    image_size=224,
    patch_size=16,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    text_hidden=192,
    text_layers=8,
    text_heads=6,
    text_intermediate=384,
    max_position_embeddings=1024,
)
MAX_FRAMES = 8  # named frames stored per image (WorldParams.max_frames must not exceed it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_DISTRACTOR_COLOUR = 1  # colour label of grey distractor frames = len(colours) + 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- views and labels


def to_view(img: Image.Image, size: int) -> np.ndarray:
    """What the LLaVA processor feeds the model, as uint8 HWC: pad to square (CLIP mean colour), bicubic resize."""
    w, h = img.size
    if w != h:
        side = max(w, h)
        fill = tuple(int(m * 255) for m in CLIP_MEAN)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))


def view_cell_centres(view: tuple[int, int, int, int], grid: int, pad: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source-pixel centres (x, y) of the grid cells of a view of the source rectangle ``view``.

    ``pad``: the view pads the rectangle to a square (the processor's base view); else it stretches it (a crop).
    """
    x0, y0, x1, y1 = view
    w, h = x1 - x0, y1 - y0
    if not pad:
        return x0 + (np.arange(grid) + 0.5) * w / grid, y0 + (np.arange(grid) + 0.5) * h / grid
    side = max(w, h)
    centres = (np.arange(grid) + 0.5) * side / grid
    xs = x0 - (side - w) // 2 + centres
    ys = y0 - (side - h) // 2 + centres
    return xs, ys


def cell_labels(sample: WorldSample, view: tuple[int, int, int, int], params: WorldParams, pad: bool = True):
    """Per-cell (glyph class, colour class) labels of one view: glyph 0 = none, colour 0 = none."""
    grid, colours, alphabet = params.grid, params.colours, params.glyphs
    xs, ys = view_cell_centres(view, grid, pad)
    glyph = np.zeros((grid, grid), np.int16)
    colour = np.zeros((grid, grid), np.int16)
    for f in sample.frames:
        bx0, by0, bx1, by1 = f.box
        inside = ((ys >= by0) & (ys < by1))[:, None] & ((xs >= bx0) & (xs < bx1))[None, :]
        colour[inside] = colours.index(f.colour) + 1 if f.colour else len(colours) + N_DISTRACTOR_COLOUR
    for g, gb in [(f.glyph, f.glyph_box) for f in sample.frames] + list(sample.stray):
        # every cell whose centre the glyph covers; a glyph smaller than a cell: the cell nearest its centre
        inside = ((ys >= gb[1]) & (ys < gb[3]))[:, None] & ((xs >= gb[0]) & (xs < gb[2]))[None, :]
        if inside.any():
            glyph[inside] = alphabet.index(g) + 1
            continue
        cx, cy = (gb[0] + gb[2]) / 2, (gb[1] + gb[3]) / 2
        c = int(np.argmin(np.abs(xs - cx)))
        r = int(np.argmin(np.abs(ys - cy)))
        if abs(xs[c] - cx) < (xs[1] - xs[0]) / 2 and abs(ys[r] - cy) < (ys[1] - ys[0]) / 2:
            glyph[r, c] = alphabet.index(g) + 1
    return glyph.reshape(-1), colour.reshape(-1)


# ----------------------------------------------------------------------------- data generation

_ARRAYS = {
    "base": ("uint8", (SIZES.image_size, SIZES.image_size, 3)),
    "crop": ("uint8", (SIZES.image_size, SIZES.image_size, 3)),
    "n_named": ("int16", ()),
    "frame_colour": ("int16", (MAX_FRAMES,)),  # index into params.colours, -1 = none
    "frame_glyph": ("int16", (MAX_FRAMES,)),  # index into the world's alphabet (WorldParams.glyphs)
    "frame_cells": ("int16", (MAX_FRAMES, 4)),  # r0, c0, r1, c1 (exclusive) on the token grid
    "target": ("int16", ()),  # frame shown in the crop
    "base_glyph": ("int16", (196,)),
    "base_colour": ("int16", (196,)),
    "crop_glyph": ("int16", (196,)),
    "crop_colour": ("int16", (196,)),
}
_worker: dict = {}


def _init_worker(cache: str) -> None:
    torch.set_num_threads(1)
    _worker["arrays"] = {k: np.load(Path(cache) / f"{k}.npy", mmap_mode="r+") for k in _ARRAYS}


def _fill(job: tuple[int, int, int, dict, float, float, int]) -> int:
    """Generate images [start, stop) of world ``seed`` into rows offset + [start, stop) of the cache."""
    start, stop, seed, params_d, margin, jitter, offset = job
    params = WorldParams(**params_d)
    a = _worker["arrays"]
    for j in range(start, stop):
        i = offset + j
        s = generate_sample(params, seed, j)
        a["base"][i] = to_view(s.image, SIZES.image_size)
        named = [f for f in s.frames if f.colour is not None]
        a["n_named"][i] = len(named)
        a["frame_colour"][i] = -1
        for k, f in enumerate(named):
            a["frame_colour"][i, k] = params.colours.index(f.colour)
            a["frame_glyph"][i, k] = params.glyphs.index(f.glyph)
            x0, y0, x1, y1 = f.box
            cell = params.cell
            a["frame_cells"][i, k] = (y0 // cell, x0 // cell, -(-y1 // cell), -(-x1 // cell))
        t = [f.colour for f in named].index(s.colour)
        a["target"][i] = t
        rng = np.random.default_rng([seed, j, 1])
        cb = crop_box(s.box, margin, rng, s.image.size, jitter)
        # a crop is stretched to the view, as two-stage inference feeds it (LlavaAdapter.crop_pixels)
        a["crop"][i] = np.asarray(s.image.crop(cb).convert("RGB").resize((SIZES.image_size,) * 2, Image.BICUBIC))
        a["base_glyph"][i], a["base_colour"][i] = cell_labels(s, (0, 0, *s.image.size), params)
        a["crop_glyph"][i], a["crop_colour"][i] = cell_labels(s, cb, params, pad=False)
    return stop - start


def generate_data(cache: Path, parts: list[tuple[int, WorldParams, int]], workers: int, margin: float, jitter: float):
    """Fill ``cache`` with the concatenation of ``parts`` = [(seed, params, n), ...]; returns the arrays."""
    n = sum(p[2] for p in parts)
    cache.mkdir(parents=True, exist_ok=True)
    for k, (dtype, shape) in _ARRAYS.items():
        np.lib.format.open_memmap(cache / f"{k}.npy", mode="w+", dtype=dtype, shape=(n, *shape)).flush()
    jobs, offset = [], 0
    for seed, params, count in parts:
        if params.max_frames > MAX_FRAMES:
            raise ValueError(f"max_frames {params.max_frames} > {MAX_FRAMES}")
        chunk = 64
        for s in range(0, count, chunk):
            # each part is its own world seed; image indices restart at 0 inside it
            jobs.append((s, min(count, s + chunk), seed, asdict(params), margin, jitter, offset))
        offset += count
    t0 = time.time()
    ctx = get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(cache),)) as pool:
        done = 0
        for k in pool.imap_unordered(_fill, jobs):
            done += k
    log(f"generated {n} images in {time.time() - t0:.1f}s with {workers} workers")
    (cache / "meta.json").write_text(
        json.dumps({"parts": [[s, asdict(p), c] for s, p, c in parts], "margin": margin, "jitter": jitter})
    )


def load_data(cache: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Move the cache's arrays to ``device`` (images stay uint8)."""
    out = {}
    for k in _ARRAYS:
        arr = np.load(cache / f"{k}.npy", mmap_mode="r")
        t = torch.empty(arr.shape, dtype=torch.uint8 if arr.dtype == np.uint8 else torch.long, device=device)
        step = 4096
        for s in range(0, arr.shape[0], step):
            t[s : s + step] = torch.from_numpy(np.array(arr[s : s + step])).to(device, t.dtype)
        out[k] = t
    return out


# ----------------------------------------------------------------------------- token templates


class Templates:
    """Fixed token layouts of the training sequences, checked against the processor's chat template."""

    def __init__(self, processor, params: WorldParams, turns: int):
        tok = processor.tokenizer
        self.tok = tok
        self.vocab = tok.get_vocab()
        self.image_id = self.vocab["<image>"]
        self.eos_id = tok.eos_token_id
        self.colour_ids = torch.tensor([self.vocab[c] for c in params.colours])
        self.glyph_ids = torch.tensor([self.vocab[g] for g in params.glyphs])
        n_img = (SIZES.image_size // SIZES.patch_size) ** 2
        self.n_img = n_img
        self.base, self.base_col, self.base_ans = self._layout(1, turns, n_img)
        self.crop, self.crop_col, self.crop_ans = self._layout(2, 1, n_img)
        self._check(processor, params)

    def _ids(self, words: list[str]) -> list[int]:
        return [self.vocab[w] for w in words]

    def _layout(self, n_images: int, turns: int, n_img: int):
        ids = self._ids(["USER", ":"]) + [self.image_id] * (n_img * n_images)
        col, ans = [], []
        for k in range(turns):
            if k:
                ids += self._ids(["USER", ":"])
            q = ["what", "is", "in", "the", "red", "box", "?", "ASSISTANT", ":"]
            col.append(len(ids) + 4)
            ids += self._ids(q)
            ans.append(len(ids))
            ids += [self.glyph_ids[0].item(), self.eos_id]
        return torch.tensor(ids), torch.tensor(col), torch.tensor(ans)

    def _check(self, processor, params: WorldParams) -> None:
        """The layouts must equal the processor's own rendering + tokenisation."""
        for n_images, layout, ans in ((1, self.base, self.base_ans), (2, self.crop, self.crop_ans)):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": "what is in the red box ?"}]
            messages = [{"role": "user", "content": content}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            text = text.replace("<image>", "<image>" * self.n_img)
            ids = self.tok(text, add_special_tokens=True)["input_ids"]
            first = layout[: int(ans[0])].tolist()
            if ids != first:
                raise RuntimeError(f"template mismatch:\n{ids}\n{first}")


# ----------------------------------------------------------------------------- attention of answer rows


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def answer_attention(
    layer, rotary, hidden_in: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention probabilities [B, heads, len(rows), L] of query ``rows`` at ``layer`` (causal).

    ``hidden_in`` is the layer's input (the residual stream before its input norm). ``keep`` [B, L]
    marks the tokens that exist (dropped crop tokens are masked out and skipped by the positions,
    as in the forward pass); None = all.
    """
    B, L, _ = hidden_in.shape
    attn = layer.self_attn
    hd = attn.head_dim
    h = layer.input_layernorm(hidden_in)
    q = attn.q_proj(h[:, rows]).view(B, len(rows), -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)
    pos = torch.arange(L, device=hidden_in.device)[None].expand(B, -1) if keep is None else positions(keep)
    cos, sin = rotary(hidden_in, pos)
    cos, sin = cos[:, None], sin[:, None]
    q = rotate(q, cos[:, :, rows], sin[:, :, rows])
    k = rotate(k, cos, sin)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    mask = (torch.arange(L, device=hidden_in.device)[None, :] > rows[:, None])[None, None]
    if keep is not None:
        mask = mask | ~keep[:, None, None, :]
    scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1)


def positions(keep: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] of a sequence whose dropped tokens (``keep`` False) take no position."""
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


def box_masks(cells: torch.Tensor, grid: int) -> torch.Tensor:
    """[..., 4] (r0, c0, r1, c1) cell boxes -> [..., grid*grid] bool masks."""
    r = torch.arange(grid, device=cells.device)
    rin = (r >= cells[..., 0:1]) & (r < cells[..., 2:3])
    cin = (r >= cells[..., 1:2]) & (r < cells[..., 3:4])
    return (rin[..., :, None] & cin[..., None, :]).flatten(-2)


# ----------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, args, model, processor, params: WorldParams, data: dict, device: torch.device):
        self.args, self.model, self.params, self.data, self.device = args, model, params, data, device
        self.tpl = Templates(processor, params, args.turns)
        for name in ("base", "base_col", "base_ans", "crop", "crop_col", "crop_ans", "colour_ids", "glyph_ids"):
            setattr(self.tpl, name, getattr(self.tpl, name).to(device))
        hidden = model.config.text_config.hidden_size
        self.aux = nn.Linear(hidden, len(params.glyphs) + 1 + len(params.colours) + 2).to(device)
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        lm = model.model.language_model
        self.layers, self.rotary = lm.layers, lm.rotary_emb
        self._proj_out: torch.Tensor | None = None
        self._layer_in: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._grab_proj)
        if args.point_weight > 0 or args.sink_weight > 0:
            self.layers[args.point_layer].register_forward_pre_hook(self._grab_layer_in, with_kwargs=True)
        self.grid = params.grid

    def _grab_proj(self, module, inputs, output):
        self._proj_out = output

    def _grab_layer_in(self, module, args, kwargs):
        self._layer_in = args[0] if args else kwargs["hidden_states"]

    def pixels(self, u8: torch.Tensor) -> torch.Tensor:
        return ((u8.permute(0, 3, 1, 2).float() / 255.0) - self.mean) / self.std

    def base_batch(self, idx: torch.Tensor, turns: int):
        d, tpl = self.data, self.tpl
        B = len(idx)
        n_named = d["n_named"][idx]
        keys = torch.rand(B, MAX_FRAMES, device=self.device)
        keys[torch.arange(MAX_FRAMES, device=self.device)[None] >= n_named[:, None]] = 2.0
        order = keys.argsort(-1)
        pick = order.gather(1, torch.arange(turns, device=self.device)[None].expand(B, -1) % n_named[:, None])
        ids = tpl.base[None].repeat(B, 1)
        colour = d["frame_colour"][idx].gather(1, pick)
        glyph = d["frame_glyph"][idx].gather(1, pick)
        ids[:, tpl.base_col] = tpl.colour_ids[colour]
        ids[:, tpl.base_ans] = tpl.glyph_ids[glyph]
        cells = d["frame_cells"][idx].gather(1, pick[..., None].expand(-1, -1, 4))
        return ids, self.pixels(d["base"][idx]), glyph, cells

    def crop_batch(self, idx: torch.Tensor, mask_prob: float = 0.0):
        """Base + crop samples; with probability ``mask_prob`` a sample keeps only the crop tokens on the
        named frame (sometimes dilated by one cell), as masked upscaling feeds them. Returns ids, pixels,
        glyph classes, the target's base-grid cells and ``keep`` [B, L] (None when nothing is dropped)."""
        d, tpl = self.data, self.tpl
        B = len(idx)
        t = d["target"][idx][:, None]
        ids = tpl.crop[None].repeat(B, 1)
        colour = d["frame_colour"][idx].gather(1, t)
        glyph = d["frame_glyph"][idx].gather(1, t)
        ids[:, tpl.crop_col] = tpl.colour_ids[colour]
        ids[:, tpl.crop_ans] = tpl.glyph_ids[glyph]
        pix = torch.stack([d["base"][idx], d["crop"][idx]], 1).flatten(0, 1)  # base_0, crop_0, base_1, ...
        cells = d["frame_cells"][idx].gather(1, t[..., None].expand(-1, -1, 4))
        keep = None
        if mask_prob > 0:
            g = self.grid
            on = (d["crop_colour"][idx] == colour + 1).float().view(B, 1, g, g)
            grown = F.max_pool2d(on, 3, stride=1, padding=1)
            dilate = torch.rand(B, 1, 1, 1, device=self.device) < 0.5
            cell_keep = torch.where(dilate, grown, on).flatten(1) > 0
            masked = (torch.rand(B, 1, device=self.device) < mask_prob) & cell_keep.any(1, keepdim=True)
            keep = torch.ones_like(ids, dtype=torch.bool)
            start = 2 + tpl.n_img
            keep[:, start : start + tpl.n_img] = torch.where(masked, cell_keep, True)
        return ids, self.pixels(pix), glyph, cells, keep

    def forward(self, ids: torch.Tensor, pix: torch.Tensor, keep: torch.Tensor | None = None, **kw):
        if keep is None:
            return self.model(input_ids=ids, pixel_values=pix, **kw)
        return self.model(
            input_ids=ids, pixel_values=pix, attention_mask=keep.long(), position_ids=positions(keep), **kw
        )

    def answer_loss(self, logits: torch.Tensor, ans_pos: torch.Tensor, glyph: torch.Tensor):
        """CE of the glyph token (predicted at ans_pos - 1) and of </s> (at ans_pos); accuracy of the glyph."""
        lg = logits[:, ans_pos - 1].float()
        target = self.tpl.glyph_ids[glyph]
        loss = F.cross_entropy(lg.flatten(0, 1), target.flatten())
        eos = logits[:, ans_pos].float().flatten(0, 1)
        loss = loss + 0.1 * F.cross_entropy(eos, torch.full_like(target.flatten(), self.tpl.eos_id))
        acc = (lg.argmax(-1) == target).float().mean()
        return loss, acc

    def aux_loss(self, glyph_lab: torch.Tensor, colour_lab: torch.Tensor) -> torch.Tensor:
        """Per-cell glyph and colour CE on the projector output.

        The glyph term is averaged over the cells that hold a glyph (a mean over all cells would
        drown them: ~1 in 20 cells holds one), plus a light glyph-or-not term over every cell.
        """
        out = self.aux(self._proj_out.float()).flatten(0, 1)  # [n_img * 196, C]
        ng = len(self.params.glyphs) + 1
        glyph_lab, colour_lab = glyph_lab.flatten(), colour_lab.flatten()
        has = glyph_lab > 0
        lg = F.cross_entropy(out[has, :ng], glyph_lab[has]) if has.any() else out.sum() * 0
        lp = F.cross_entropy(out[:, :ng], glyph_lab) if (glyph_lab >= 0).any() else out.sum() * 0
        lc = F.cross_entropy(out[:, ng:], colour_lab)
        return lg + 0.2 * lp + lc

    def answer_rows_attention(self, ans_pos: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Attention [B, heads, K, L] at ``--point-layer`` of the rows ``--point-rows`` names: those predicting
        the answers (``predict``), the answer tokens' own rows (``answer``: the response rows the dump
        stage reads), or both (K doubles: predict rows first)."""
        layer = self.layers[self.args.point_layer]
        rows = {"predict": ans_pos - 1, "answer": ans_pos, "both": torch.cat([ans_pos - 1, ans_pos])}
        return answer_attention(layer, self.rotary, self._layer_in, rows[self.args.point_rows], keep)

    def _point_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """The target cells [B, K, 4] lined up with ``answer_rows_attention``'s rows."""
        return torch.cat([cells, cells], 1) if self.args.point_rows == "both" else cells

    def point_loss(self, att: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """-log(attention mass on the named frame's tokens) of the answer rows, for the chosen heads."""
        img = att[:, : self.args.point_heads, :, 2 : 2 + self.tpl.n_img]  # [B, h, K, 196] (base image tokens)
        mask = box_masks(cells, self.grid).float()  # [B, K, 196]
        mass = (img * mask[:, None]).sum(-1)
        return -(mass + 1e-6).log().mean()

    def sink_loss(self, att: torch.Tensor, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Plant attention sinks on the first image's ``--sink-cells``, as large MLLMs grow them.

        A hinge asks their residual-stream norm at the inputs of ``--sink-layers`` to be >= ``--sink-ratio``
        x the median visual-token norm, and ``--sink-heads`` heads of the point layer (the ones after the
        point heads) to put ``--sink-mass`` of the answer rows' attention on them.
        """
        a, n_img = self.args, self.tpl.n_img
        cells = torch.tensor(a.sink_cells, device=self.device)
        loss = att.new_zeros(())
        others = torch.ones(n_img, dtype=torch.bool, device=self.device)
        others[cells] = False
        for k in a.sink_layers:
            norm = hidden_states[k][:, 2 : 2 + n_img].float().norm(dim=-1)  # [B, 196]
            log_ratio = norm.log() - norm.median(-1).values.log()[:, None]
            loss = loss + F.relu(math.log(a.sink_ratio) - log_ratio[:, cells]).mean()
            # every other token stays far below the detector's threshold (no spill onto frames)
            loss = loss + F.relu(log_ratio[:, others] - math.log(a.other_ratio)).mean() * 10
        heads = att[:, a.point_heads : a.point_heads + a.sink_heads]
        mass = heads[..., 2 + cells].sum(-1)  # [B, h, K]
        if a.sink_mass_loss == "log":  # keeps a gradient where a row gives the sinks almost nothing
            return loss + ((mass + 1e-4).log() - math.log(a.sink_mass)).pow(2).mean()
        return loss + ((mass - a.sink_mass) ** 2).mean() * 10

    def read_loss(self, idx: torch.Tensor, hidden_states, keep: torch.Tensor | None) -> torch.Tensor:
        """-log(attention mass of the answer row on the crop tokens holding the named frame's glyph), for
        ``--read-heads`` heads of ``--read-layer``: routes what the crop shows to the answer."""
        a, d, tpl = self.args, self.data, self.tpl
        colour = d["frame_colour"][idx].gather(1, d["target"][idx][:, None])
        cells = (d["crop_colour"][idx] == colour + 1) & (d["crop_glyph"][idx] > 0)  # [B, 196]
        valid = cells.any(-1)
        if not valid.any():
            return hidden_states[0].new_zeros(())
        layer = self.layers[a.read_layer]
        rows = tpl.crop_ans - 1
        att = answer_attention(layer, self.rotary, hidden_states[a.read_layer], rows, keep)
        start = 2 + tpl.n_img
        crop = att[:, : a.read_heads, :, start : start + tpl.n_img]  # [B, h, K, 196]
        mass = (crop * cells[:, None, None].float()).sum(-1)
        return -(mass[valid] + 1e-6).log().mean()

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        a, d = self.args, self.data
        n = d["n_named"].shape[0]
        zero = torch.zeros((), device=self.device)
        pool = self.easy_idx if step < a.curriculum_steps else None
        idx = self._sample(pool, n, a.batch)
        ids, pix, glyph, cells = self.base_batch(idx, a.turns)
        out = self.model(input_ids=ids, pixel_values=pix, output_hidden_states=a.sink_weight > 0)
        loss_b, acc_b = self.answer_loss(out.logits, self.tpl.base_ans, glyph)
        aux_b = self.aux_loss(self._base_glyph(idx), d["base_colour"][idx])
        att = self.answer_rows_attention(self.tpl.base_ans) if a.point_weight or a.sink_weight else None
        pt = self.point_loss(att, self._point_cells(cells)) if a.point_weight > 0 else zero
        sk = self.sink_loss(att, out.hidden_states) if a.sink_weight > 0 else zero
        idx_c = self._sample(pool, n, a.crop_batch)
        ids, pix, glyph, cells_c, keep = self.crop_batch(idx_c, a.crop_mask_prob)
        out = self.forward(ids, pix, keep, output_hidden_states=a.sink_weight > 0 or a.read_weight > 0)
        rd = self.read_loss(idx_c, out.hidden_states, keep) if a.read_weight > 0 else zero
        loss_c, acc_c = self.answer_loss(out.logits, self.tpl.crop_ans, glyph)
        gl = torch.stack([self._base_glyph(idx_c), d["crop_glyph"][idx_c]], 1).flatten(0, 1)
        cl = torch.stack([d["base_colour"][idx_c], d["crop_colour"][idx_c]], 1).flatten(0, 1)
        aux_c = self.aux_loss(gl, cl)
        with torch.no_grad():  # the per-token head's glyph accuracy on the crops' glyph cells
            ng = len(self.params.glyphs) + 1
            pred = self.aux(self._proj_out.float())[1::2, :, :ng].argmax(-1)  # crop views only
            lab = d["crop_glyph"][idx_c]
            self._aux_acc = (pred == lab)[lab > 0].float().mean()
        att = self.answer_rows_attention(self.tpl.crop_ans, keep) if a.point_weight or a.sink_weight else None
        if a.point_weight > 0:
            pt = pt + self.point_loss(att, self._point_cells(cells_c))
        if a.sink_weight > 0:
            sk = sk + self.sink_loss(att, out.hidden_states)
        total = (
            a.base_weight * loss_b
            + loss_c
            + a.aux_weight * (aux_b + aux_c)
            + a.point_weight * pt
            + a.sink_weight * sk
            + a.read_weight * rd
        )
        stats = {
            "base": loss_b,
            "crop": loss_c,
            "acc_b": acc_b,
            "acc_c": acc_c,
            "aux": aux_b + aux_c,
            "point": pt,
            "sink": sk,
            "read": rd,
            "tex_acc": self._aux_acc,
        }
        return total, stats

    def _base_glyph(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-cell glyph labels of base views; -100 (ignored) everywhere with --no-aux-base-glyph."""
        lab = self.data["base_glyph"][idx]
        return lab if self.args.aux_base_glyph else torch.full_like(lab, -100)

    def _sample(self, pool: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
        if pool is None:
            return torch.randint(0, n, (k,), device=self.device)
        return pool[torch.randint(0, len(pool), (k,), device=self.device)]

    @torch.no_grad()
    def evaluate(self, held: dict[str, torch.Tensor], batch: int = 128) -> dict:
        """Held-out: base-only and crop accuracy (one turn), and per-layer argmax-in-box of the answer row."""
        model, tpl = self.model, self.tpl
        model.eval()
        saved = self.data
        self.data = held
        n = held["n_named"].shape[0]
        accs_b, accs_c, inbox = [], {"crop": [], "masked": []}, []
        denoised, sink_ratio, spill, point_mass = [], [], [], []
        answer_row: dict[str, list[torch.Tensor]] = {"raw": [], "denoised": [], "argmax": []}
        single = tpl.base[: int(tpl.base_ans[0]) + 2]
        for s in range(0, n, batch):
            idx = torch.arange(s, min(n, s + batch), device=self.device)
            t = held["target"][idx][:, None]
            _, pix, _, _ = self.base_batch(idx, 1)
            ids = single[None].repeat(len(idx), 1)
            colour = held["frame_colour"][idx].gather(1, t)
            glyph = held["frame_glyph"][idx].gather(1, t)
            ids[:, tpl.base_col[0]] = tpl.colour_ids[colour[:, 0]]
            ans = int(tpl.base_ans[0])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp):
                out = model(input_ids=ids[:, :ans], pixel_values=pix, output_hidden_states=True)
            accs_b.append((out.logits[:, -1].argmax(-1) == tpl.glyph_ids[glyph[:, 0]]).float())
            mask = box_masks(held["frame_cells"][idx].gather(1, t[..., None].expand(-1, -1, 4))[:, 0], self.grid)
            rows = torch.tensor([ans - 1], device=self.device)
            per_layer = []
            for li, layer in enumerate(self.layers):
                att = answer_attention(layer, self.rotary, out.hidden_states[li].float(), rows)
                m = att[:, :, 0, 2 : 2 + tpl.n_img].mean(1)
                per_layer.append(mask.gather(1, m.argmax(-1, keepdim=True))[:, 0].float())
                if li == self.args.point_layer:  # the label layer with the sinks zeroed, and the sinks' norm
                    norm = out.hidden_states[li][:, 2 : 2 + tpl.n_img].float().norm(dim=-1)
                    ratio = norm / norm.median(-1, keepdim=True).values
                    m = m.masked_fill(ratio > 10, 0)
                    denoised.append(mask.gather(1, m.argmax(-1, keepdim=True))[:, 0].float())
                    sink_ratio.append(ratio.max(-1).values)
                    over = ratio > 10
                    over[:, self.args.sink_cells] = False
                    spill.append(over.float().sum(-1))
                    heads = att[:, : self.args.point_heads, 0, 2 : 2 + tpl.n_img]
                    point_mass.append((heads * mask[:, None].float()).sum(-1).mean(-1))
            inbox.append(torch.stack(per_layer, 1))
            # the dumped row: the model's own answer token fed back, as decode + dump do
            own = out.logits[:, -1].argmax(-1, keepdim=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp):
                out2 = model(input_ids=torch.cat([ids[:, :ans], own], 1), pixel_values=pix, output_hidden_states=True)
            li = self.args.point_layer
            att = answer_attention(self.layers[li], self.rotary, out2.hidden_states[li].float(), rows + 1)
            m = att[:, :, 0, 2 : 2 + tpl.n_img].mean(1)
            norm = out2.hidden_states[li][:, 2 : 2 + tpl.n_img].float().norm(dim=-1)
            sink = norm / norm.median(-1, keepdim=True).values > 10
            for key, mm in (("raw", m), ("denoised", m.masked_fill(sink, 0))):
                fg = mm >= 0.2 * mm.max(-1, keepdim=True).values
                answer_row[key].append((fg & mask).sum(-1) / fg.sum(-1).clamp(min=1))
            answer_row["argmax"].append(mask.gather(1, m.argmax(-1, keepdim=True))[:, 0].float())
            ans_c = int(tpl.crop_ans[0])
            for key, prob in (("crop", 0.0), ("masked", 1.0)):
                ids_c, pix_c, glyph_c, _, keep = self.crop_batch(idx, prob)
                keep = None if keep is None else keep[:, :ans_c]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp):
                    lg = self.forward(ids_c[:, :ans_c], pix_c, keep).logits[:, -1]
                accs_c[key].append((lg.argmax(-1) == tpl.glyph_ids[glyph_c[:, 0]]).float())
        self.data = saved
        model.train()
        return {
            "acc_base": torch.cat(accs_b).mean().item(),
            "acc_crop": torch.cat(accs_c["crop"]).mean().item(),
            "acc_crop_masked": torch.cat(accs_c["masked"]).mean().item(),
            "argmax_in_box": [round(v, 3) for v in torch.cat(inbox).mean(0).tolist()],
            "argmax_in_box_without_norm_sinks": round(torch.cat(denoised).mean().item(), 3),
            "max_over_median_norm": round(torch.cat(sink_ratio).mean().item(), 2),
            "other_tokens_over_10x_median": round(torch.cat(spill).mean().item(), 2),
            "point_heads_mass_in_box": round(torch.cat(point_mass).mean().item(), 3),
            # at --point-layer, on the answer token's row (the one the dump reads), the fg rule (0.2 a_max)
            "answer_row_argmax_in_box": round(torch.cat(answer_row["argmax"]).mean().item(), 3),
            "answer_row_fg_precision_raw": round(torch.cat(answer_row["raw"]).mean().item(), 3),
            "answer_row_fg_precision_denoised": round(torch.cat(answer_row["denoised"]).mean().item(), 3),
        }


def warm_start(model, processor, init: Path, params: WorldParams) -> None:
    """Load the weights of the model in ``init`` into ``model``, whose vocabulary may extend init's.

    The new vocabulary must keep every old word's id (``world_vocabulary`` appends new alphabets). New
    words' input embeddings and output rows start as the mean over the old answer words' rows, so the
    model starts out treating them as answers.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    old_vocab = AutoTokenizer.from_pretrained(init).get_vocab()
    new_vocab = processor.tokenizer.get_vocab()
    moved = {w: i for w, i in old_vocab.items() if new_vocab.get(w) != i}
    if moved:
        raise SystemExit(f"{init}: the new vocabulary moves old words {sorted(moved)[:5]}; append new words instead")
    state = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32).state_dict()
    own = model.state_dict()
    old_answers = [old_vocab[g] for g in GLYPHS if g in old_vocab]
    for key, value in state.items():
        if key not in own:
            raise SystemExit(f"{init}: unexpected weight {key}")
        if value.shape != own[key].shape:
            if value.shape[1:] != own[key].shape[1:] or value.shape[0] > own[key].shape[0]:
                raise SystemExit(f"{init}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
            grown = value.new_empty(own[key].shape)
            grown[: len(value)] = value
            grown[len(value) :] = value[old_answers].mean(0)
            state[key] = grown
    missing = set(own) - set(state)
    if missing:
        raise SystemExit(f"{init}: missing weights {sorted(missing)[:5]}")
    model.load_state_dict(state)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/sdrpn-toy-llava", help="model directory to write")
    p.add_argument("--init", default=None, help="warm start from this model directory (its vocabulary may grow)")
    p.add_argument("--seed", type=int, default=0, help="model init / sampling seed; world seeds derive from it")
    p.add_argument("--n-images", type=int, default=40000, help="training images (default world)")
    p.add_argument("--n-easy", type=int, default=8000, help="extra curriculum images with 2-3 frames")
    p.add_argument("--n-heldout", type=int, default=512)
    p.add_argument("--cache", default=None, help="data cache dir (reused when it has meta.json)")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--steps", type=int, default=8000, help="planned steps (the cosine schedule's length)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds of training; shortens --steps to fit")
    p.add_argument("--batch", type=int, default=48, help="base-view images per step")
    p.add_argument("--turns", type=int, default=3, help="QA turns per base-view image")
    p.add_argument("--crop-batch", type=int, default=48, help="base + crop samples per step")
    p.add_argument("--base-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.5, help="per-token glyph/colour head (training only)")
    p.add_argument(
        "--no-aux-base-glyph",
        dest="aux_base_glyph",
        action="store_false",
        help="no per-token glyph labels on base views (colour only): do not teach reading at base resolution",
    )
    p.add_argument(
        "--world",
        default="{}",
        help='JSON overrides of WorldParams for the training and held-out worlds, e.g. \'{"glyph_style": "solid"}\'',
    )
    p.add_argument("--point-weight", type=float, default=0.0, help="attention-on-named-frame loss (0 = off)")
    p.add_argument("--point-layer", type=int, default=3)
    p.add_argument("--point-heads", type=int, default=2)
    p.add_argument(
        "--point-rows",
        choices=("predict", "answer", "both"),
        default="predict",
        help="rows the point and sink losses shape: predicting the answer, the answer token's (the dumped one), both",
    )
    p.add_argument("--read-weight", type=float, default=0.0, help="answer row -> crop glyph attention loss (0 = off)")
    p.add_argument("--read-layer", type=int, default=5)
    p.add_argument("--read-heads", type=int, default=2)
    p.add_argument("--sink-weight", type=float, default=0.0, help="planted attention-sink loss (0 = off)")
    p.add_argument(
        "--sink-cells",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 195],
        help="visual tokens (row-major) that become sinks",
    )
    p.add_argument(
        "--sink-layers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[2, 3, 4, 5],
        help="decoder layers whose inputs carry the sinks' large norm",
    )
    p.add_argument("--sink-ratio", type=float, default=20.0, help="sink norm / median visual-token norm (at least)")
    p.add_argument("--other-ratio", type=float, default=4.0, help="norm / median of every other token (at most)")
    p.add_argument("--sink-heads", type=int, default=2, help="heads after the point heads that attend to the sinks")
    p.add_argument("--sink-mass", type=float, default=0.6, help="their answer-row attention mass on the sinks")
    p.add_argument(
        "--sink-mass-loss",
        choices=("sq", "log"),
        default="sq",
        help="sq: 10 (mass - target)^2 (vanishes on rows that ignore the sinks); log: (log mass - log target)^2",
    )
    p.add_argument("--curriculum-steps", type=int, default=800, help="steps drawing only from the easy images")
    p.add_argument("--crop-mask-prob", type=float, default=0.0, help="share of crop samples with masked crop tokens")
    p.add_argument("--crop-margin", type=float, default=0.25)
    p.add_argument("--crop-jitter", type=float, default=0.15)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--write-processor", action="store_true", help="only write the processor/tokenizer to --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    args.amp = args.amp and device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = WorldParams(**json.loads(args.world))
    if args.write_processor:
        _, processor = build_toy_llava(world_vocabulary(params), SIZES, seed=args.seed)
        processor.save_pretrained(args.out)
        log(f"wrote the processor to {args.out}")
        return
    easy = replace(params, min_frames=2, max_frames=3)
    cache = Path(args.cache or f"/tmp/sdrpn-world-cache-{args.seed}-{args.n_images}-{args.n_easy}")
    held_cache = cache.with_name(cache.name + "-heldout")
    # training worlds: 1000+seed (default) and 2000+seed (easy); held-out: 3000+seed
    parts = [(1000 + args.seed, params, args.n_images)] + (
        [(2000 + args.seed, easy, args.n_easy)] if args.n_easy else []
    )
    for where, want, jitter in (
        (cache, parts, args.crop_jitter),
        (held_cache, [(3000 + args.seed, params, args.n_heldout)], 0.0),
    ):
        meta = where / "meta.json"
        if meta.exists():
            have = json.loads(meta.read_text())
            spec = {"parts": [[s, asdict(p), c] for s, p, c in want], "margin": args.crop_margin, "jitter": jitter}
            if json.loads(json.dumps(spec)) != have:
                raise SystemExit(f"{where} holds another world or crop setting; pass another --cache or delete it")
        else:
            generate_data(where, want, args.workers, args.crop_margin, jitter)
    if args.generate_only:
        return

    model, processor = build_toy_llava(world_vocabulary(params), SIZES, seed=args.seed)
    if args.init:
        warm_start(model, processor, Path(args.init), params)
        log(f"warm start from {args.init}")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; device {device}; amp {args.amp}")
    data = load_data(cache, device)
    held = load_data(held_cache, device)
    trainer = Trainer(args, model, processor, params, data, device)
    n_train = data["n_named"].shape[0]
    trainer.easy_idx = torch.arange(args.n_images, n_train, device=device) if args.n_easy else None
    opt = torch.optim.AdamW(
        list(model.parameters()) + list(trainer.aux.parameters()),
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    total = args.steps
    history = []
    t0 = time.time()
    step = 0
    calib_at = min(200, args.warmup)
    if args.init:  # where the warm start stands, for the record
        ev = trainer.evaluate(held)
        ev.update(step=0, seconds=0.0)
        history.append(ev)
        log(f"eval {json.dumps(ev)}")
        t0 = time.time()  # the budget is for training
    while step < total:
        if args.time_budget > 0 and time.time() - t0 > 1.1 * args.time_budget:
            log(f"time budget exceeded at step {step}; stopping")
            break
        if step == calib_at and args.time_budget > 0:
            per = (time.time() - t0) / step
            fit = int(args.time_budget / (per * 1.04))
            total = max(step + 1, min(args.steps, fit))
            log(f"{per * 1000:.1f} ms/step -> {total} steps to fit {args.time_budget:.0f}s")
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup:
            prog = (step - args.warmup) / max(1, total - args.warmup)
            lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, stats = trainer.step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(trainer.aux.parameters()), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            s = {k: round(float(v.detach()), 3) for k, v in stats.items()}
            el = time.time() - t0
            log(f"step {step}/{total} lr {lr:.2e} loss {loss.item():.3f} gn {gn.item():.2f} {s} {el:.0f}s")
        if step % args.eval_every == 0 or step == total:
            ev = trainer.evaluate(held)
            ev.update(step=step, seconds=round(time.time() - t0, 1))
            history.append(ev)
            log(f"eval {json.dumps(ev)}")
    if not history or history[-1]["step"] != step:
        ev = trainer.evaluate(held)
        ev.update(step=step, seconds=round(time.time() - t0, 1))
        history.append(ev)
        log(f"eval {json.dumps(ev)}")
    train_s = time.time() - t0
    out = Path(args.out)
    model.eval().to("cpu").float()
    try:
        save_toy_llava(model, processor, out)
    except Exception as e:  # an older transformers may not save this processor: keep the weights anyway
        log(f"processor not saved ({e!r}); rewrite it with --write-processor")
        model.save_pretrained(out)
    summary = {
        "steps": step,
        "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "parameters": n_params,
        "sizes": asdict(SIZES),
        "world": asdict(params),
        "args": vars(args),
        "history": history,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"saved {out} after {step} steps, {train_s:.0f}s")


if __name__ == "__main__":
    main()
