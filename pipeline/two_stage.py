"""Stage 2 of SD-RPN inference: answer with the original view plus high-resolution crops (SPEC 3.4-3.5).

Crops come from an RoI (:mod:`pipeline.roi`) on the first stage's probability map. Each crop is
cut from the source image, resized straight to the model's base view by the model's own image
processor, and encoded by the model's own ``get_image_features``. Its tokens go right after the
original image's tokens: the prompt is rendered with ``1 + n_crops`` images (so the chat template
puts the placeholders back to back) and each crop's placeholder run is as long as the number of
tokens it keeps (all of them for box upscaling, those under the mask for masked upscaling). The
embeddings are then built the way ``LlavaModel.forward`` builds them (embed the ids, masked-scatter
the visual features) and decoded greedily from ``inputs_embeds``: no fork of transformers.

A sample without crops gets exactly the baseline prompt and inputs, so its answer is the one
:func:`pipeline.decode.decode_batch` gives. Written for LLaVA-style adapters (one fixed grid per
image, ``get_image_features`` returning one feature row per grid token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.models.base import ModelAdapter, left_pad
from pipeline.roi import RoI, RoIParams, UpscaleMode, postprocess

SourceBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) source pixels, far edge exclusive
MapSource = Sequence[np.ndarray] | Callable[[list[Image.Image], list[str]], Sequence[np.ndarray]]


@dataclass
class Crop:
    """One region to look at again: a source-pixel box and, for masked upscaling, the tokens to keep.

    ``keep`` is a bool (h, w) mask on the crop's own visual grid (row-major, like the tokens);
    None keeps every token.
    """

    box: SourceBox
    keep: np.ndarray | None = None

    def n_tokens(self, grid_hw: tuple[int, int]) -> int:
        return int(self.keep.sum()) if self.keep is not None else grid_hw[0] * grid_hw[1]


@dataclass
class Stage2Inputs:
    """A left-padded stage-2 batch: ids with image placeholders, their embeddings with the visual features in."""

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[str]
    crops: list[list[Crop]]  # the crops actually used (those keeping at least one token)
    n_crop_tokens: list[int]


def masked_keep(
    mask_on_grid: np.ndarray,
    enclosing_box: tuple[int, int, int, int],
    crop_grid_hw: tuple[int, int],
    span: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """The crop tokens to keep: the grid mask inside ``enclosing_box`` resized (nearest) onto the crop's grid.

    ``enclosing_box`` is inclusive (y0, x0, y1, x1). Nearest uses pixel centres (torch's
    'nearest-exact'): crop token (i, j) takes the mask value of the grid token under its centre.
    ``span`` (continuous grid coordinates, far edges exclusive) is the region the crop really
    covers when that differs from the box, e.g. after rounding to whole pixels or clipping away
    padding; it defaults to the box itself.
    """
    mask = np.asarray(mask_on_grid, dtype=bool)
    gh, gw = mask.shape
    y0, x0, y1, x1 = enclosing_box
    sy0, sx0, sy1, sx1 = span if span is not None else (y0, x0, y1 + 1, x1 + 1)
    ch, cw = crop_grid_hw
    cy = sy0 + (np.arange(ch) + 0.5) * (sy1 - sy0) / ch
    cx = sx0 + (np.arange(cw) + 0.5) * (sx1 - sx0) / cw
    iy = np.clip(np.floor(cy).astype(int), 0, gh - 1)
    ix = np.clip(np.floor(cx).astype(int), 0, gw - 1)
    inside = np.zeros_like(mask)
    inside[y0 : y1 + 1, x0 : x1 + 1] = mask[y0 : y1 + 1, x0 : x1 + 1]
    return inside[np.ix_(iy, ix)]


def crops_from_roi(roi: RoI, adapter: ModelAdapter, width: int, height: int, mode: UpscaleMode) -> list[Crop]:
    """Box upscaling: one crop per component box. Masked upscaling: one crop of the enclosing box + keep-mask.

    Crops that fall wholly in padding, or keep no token, are dropped; no crops means the sample is
    answered from the original view alone.
    """
    if mode == "box":
        boxes = [adapter.source_box(b, width, height) for b in roi.boxes]
        return [Crop(b) for b in boxes if b[2] > b[0] and b[3] > b[1]]
    if mode != "masked":
        raise ValueError(f"mode must be 'masked' or 'box', got {mode!r}")
    if roi.enclosing is None:
        return []
    box = adapter.source_box(roi.enclosing, width, height)
    if box[2] <= box[0] or box[3] <= box[1]:
        return []
    crop_grid = adapter.visual_grid(box[2] - box[0], box[3] - box[1])
    keep = masked_keep(roi.mask, roi.enclosing, crop_grid, span=adapter.grid_span(box, width, height))
    return [Crop(box, keep)] if keep.any() else []


def _base_view(adapter: ModelAdapter) -> int:
    return int(adapter.model.config.vision_config.image_size)


def crop_pixels(adapter: ModelAdapter, images: list[Image.Image], boxes: list[SourceBox]) -> torch.Tensor:
    """Pixel values of crops, each resized straight to the base view by the model's image processor.

    Same resampling and normalisation as the original view, but no pad and no centre crop: the crop
    fills the whole grid, so crop token (i, j) sits at (i, j) of the crop's box. For a square crop
    of a padding processor this is exactly what the processor makes of the crop on its own.
    """
    ip = adapter.processor.image_processor
    side = _base_view(adapter)
    kwargs = {"size": {"height": side, "width": side}, "do_center_crop": False}
    if hasattr(ip, "do_pad"):
        kwargs["do_pad"] = False
    cut = [im.crop(b) for im, b in zip(images, boxes, strict=True)]
    return ip(cut, return_tensors="pt", **kwargs)["pixel_values"]


@torch.no_grad()
def image_features(adapter: ModelAdapter, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The model's own visual tokens, (T, D) per image, in grid row-major order."""
    model = adapter.model
    out = model.get_image_features(pixel_values=pixel_values.to(adapter.device, model.dtype))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return list(feats)


