"""The embedded model's training data: world images into ``.npy`` memory maps, token layouts, batches.

Data are generated with a process pool into memory maps (the base view and one training crop per image,
already resized to the model's view, plus the frames' colours, glyphs and token-cell boxes), then moved to
the device once; a step only indexes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.world.generator import WorldParams, WorldSample, crop_box, generate_sample
from toymodels.embedded import MAX_FRAMES, SIZES, log

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_DISTRACTOR_COLOUR = 1  # colour label of grey distractor frames = len(colours) + 1

Box = tuple[int, int, int, int]

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


def view_cell_centres(view: Box, grid: int, pad: bool) -> tuple[np.ndarray, np.ndarray]:
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


def cell_labels(sample: WorldSample, view: Box, params: WorldParams, pad: bool = True) -> tuple[np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------- the cache


def array_specs(image_size: int, n_cells: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and per-image shape of every cached array (one ``<name>.npy`` each)."""
    return {
        "base": ("uint8", (image_size, image_size, 3)),
        "crop": ("uint8", (image_size, image_size, 3)),
        "n_named": ("int16", ()),
        "frame_colour": ("int16", (MAX_FRAMES,)),  # index into params.colours, -1 = none
        "frame_glyph": ("int16", (MAX_FRAMES,)),  # index into the world's alphabet (WorldParams.glyphs)
        "frame_cells": ("int16", (MAX_FRAMES, 4)),  # r0, c0, r1, c1 (exclusive) on the token grid
        "target": ("int16", ()),  # frame shown in the crop
        "base_glyph": ("int16", (n_cells,)),
        "base_colour": ("int16", (n_cells,)),
        "crop_glyph": ("int16", (n_cells,)),
        "crop_colour": ("int16", (n_cells,)),
    }


ARRAYS = tuple(array_specs(0, 0))
_worker: dict[str, Any] = {}


def _init_worker(cache: str) -> None:
    torch.set_num_threads(1)
    _worker["arrays"] = {k: np.load(Path(cache) / f"{k}.npy", mmap_mode="r+") for k in ARRAYS}


def _fill(job: tuple[int, int, int, dict, float, float, int, int]) -> int:
    """Generate images [start, stop) of world ``seed`` into rows offset + [start, stop) of the cache."""
    start, stop, seed, params_d, margin, jitter, offset, size = job
    params = WorldParams(**params_d)
    a = _worker["arrays"]
    for j in range(start, stop):
        i = offset + j
        s = generate_sample(params, seed, j)
        a["base"][i] = to_view(s.image, size)
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
        a["crop"][i] = np.asarray(s.image.crop(cb).convert("RGB").resize((size,) * 2, Image.BICUBIC))
        a["base_glyph"][i], a["base_colour"][i] = cell_labels(s, (0, 0, *s.image.size), params)
        a["crop_glyph"][i], a["crop_colour"][i] = cell_labels(s, cb, params, pad=False)
    return stop - start


Parts = list[tuple[int, WorldParams, int]]  # [(world seed, params, number of images), ...]


def _meta(parts: Parts, margin: float, jitter: float) -> dict[str, Any]:
    return {"parts": [[s, asdict(p), c] for s, p, c in parts], "margin": margin, "jitter": jitter}


def generate_data(
    cache: Path, parts: Parts, workers: int, margin: float, jitter: float, image_size: int = SIZES.image_size
) -> None:
    """Fill ``cache`` with the concatenation of ``parts``, views ``image_size`` px square."""
    n = sum(p[2] for p in parts)
    cells = {p.grid for _, p, _ in parts}
    if len(cells) != 1:
        raise ValueError(f"parts disagree on the token grid: {sorted(cells)}")
    cache.mkdir(parents=True, exist_ok=True)
    for k, (dtype, shape) in array_specs(image_size, cells.pop() ** 2).items():
        np.lib.format.open_memmap(cache / f"{k}.npy", mode="w+", dtype=dtype, shape=(n, *shape)).flush()
    jobs, offset = [], 0
    for seed, params, count in parts:
        if params.max_frames > MAX_FRAMES:
            raise ValueError(f"max_frames {params.max_frames} > {MAX_FRAMES}")
        chunk = 64
        for s in range(0, count, chunk):
            # each part is its own world seed; image indices restart at 0 inside it
            jobs.append((s, min(count, s + chunk), seed, asdict(params), margin, jitter, offset, image_size))
        offset += count
    t0 = time.time()
    with get_context("fork").Pool(workers, initializer=_init_worker, initargs=(str(cache),)) as pool:
        for _ in pool.imap_unordered(_fill, jobs):
            pass
    log(f"generated {n} images in {time.time() - t0:.1f}s with {workers} workers")
    (cache / "meta.json").write_text(json.dumps(_meta(parts, margin, jitter)))


