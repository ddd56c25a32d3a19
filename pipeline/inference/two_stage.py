"""Stage 2 of SD-RPN inference: answer with the original view plus high-resolution crops (SPEC 3.4-3.5).

Crops come from an RoI (:mod:`pipeline.inference.roi`) on the first stage's probability map: one per component box
(box upscaling) or one of the box enclosing them all with a keep-mask on the crop's own grid (masked
upscaling). Everything family-specific happens behind the adapter (:meth:`ModelAdapter.stage2_inputs`): each
crop is cut from the source image, encoded by the model's own image processor and vision tower like an
ordinary second image, and its tokens go right after the original image's: the prompt is rendered with
``1 + n_crops`` images, so the chat template puts each crop between its own delimiters, and each crop's
placeholder run is as long as the number of tokens it keeps. The embeddings are built the way the model's
forward builds them (embed the ids, masked-scatter the visual features) and decoded greedily from
``inputs_embeds``, with explicit positions where the family needs them (Qwen2.5-VL's 3-D M-RoPE): no fork
of transformers.

- LLaVA (:class:`pipeline.models.llava.LlavaAdapter`): crops stretched to the base view (or to its
  ``crop_size``, fewer tokens), 1-D positions.
- DeepSeek-VL (:class:`pipeline.models.deepseek_vl.DeepseekVLAdapter`): as LLaVA; the original view is its
  processor's resize-then-pad square.
- Qwen2.5-VL (:class:`pipeline.models.qwen2_5_vl.Qwen25VLAdapter`): crops at the configured resolution
  (fixed size, padded to a grey square first with ``pad``, or native within the pixel budget), positions as
  the model computes them for a second image.

Crops are cut from the source image in source pixels (:meth:`ModelAdapter.source_box` undoes the view's pad,
resize and crop and clips to the image). When the crop's own view pads it (:attr:`ModelAdapter.crop_view`),
:func:`masked_keep` places the crop's tokens through that pad and keeps none of those over it.

A sample without crops gets exactly the baseline prompt and inputs, so its answer is the one
:func:`pipeline.teacher.decode.decode_batch` gives.

When stage 1 hands over its prefix cache (:class:`Stage1Output`, from ``rpn_maps(rpn, reuse_prefix=True)``),
stage 2 neither encodes the original view again nor runs the first ``B`` layers over the prompt's shared
prefix (:mod:`pipeline.inference.prefix_cache`); families without prefix reuse (Qwen2.5-VL) get stage 1's
visual tokens of the original view instead (``Stage1Output.features``), so only the crops go through the
vision tower. The answers are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.inference.prefix_cache import PrefixState, prefix_generate_inputs
from pipeline.inference.roi import RoI, RoIParams, UpscaleMode, postprocess
from pipeline.models.base import ModelAdapter, Stage2Inputs
from pipeline.models.geometry import Crop, Frame, SourceBox, grid_frame
from pipeline.teacher.decode import response_row


@dataclass
class Stage1Output:
    """Stage 1's RoI maps, and (when it kept them) what stage 2 can reuse of its forward."""

    maps: Sequence[np.ndarray]
    prefix: PrefixState | None = None
    features: list[torch.Tensor] | None = None  # the original views' visual tokens (families without prefix reuse)


MapSource = (
    Sequence[np.ndarray] | Stage1Output | Callable[[list[Image.Image], list[str]], Sequence[np.ndarray] | Stage1Output]
)


