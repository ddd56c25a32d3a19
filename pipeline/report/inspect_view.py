"""Side-by-side pictures of what the pipeline sees for one sample (PIL only, no plotting library).

Panels: the image with its ground-truth box and the chosen crops; the teacher's raw attention; the
sink tokens; the tri-state labels; the RPN's map; then the answers. Maps live on the visual grid and
are drawn over the model's view of the image (pad-to-square or resize, exactly as the processor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 256
GREEN, RED, BLUE, GREY = (40, 200, 60), (230, 40, 40), (40, 90, 230), (150, 150, 150)


@dataclass
class SampleView:
    """Everything known about one sample; any map may be None when its artifact does not hold the sample."""

    sample_id: str
    image: Image.Image
    question: str
    answer: str | None
    gt_box: tuple[float, float, float, float] | None  # source pixels
    raw_attention: np.ndarray | None = None  # (h, w)
    sinks: np.ndarray | None = None  # (h, w) bool
    labels: np.ndarray | None = None  # (h, w) int8
    rpn_map: np.ndarray | None = None  # (h, w) in [0, 1]
    crop_boxes: list[list[int]] = field(default_factory=list)  # source pixels
    answers: dict[str, str] = field(default_factory=dict)  # method -> answer


def _heat(values: np.ndarray) -> np.ndarray:
    """A small perceptual-ish colour map (dark blue -> yellow) for values in [0, 1]."""
    v = np.clip(values, 0, 1)[..., None]
    lo, mid, hi = np.array([20, 20, 90]), np.array([200, 40, 90]), np.array([250, 230, 60])
    return np.where(v < 0.5, lo + (mid - lo) * v * 2, mid + (hi - mid) * (v - 0.5) * 2).astype(np.uint8)


def _overlay(base: Image.Image, rgb_grid: np.ndarray, alpha: float = 0.55) -> Image.Image:
    over = Image.fromarray(rgb_grid).resize(base.size, Image.NEAREST)
    return Image.blend(base, over, alpha)


def _scaled(box, sx: float, sy: float):
    return [box[0] * sx, box[1] * sy, box[2] * sx - 1, box[3] * sy - 1]


def model_view(pixel_values, mean, std) -> Image.Image:
    """The image as the model sees it, from the processor's normalised (3, H, W) pixel values."""
    arr = np.asarray(pixel_values, dtype=np.float32).transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return Image.fromarray(np.clip(arr * 255, 0, 255).astype(np.uint8))


def render(view: SampleView, model_view: Image.Image) -> Image.Image:
    """Compose the panels for ``view``; ``model_view`` is the image as the model sees it (grid-aligned)."""
    font = ImageFont.load_default(size=13)
    src = view.image.resize((PANEL, PANEL)) if view.image.size != (PANEL, PANEL) else view.image.copy()
    sx, sy = PANEL / view.image.width, PANEL / view.image.height
    draw = ImageDraw.Draw(src)
    if view.gt_box is not None:
        draw.rectangle(_scaled(view.gt_box, sx, sy), outline=GREEN, width=3)
    for box in view.crop_boxes:
        draw.rectangle(_scaled(box, sx, sy), outline=RED, width=2)
    base = model_view.convert("RGB").resize((PANEL, PANEL))
    panels = [("image, GT box (green), crops (red)", src)]
    if view.raw_attention is not None:
        a = view.raw_attention / max(float(view.raw_attention.max()), 1e-12)
        panels.append(("raw attention (a / a_max)", _overlay(base, _heat(a))))
    if view.sinks is not None:
        grid = np.where(view.sinks[..., None], np.array(RED, np.uint8), np.array((30, 30, 30), np.uint8))
        panels.append((f"sink tokens ({int(view.sinks.sum())})", _overlay(base, grid.astype(np.uint8), 0.5)))
    if view.labels is not None:
        colours = np.array([GREY, BLUE, RED], np.uint8)  # -1 ignore, 0 bg, 1 fg
        panels.append(("labels: fg red, bg blue, ignore grey", _overlay(base, colours[view.labels + 1])))
    if view.rpn_map is not None:
        panels.append(("RPN map (sigmoid)", _overlay(base, _heat(view.rpn_map))))
    width = PANEL * len(panels)
    lines = [f"{view.sample_id}: {view.question}", f"ground truth: {view.answer}"]
    lines += [f"{method}: {text}" for method, text in view.answers.items()]
    canvas = Image.new("RGB", (width, PANEL + 22 + 18 * len(lines)), "white")
    d = ImageDraw.Draw(canvas)
    for i, (title, im) in enumerate(panels):
        d.text((i * PANEL + 4, 3), title, fill="black", font=font)
        canvas.paste(im, (i * PANEL, 20))
    for j, line in enumerate(lines):
        d.text((4, PANEL + 24 + 18 * j), line, fill="black", font=font)
    return canvas