def ensure_data(
    cache: Path, parts: Parts, workers: int, margin: float, jitter: float, image_size: int = SIZES.image_size
) -> None:
    """Generate ``cache`` unless it already holds exactly these parts and crop setting (its ``meta.json``)."""
    meta = cache / "meta.json"
    if not meta.exists():
        generate_data(cache, parts, workers, margin, jitter, image_size)
        return
    # through JSON both ways, so tuples and lists compare equal
    if json.loads(json.dumps(_meta(parts, margin, jitter))) != json.loads(meta.read_text()):
        raise SystemExit(f"{cache} holds another world or crop setting; pass another --cache or delete it")
    have = np.load(cache / "base.npy", mmap_mode="r").shape[1]
    if have != image_size:
        raise SystemExit(f"{cache} holds {have} px views, the model takes {image_size} px; pass another --cache")


def load_data(cache: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Move the cache's arrays to ``device`` (images stay uint8, the rest become int64)."""
    out = {}
    for k in ARRAYS:
        arr = np.load(cache / f"{k}.npy", mmap_mode="r")
        t = torch.empty(arr.shape, dtype=torch.uint8 if arr.dtype == np.uint8 else torch.long, device=device)
        step = 4096  # copy in slices: the whole memory map need not fit in host memory at once
        for s in range(0, arr.shape[0], step):
            t[s : s + step] = torch.from_numpy(np.array(arr[s : s + step])).to(device, t.dtype)
        out[k] = t
    return out


# ----------------------------------------------------------------------------- token templates


class Templates:
    """Fixed token layouts of the training sequences, checked against the processor's chat template.

    ``base``: one image and ``turns`` QA turns; ``crop``: two images (base view, crop) and one turn. ``*_col``
    are the positions of the colour word, ``*_ans`` those of the answer (the glyph word, then ``</s>``).
    """

    def __init__(self, processor: Any, params: WorldParams, turns: int, n_img: int):
        tok = processor.tokenizer
        self.tok = tok
        self.vocab = tok.get_vocab()
        self.image_id = self.vocab["<image>"]
        self.eos_id = tok.eos_token_id
        self.colour_ids = torch.tensor([self.vocab[c] for c in params.colours])
        self.glyph_ids = torch.tensor([self.vocab[g] for g in params.glyphs])
        self.n_img = n_img
        self.base, self.base_col, self.base_ans = self._layout(1, turns, n_img)
        self.crop, self.crop_col, self.crop_ans = self._layout(2, 1, n_img)
        self._check(processor)

    def to(self, device: torch.device) -> Templates:
        """Move the layouts and word ids to ``device``, in place."""
        for name in ("base", "base_col", "base_ans", "crop", "crop_col", "crop_ans", "colour_ids", "glyph_ids"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _ids(self, words: list[str]) -> list[int]:
        return [self.vocab[w] for w in words]

    def _layout(self, n_images: int, turns: int, n_img: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def _check(self, processor: Any) -> None:
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


# ----------------------------------------------------------------------------- batches


class Batches:
    """Training / evaluation batches indexed out of ``data`` (the arrays of :func:`load_data`, on ``device``)."""

    def __init__(self, data: dict[str, torch.Tensor], tpl: Templates, grid: int, device: torch.device):
        self.data, self.tpl, self.grid, self.device = data, tpl, grid, device
        self.n = data["n_named"].shape[0]
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    def pixels(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC views -> the normalised NCHW pixel values the vision tower takes."""
        return ((u8.permute(0, 3, 1, 2).float() / 255.0) - self.mean) / self.std

    def sample(self, pool: torch.Tensor | None, k: int) -> torch.Tensor:
        """``k`` image indices drawn with replacement from ``pool`` (None = every image)."""
        if pool is None:
            return torch.randint(0, self.n, (k,), device=self.device)
        return pool[torch.randint(0, len(pool), (k,), device=self.device)]

    def base_batch(
        self, idx: torch.Tensor, turns: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base-view samples, ``turns`` turns about distinct named frames (cycled when an image has fewer).

        Returns ids [B, L], pixels, glyph classes [B, turns] and the frames' token-cell boxes [B, turns, 4].
        """
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

    def crop_batch(
        self, idx: torch.Tensor, mask_prob: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
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

    def crop_read_cells(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, n_img] crop tokens that show the named frame's glyph (its colour and a glyph label)."""
        d = self.data
        colour = d["frame_colour"][idx].gather(1, d["target"][idx][:, None])
        return (d["crop_colour"][idx] == colour + 1) & (d["crop_glyph"][idx] > 0)
