"""Exact mapping between source-image pixels and the visual token grid.

A processor turns a ``width`` x ``height`` image into the base view in up to three steps, each an
axis-aligned affine map, so the grid always tiles one rectangle of source coordinates uniformly
(the *frame*; it reaches outside the image where there is padding and covers part of it where
there is a centre crop):

1. optional pad to square, centred as ``LlavaImageProcessorPil.pad_to_square`` does: the short side
   is offset by ``(long - short) // 2`` pixels;
2. resize: to the base view (scale only; the grid is resolution-free), or with ``shortest_edge``
   the short side to that size and the long side to ``int(size * long / short)`` (transformers'
   ``get_resize_output_image_size``);
3. optional centre crop to ``crop_hw`` at ``((resized - crop) // 2)`` per axis.

DeepSeek-VL's processor works the other way round (``longest_edge``): it resizes the long side to the
base view first (each side ``max(round(side * view / long), min_size)``, transformers'
``DeepseekVLImageProcessorPil.resize``) and then pads the resized image to a centred square, offset
``(view - resized) // 2``; the frame then follows from the resized sides, which rounding makes differ
slightly from a pad-then-resize.

Conventions: grid boxes are ``(y0, x0, y1, x1)`` with inclusive token indices (as
:mod:`pipeline.inference.roi` makes them); source boxes are ``(x0, y0, x1, y1)`` pixels with the far edge
exclusive (``PIL.Image.crop`` order). Arithmetic is exact (fractions), so results do not depend on
float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

GridBox = tuple[int, int, int, int]  # (y0, x0, y1, x1), inclusive token indices
SourceBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, far edge exclusive
GridSpan = tuple[float, float, float, float]  # (y0, x0, y1, x1) continuous grid coordinates, far edge exclusive


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


@dataclass(frozen=True)
class ViewSpec:
    """How a processor maps an image onto its base view.

    ``shortest_edge`` None means a plain resize straight to the base view (``crop_hw`` is then
    irrelevant); ``crop_hw`` None means no centre crop. ``longest_edge`` (DeepSeek-VL) means: resize the
    long side to it (no side below ``min_size``), then pad to a centred square when ``pad_to_square``.
    """

    pad_to_square: bool = True
    shortest_edge: int | None = None
    crop_hw: tuple[int, int] | None = None
    longest_edge: int | None = None
    min_size: int = 0


@dataclass(frozen=True)
class Frame:
    """The source-coordinate rectangle [x0, x0 + w) x [y0, y0 + h) that the grid tiles uniformly."""

    x0: Fraction
    y0: Fraction
    w: Fraction
    h: Fraction


def _as_spec(view: ViewSpec | bool) -> ViewSpec:
    return view if isinstance(view, ViewSpec) else ViewSpec(pad_to_square=bool(view))


def grid_frame(width: int, height: int, view: ViewSpec | bool = True) -> Frame:
    """The frame of a ``width`` x ``height`` image under ``view`` (a bool is shorthand for pad / plain resize)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    spec = _as_spec(view)
    if spec.longest_edge is not None:
        return _resize_then_pad_frame(width, height, spec)
    x0 = y0 = Fraction(0)
    pw, ph = width, height
    if spec.pad_to_square:
        side = max(width, height)
        x0, y0 = -Fraction((side - width) // 2), -Fraction((side - height) // 2)
        pw = ph = side
    if spec.shortest_edge is None or spec.crop_hw is None:
        return Frame(x0, y0, Fraction(pw), Fraction(ph))
    short, long = min(pw, ph), max(pw, ph)
    new_long = int(spec.shortest_edge * long / short)  # same float expression as transformers
    rw, rh = (spec.shortest_edge, new_long) if pw <= ph else (new_long, spec.shortest_edge)
    ch, cw = spec.crop_hw
    if ch > rh or cw > rw:
        raise ValueError(f"centre crop {spec.crop_hw} is larger than the resized image {(rh, rw)}")
    sx, sy = Fraction(pw, rw), Fraction(ph, rh)  # source pixels per resized pixel
    return Frame(x0 + ((rw - cw) // 2) * sx, y0 + ((rh - ch) // 2) * sy, cw * sx, ch * sy)


def _resize_then_pad_frame(width: int, height: int, spec: ViewSpec) -> Frame:
    """The frame of a resize of the long side to ``spec.longest_edge``, then (optionally) a centred pad."""
    side = spec.longest_edge
    delta = side / max(width, height)  # the same float expression as transformers' DeepSeek-VL resize
    rw, rh = max(round(width * delta), spec.min_size), max(round(height * delta), spec.min_size)
    sx, sy = Fraction(width, rw), Fraction(height, rh)  # source pixels per resized pixel
    if not spec.pad_to_square:
        return Frame(Fraction(0), Fraction(0), Fraction(width), Fraction(height))
    square = max(rw, rh)  # the processor pads to the resized long side
    ox, oy = (square - rw) // 2, (square - rh) // 2
    return Frame(-ox * sx, -oy * sy, square * sx, square * sy)


def grid_box_to_source(
    grid_box: GridBox, grid_hw: tuple[int, int], width: int, height: int, view: ViewSpec | bool = True
) -> SourceBox:
    """Source pixels under an inclusive grid box, clipped to the image (padding excluded).

    The box covers every pixel that any of its tokens touches (near edge floored, far edge
    ceiled). A box that lies wholly in padding comes back empty (``x1 <= x0`` or ``y1 <= y0``).
    """
    gy0, gx0, gy1, gx1 = grid_box
    gh, gw = grid_hw
    if not (0 <= gy0 <= gy1 < gh and 0 <= gx0 <= gx1 < gw):
        raise ValueError(f"grid box {grid_box} is not inside a {gh} x {gw} grid")
    f = grid_frame(width, height, view)
    x0 = math.floor(f.x0 + gx0 * f.w / gw)
    x1 = math.ceil(f.x0 + (gx1 + 1) * f.w / gw)
    y0 = math.floor(f.y0 + gy0 * f.h / gh)
    y1 = math.ceil(f.y0 + (gy1 + 1) * f.h / gh)
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def source_box_to_span(
    source_box: tuple[float, float, float, float],
    grid_hw: tuple[int, int],
    width: int,
    height: int,
    view: ViewSpec | bool = True,
) -> GridSpan:
    """A source box in continuous grid coordinates (token ``i`` spans [i, i + 1)), unclipped."""
    x0, y0, x1, y1 = (Fraction(v) for v in source_box)
    gh, gw = grid_hw
    f = grid_frame(width, height, view)
    return (
        float((y0 - f.y0) * gh / f.h),
        float((x0 - f.x0) * gw / f.w),
        float((y1 - f.y0) * gh / f.h),
        float((x1 - f.x0) * gw / f.w),
    )


def source_box_to_grid(
    source_box: tuple[float, float, float, float],
    grid_hw: tuple[int, int],
    width: int,
    height: int,
    view: ViewSpec | bool = True,
) -> GridBox | None:
    """The inclusive grid box of every token that overlaps ``source_box`` (x0, y0, x1, y1) with positive area.

    The box is clipped to the image first (ground-truth boxes may spill over); None when nothing
    of it lies in both the image and the grid (an empty box, or one cut away by a centre crop).
    """
    gh, gw = grid_hw
    x0, y0, x1, y1 = (Fraction(v) for v in source_box)
    x0, y0, x1, y1 = max(x0, Fraction(0)), max(y0, Fraction(0)), min(x1, Fraction(width)), min(y1, Fraction(height))
    if x1 <= x0 or y1 <= y0:
        return None
    f = grid_frame(width, height, view)
    gx0 = max(math.floor((x0 - f.x0) * gw / f.w), 0)
    gx1 = min(math.ceil((x1 - f.x0) * gw / f.w) - 1, gw - 1)
    gy0 = max(math.floor((y0 - f.y0) * gh / f.h), 0)
    gy1 = min(math.ceil((y1 - f.y0) * gh / f.h) - 1, gh - 1)
    if gx1 < gx0 or gy1 < gy0:
        return None
    return gy0, gx0, gy1, gx1


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of colour ``fill`` (the reference code's ``expand2square``).

    The side is the long side; the short side is offset by ``(long - short) // 2`` pixels, as
    :func:`grid_frame` models a pad. A square image comes back as it is.
    """
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def padding_token_mask(width: int, height: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """(grid_h * grid_w,) bool: the tokens of a padded square view that the reference code counts as padding.

    The rule of the reference ``get_foreground_mask`` (Qwen2.5-VL ``qwen_src/mm_utils.py``) on an ``n`` x ``n``
    grid: the image's sides scaled to the grid, ``int(side / long * n)`` (at least 1); the short side's
    content starts at ``(n - s) // 2`` and ends, exclusive, at ``s + ceil((n - s) / 2)``: the content
    rectangle rounded outward by the reference's integer arithmetic (not the exact frame of
    :func:`grid_frame`). A square image has no padding tokens.
    """
    gh, gw = grid_hw
    if gh != gw:
        raise ValueError(f"padding tokens are defined for a square grid, got {gh} x {gw}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    n = gh
    long = max(width, height)
    sw = max(int(width / long * n), 1)
    sh = max(int(height / long * n), 1)
    fg = np.zeros((n, n), dtype=bool)
    if sw > sh:
        fg[(n - sh) // 2 : min(sh + math.ceil((n - sh) / 2), n), :sw] = True
    elif sh > sw:
        fg[:sh, (n - sw) // 2 : min(sw + math.ceil((n - sw) / 2), n)] = True
    else:
        fg[:] = True
    return ~fg.reshape(-1)


def gt_token_masks(spans: list[tuple[float, float, float, float] | None], grids: np.ndarray, max_visual: int):
    """(n, max_visual) bool masks of the tokens whose centre lies in each continuous grid span, and has_gt (n,).

    ``spans`` are GT boxes in continuous grid coordinates (y0, x0, y1, x1; token i spans [i, i + 1)), None
    where a sample has no box; ``grids`` (n, 2) the per-sample grids (row-major tokens).
    """
    n = len(spans)
    masks = np.zeros((n, max_visual), dtype=bool)
    has = np.array([s is not None for s in spans], dtype=bool)
    for i, span in enumerate(spans):
        if span is None:
            continue
        gh, gw = (int(v) for v in grids[i])
        cy = np.arange(gh) + 0.5
        cx = np.arange(gw) + 0.5
        inside = ((cy >= span[0]) & (cy < span[2]))[:, None] & ((cx >= span[1]) & (cx < span[3]))[None, :]
        masks[i, : gh * gw] = inside.ravel()
    return masks, has
