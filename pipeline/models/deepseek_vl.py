"""DeepSeek-VL architecture (``DeepseekVLForConditionalGeneration``): deepseek-community DeepSeek-VL-1.3B and toys.

DeepSeek-VL-1.3B is a SigLIP-L/16 at 384 px (one fixed 24 x 24 grid, 576 visual tokens per image), a two-layer
MLP aligner and a LLaMA-style decoder (DeepSeek-LLM-1.3B: 24 layers of 16 heads, 1-D rotary positions). The
pipeline sees it exactly as a LLaVA-1.5 with two differences, both in the processor:

- the view: the long side is resized to 384 px first, then the image is padded to a centred square of the
  image-mean colour (:class:`~pipeline.models.geometry.ViewSpec` ``longest_edge``), where LLaVA's reference view
  pads first and resizes after;
- the prompt: DeepSeek-VL's own chat format, a system prompt, ``User: <image_placeholder>{question}`` and
  ``Assistant:`` (the paper's Appendix C prompt for pseudo-labels follows "the model's standard input format").

Prefix reuse holds: the system prompt and the image come before the question, positions are 1-D from the padding
mask, so stage 2 may start from stage 1's cache up to the end of the original view.

The hybrid DeepSeek-VL-7B (``deepseek_vl_hybrid``) is not supported: its image features mix the SigLIP view with
a 1024 px SAM view (``high_res_pixel_values``), so a stage-2 crop would need both encoders and their alignment,
which this adapter does not model.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.geometry import ViewSpec
from pipeline.models.llava import LlavaAdapter


class DeepseekVLAdapter(LlavaAdapter):
    """Adapter for DeepSeek-VL (SigLIP-only): one fixed square grid, resize-then-pad view, DeepSeek chat format."""

    family = "deepseek_vl"

    def __init__(self, model: nn.Module, processor, model_id: str, crop_size: int | None = None):
        """``crop_size``: side in pixels of the square view stage-2 crops are encoded at (None: the base view)."""
        super().__init__(model, processor, model_id, crop_size=crop_size, pad_to_square=False)
        size = _get(self.processor.image_processor.size, "height")
        if size is not None and int(size) != self.base_view:
            raise ValueError(
                f"model {model_id}: the image processor resizes to {size} px but the vision tower is built for "
                f"{self.base_view} px"
            )

    @property
    def view_spec(self) -> ViewSpec:
        """Long side to the base view, then (``do_pad``) a centred square: the processor's own order."""
        ip = self.processor.image_processor
        return ViewSpec(
            pad_to_square=bool(getattr(ip, "do_pad", True)),
            longest_edge=self.base_view,
            min_size=int(getattr(ip, "min_size", 0) or 0),
        )

    @property
    def pad_fill(self) -> tuple[int, ...]:
        """The processor's pad colour (``int(255 * mean)`` per channel)."""
        return tuple(int(x) for x in self.processor.image_processor.background_color)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The model's own visual tokens, (T, D) per image, in grid row-major order (any multiple of the patch).

        ``DeepseekVLForConditionalGeneration`` keeps ``get_image_features`` on its inner ``DeepseekVLModel``.
        """
        extra = {"interpolate_pos_encoding": True} if pixel_values.shape[-1] != self.base_view else {}
        out = self.model.model.get_image_features(pixel_values.to(self.device, self.model.dtype), **extra)
        return list(out.pooler_output)

    def crop_pixels(self, images, boxes):
        """Pixel values of crops, each stretched to :attr:`crop_side` square (the processor's resampling), no pad.

        The processor alone would keep a crop's aspect ratio and pad it; stretching fills the grid so crop token
        (i, j) sits at (i, j) of the crop's box, as for LLaVA. A square image's full crop at the base view is
        exactly the processor's own view of it.
        """
        ip = self.processor.image_processor
        side = self.crop_side
        cut = [im.convert("RGB").crop(b).resize((side, side), ip.resample) for im, b in zip(images, boxes, strict=True)]
        return ip(cut, return_tensors="pt", size={"height": side, "width": side}, do_pad=False)["pixel_values"]


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