def masked_keep(
    mask_on_grid: np.ndarray,
    enclosing_box: tuple[int, int, int, int],
    crop_grid_hw: tuple[int, int],
    span: tuple[float, float, float, float] | None = None,
    crop_frame: Frame | None = None,
    crop_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The crop tokens to keep: the grid mask inside ``enclosing_box`` resized (nearest) onto the crop's grid.

    ``enclosing_box`` is inclusive (y0, x0, y1, x1). Nearest uses pixel centres (torch's
    'nearest-exact'): crop token (i, j) takes the mask value of the grid token under its centre.
    ``span`` (continuous grid coordinates, far edges exclusive) is the region the crop really
    covers when that differs from the box, e.g. after rounding to whole pixels or clipping away
    padding; it defaults to the box itself. ``crop_frame`` (with the crop's ``crop_size`` (width, height) in
    pixels) is the crop's own view when that pads it to a square (:func:`~pipeline.models.geometry.grid_frame`):
    crop tokens are then placed through the pad, and those whose centre lies in the padding are not kept.
    """
    mask = np.asarray(mask_on_grid, dtype=bool)
    gh, gw = mask.shape
    y0, x0, y1, x1 = enclosing_box
    sy0, sx0, sy1, sx1 = span if span is not None else (y0, x0, y1 + 1, x1 + 1)
    ch, cw = crop_grid_hw
    if crop_frame is None:
        cy = sy0 + (np.arange(ch) + 0.5) * (sy1 - sy0) / ch
        cx = sx0 + (np.arange(cw) + 0.5) * (sx1 - sx0) / cw
        on_y, on_x = np.ones(ch, dtype=bool), np.ones(cw, dtype=bool)
    else:
        if crop_size is None:
            raise ValueError("crop_frame needs crop_size (width, height)")
        pw, ph = crop_size
        py = float(crop_frame.y0) + (np.arange(ch) + 0.5) * float(crop_frame.h) / ch  # crop pixels
        px = float(crop_frame.x0) + (np.arange(cw) + 0.5) * float(crop_frame.w) / cw
        on_y, on_x = (py >= 0) & (py < ph), (px >= 0) & (px < pw)
        cy = sy0 + py / ph * (sy1 - sy0)
        cx = sx0 + px / pw * (sx1 - sx0)
    iy = np.clip(np.floor(cy).astype(int), 0, gh - 1)
    ix = np.clip(np.floor(cx).astype(int), 0, gw - 1)
    inside = np.zeros_like(mask)
    inside[y0 : y1 + 1, x0 : x1 + 1] = mask[y0 : y1 + 1, x0 : x1 + 1]
    return inside[np.ix_(iy, ix)] & on_y[:, None] & on_x[None, :]


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
    size = (box[2] - box[0], box[3] - box[1])
    view = getattr(adapter, "crop_view", None)  # stretched crops unless the adapter says otherwise
    frame = grid_frame(*size, view) if view is not None and view.pad_to_square else None
    keep = masked_keep(
        roi.mask,
        roi.enclosing,
        crop_grid(adapter, box),
        span=adapter.grid_span(box, width, height),
        crop_frame=frame,
        crop_size=size,
    )
    return [Crop(box, keep)] if keep.any() else []


def crop_grid(adapter: ModelAdapter, box: SourceBox) -> tuple[int, int]:
    """The visual grid a crop is encoded on (:meth:`ModelAdapter.crop_grid` of the crop's own size).

    LLaVA: its one fixed grid (the crop is stretched to the base view), or that of its ``crop_size``.
    Qwen2.5-VL: the fixed grid, or in native mode the crop's own size within the pixel budget (a non-square
    crop gets a non-square grid).
    """
    return adapter.crop_grid(box[2] - box[0], box[3] - box[1])


@torch.no_grad()
def build_stage2_inputs(
    adapter: ModelAdapter,
    images: list[Image.Image],
    questions: list[str],
    crops: list[list[Crop]],
    encode_originals: bool = True,
    original_features: Sequence[torch.Tensor] | None = None,
) -> Stage2Inputs:
    """Left-padded ids, attention mask and ``inputs_embeds`` (plus positions where the family needs them).

    Crops keeping no token are dropped here; the rest go to the adapter, which encodes them with the model's
    own vision tower and lays out the sequence (:meth:`ModelAdapter.stage2_inputs`).
    """
    if not (len(images) == len(questions) == len(crops)):
        raise ValueError("images, questions and crops must have one entry per sample")
    used: list[list[Crop]] = []
    for cs in crops:
        kept = []
        for c in cs:
            grid = crop_grid(adapter, c.box)
            if c.keep is not None and tuple(c.keep.shape) != tuple(grid):
                raise ValueError(f"crop keep-mask has shape {c.keep.shape}, the crop grid is {grid}")
            if c.n_tokens(grid) > 0:
                kept.append(c)
        used.append(kept)
    return adapter.stage2_inputs(
        images, questions, used, encode_originals=encode_originals, original_features=original_features
    )


@torch.no_grad()
def generate_with_crops(
    adapter: ModelAdapter,
    images: list[Image.Image],
    questions: list[str],
    crops: list[list[Crop]],
    max_new_tokens: int,
    prefix: PrefixState | None = None,
    features: Sequence[torch.Tensor] | None = None,
) -> list[dict]:
    """Greedy answers from the original view plus each sample's crops (none: the baseline answer).

    A sample whose stage-2 prompt (with its crops' tokens) plus ``max_new_tokens`` would pass the model's context
    length is answered from the original view alone, its crops dropped, and its row says so in ``skip_reason``
    (past ``max_position_embeddings`` the model would answer nonsense).

    With ``prefix`` (stage 1's :class:`~pipeline.inference.prefix_cache.PrefixState` for the same rows) the shared
    prompt prefix comes from stage 1's cache instead of being encoded again; with ``features`` (stage 1's visual tokens
    of the same images) the original views skip the vision tower. Same answers, less work.
    """
    reuse = prefix is not None and adapter.supports_prefix_reuse

    def build(crops: list[list[Crop]]) -> Stage2Inputs:
        return build_stage2_inputs(
            adapter, images, questions, crops, encode_originals=not reuse, original_features=None if reuse else features
        )

    inputs = build(crops)
    notes: list[str | None] = [None] * len(images)
    limit = adapter.context_length
    if limit is not None:
        lengths = inputs.attention_mask.sum(1).tolist()
        over = [i for i, n in enumerate(lengths) if inputs.crops[i] and n + max_new_tokens > limit]
        for i in over:
            notes[i] = (
                f"stage 2 past the model's context: {lengths[i]} tokens with crops + {max_new_tokens} new tokens > "
                f"{limit} (max_position_embeddings); answered from the original view, crops dropped"
            )
        if over:
            inputs = build([[] if i in over else cs for i, cs in enumerate(crops)])
    out = adapter.model.generate(
        **(prefix_generate_inputs(adapter, prefix, inputs) if reuse else inputs.model_inputs()),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=adapter.pad_token_id,
        eos_token_id=adapter.eos_token_ids,
    )
    # From inputs_embeds alone, generate() returns only the new tokens. Explicit positions (Qwen's M-RoPE) are
    # continued by generate() from each row's last position: what the model's own rope deltas give.
    rows = []
    for prompt, toks, cs, n, note in zip(
        inputs.prompts, out.tolist(), inputs.crops, inputs.n_crop_tokens, notes, strict=True
    ):
        row = response_row(adapter, prompt, toks)
        row["crop_boxes"] = [list(c.box) for c in cs]
        row["n_crop_tokens"] = n
        row["skip_reason"] = note
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
    ``(images, questions) -> maps`` (the RPN's stage 1, or raw attention); a :class:`Stage1Output` (or a callable
    returning one) also hands stage 2 the prefix cache. Returns the answer rows (with ``grid_boxes``,
    ``enclosing``, ``crop_boxes``, ``n_crop_tokens``) and the RoIs.
    """
    params = params or RoIParams()
    prob = maps(images, questions) if callable(maps) else maps
    prefix = features = None
    if isinstance(prob, Stage1Output):
        prob, prefix, features = prob.maps, prob.prefix, prob.features
    if len(prob) != len(images):
        raise ValueError(f"{len(prob)} maps for {len(images)} images")
    for m, im in zip(prob, images, strict=True):
        if tuple(np.shape(m)) != tuple(adapter.visual_grid(im.width, im.height)):
            raise ValueError(f"map of shape {np.shape(m)} for a {adapter.visual_grid(im.width, im.height)} grid")
    rois = [postprocess(np.asarray(m), params) for m in prob]
    crops = [crops_from_roi(r, adapter, im.width, im.height, params.mode) for r, im in zip(rois, images, strict=True)]
    rows = generate_with_crops(adapter, images, questions, crops, max_new_tokens, prefix, features)
    for row, roi in zip(rows, rois, strict=True):
        row["grid_boxes"] = [list(b) for b in roi.boxes]
        row["enclosing"] = list(roi.enclosing) if roi.enclosing is not None else None
    return rows, rois