def _expand_placeholders(adapter: ModelAdapter, prompt: str, counts: list[int]) -> list[int]:
    """Token ids of ``prompt`` with its k-th image placeholder repeated ``counts[k]`` times.

    The same string expansion the processor does before tokenising, so a crop keeping all its
    tokens yields exactly the processor's ids for the same prompt with two images.
    """
    tok = adapter.processor.image_token
    parts = prompt.split(tok)
    if len(parts) != len(counts) + 1:
        raise ValueError(f"prompt has {len(parts) - 1} image placeholders, expected {len(counts)}")
    text = parts[0] + "".join(tok * n + part for n, part in zip(counts, parts[1:], strict=True))
    return list(adapter.tokenizer(text)["input_ids"])


@torch.no_grad()
def build_stage2_inputs(
    adapter: ModelAdapter, images: list[Image.Image], questions: list[str], crops: list[list[Crop]]
) -> Stage2Inputs:
    """Left-padded ids, attention mask and ``inputs_embeds`` with the original and the kept crop tokens in."""
    if not (len(images) == len(questions) == len(crops)):
        raise ValueError("images, questions and crops must have one entry per sample")
    side = _base_view(adapter)
    grid = adapter.visual_grid(side, side)
    n_full = grid[0] * grid[1]
    used = [[c for c in cs if c.n_tokens(grid) > 0] for cs in crops]
    for cs in used:
        for c in cs:
            if c.keep is not None and c.keep.shape != grid:
                raise ValueError(f"crop keep-mask has shape {c.keep.shape}, the crop grid is {grid}")

    # One vision forward for every original view and crop of the batch.
    ip = adapter.processor.image_processor
    pixels = [ip(images, return_tensors="pt")["pixel_values"]]
    crop_images = [im for im, cs in zip(images, used, strict=True) for _ in cs]
    if crop_images:
        pixels.append(crop_pixels(adapter, crop_images, [c.box for cs in used for c in cs]))
    feats = image_features(adapter, torch.cat(pixels))
    orig_feats, crop_feats = feats[: len(images)], iter(feats[len(images) :])

    prompts, rows, seq_feats, n_crop_tokens = [], [], [], []
    for i, (q, cs) in enumerate(zip(questions, used, strict=True)):
        prompt = adapter.render_prompt(q, n_images=1 + len(cs))
        counts = [n_full] + [c.n_tokens(grid) for c in cs]
        prompts.append(prompt)
        rows.append(_expand_placeholders(adapter, prompt, counts))
        seq_feats.append(orig_feats[i])
        for c in cs:
            f = next(crop_feats)
            seq_feats.append(f if c.keep is None else f[torch.from_numpy(c.keep.reshape(-1)).to(f.device)])
        n_crop_tokens.append(sum(counts[1:]))

    ids, mask = left_pad(rows, adapter.pad_token_id)
    ids, mask = ids.to(adapter.device), mask.to(adapter.device)
    embeds = adapter.model.get_input_embeddings()(ids)
    slots = (ids == adapter.model.config.image_token_id) & mask.bool()
    visual = torch.cat(seq_feats).to(embeds.device, embeds.dtype)
    if int(slots.sum()) != visual.shape[0]:
        raise RuntimeError(f"{int(slots.sum())} image placeholders for {visual.shape[0]} visual tokens")
    # Row-major over (batch, sequence), exactly as LlavaModel.forward scatters its image features.
    embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), visual)
    return Stage2Inputs(ids, embeds, mask, prompts, used, n_crop_tokens)


def _response_row(adapter: ModelAdapter, prompt: str, toks: list[int]) -> dict:
    eos = set(adapter.eos_token_ids)
    cut = next((i for i, t in enumerate(toks) if t in eos), None)
    ids = toks[: cut + 1] if cut is not None else toks  # keep the EOS itself, drop the padding after it
    return {
        "prompt": prompt,
        "response": adapter.tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "response_token_ids": ids,
        "finish_reason": "eos" if cut is not None else "length",
        "model_id": adapter.model_id,
    }


@torch.no_grad()
def generate_with_crops(
    adapter: ModelAdapter,
    images: list[Image.Image],
    questions: list[str],
    crops: list[list[Crop]],
    max_new_tokens: int,
) -> list[dict]:
    """Greedy answers from the original view plus each sample's crops (none: the baseline answer)."""
    inputs = build_stage2_inputs(adapter, images, questions, crops)
    out = adapter.model.generate(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=adapter.pad_token_id,
        eos_token_id=adapter.eos_token_ids,
    )
    # From inputs_embeds alone, generate() returns only the new tokens.
    rows = []
    for prompt, toks, cs, n in zip(inputs.prompts, out.tolist(), inputs.crops, inputs.n_crop_tokens, strict=True):
        row = _response_row(adapter, prompt, toks)
        row["crop_boxes"] = [list(c.box) for c in cs]
        row["n_crop_tokens"] = n
        rows.append(row)
    return rows


@torch.no_grad()
def two_stage_batch(
    adapter: ModelAdapter,
    images: list[Image.Image],
    questions: list[str],
    maps: MapSource,
    params: RoIParams | None = None,
    max_new_tokens: int = 128,
) -> tuple[list[dict], list[RoI]]:
    """SD-RPN inference for one batch: RoI maps -> post-processing -> crops -> greedy answers.

    ``maps`` holds one (H, W) probability map on each image's visual grid, or is a callable
    ``(images, questions) -> maps`` (the RPN's stage 1, or raw attention). Returns the answer rows
    (with ``grid_boxes``, ``enclosing``, ``crop_boxes``, ``n_crop_tokens``) and the RoIs.
    """
    params = params or RoIParams()
    prob = maps(images, questions) if callable(maps) else maps
    if len(prob) != len(images):
        raise ValueError(f"{len(prob)} maps for {len(images)} images")
    for m, im in zip(prob, images, strict=True):
        if tuple(np.shape(m)) != tuple(adapter.visual_grid(im.width, im.height)):
            raise ValueError(f"map of shape {np.shape(m)} for a {adapter.visual_grid(im.width, im.height)} grid")
    rois = [postprocess(np.asarray(m), params) for m in prob]
    crops = [crops_from_roi(r, adapter, im.width, im.height, params.mode) for r, im in zip(rois, images, strict=True)]
    rows = generate_with_crops(adapter, images, questions, crops, max_new_tokens)
    for row, roi in zip(rows, rois, strict=True):
        row["grid_boxes"] = [list(b) for b in roi.boxes]
        row["enclosing"] = list(roi.enclosing) if roi.enclosing is not None else None
    return rows, rois
