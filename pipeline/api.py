"""A small Python API for one-off use: answer a question about an image with a trained RPN.

    from pipeline.api import SDRPN
    sd = SDRPN.from_pretrained("models/sdrpn-toy-llava", "artifacts/release/rpn")
    ans = sd.answer("photo.png", "what is in the red box ?")
    ans.text, ans.crop_boxes, ans.prob_map

A release checkpoint (``sdrpn release``) records the settings the evaluate stage ran it with (RoI threshold,
smoothing, filters, upscaling mode, crop size, answer length); they are the defaults here, so the API answers
as evaluate did. Explicit arguments override them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.inference.evaluate import rpn_maps
from pipeline.inference.params import InferenceSettings
from pipeline.inference.roi import RoIParams
from pipeline.inference.two_stage import two_stage_batch
from pipeline.io.images import load_image
from pipeline.models import load_adapter
from pipeline.student.rpn import RPN


@dataclass
class Answer:
    """What two-stage inference produced for one question."""

    text: str
    crop_boxes: list[list[int]]  # source pixels [x0, y0, x1, y1], far edge exclusive; [] = answered from the view
    grid_boxes: list[list[int]]  # the RoI components on the visual grid, inclusive [y0, x0, y1, x1]
    prob_map: np.ndarray  # the RPN's sigmoid map on the visual grid (grid_h, grid_w)
    mask: np.ndarray  # the binarised, filtered RoI mask on the grid


class SDRPN:
    """A base model with its RPN; :meth:`answer` runs stage 1 (RoI map) and stage 2 (answer with crops)."""

    def __init__(self, rpn: RPN, roi: RoIParams | None = None, settings: InferenceSettings | None = None):
        self.rpn = rpn.eval()
        self.adapter = rpn.adapter
        self.settings = settings or InferenceSettings()
        self.roi = roi or self.settings.roi

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        rpn_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        roi: RoIParams | None = None,
        **adapter_kwargs,
    ) -> SDRPN:
        """Load a local checkpoint directory and an RPN checkpoint made for it (refused otherwise).

        The RoI settings, crop size and answer length default to those the checkpoint records (a release);
        ``roi`` and ``crop_size=`` override them. A checkpoint that records none gets the library defaults.
        """
        settings = InferenceSettings.of_checkpoint(rpn_dir) or InferenceSettings()
        if settings.crop_size is not None:
            adapter_kwargs.setdefault("crop_size", settings.crop_size)
        adapter = load_adapter(model_dir, device, dtype, **adapter_kwargs)
        return cls(RPN.load(adapter, rpn_dir), roi, settings)

    def answer_batch(
        self, images: list[Image.Image | str], questions: list[str], max_new_tokens: int | None = None
    ) -> list[Answer]:
        """Answer several questions (batched); images may be PIL images, paths or fsspec URLs."""
        pil = [load_image(im) if isinstance(im, str | Path) else im.convert("RGB") for im in images]
        new = max_new_tokens or self.settings.max_new_tokens
        stage1 = rpn_maps(self.rpn, reuse_prefix=self.settings.reuse_prefix)(pil, questions)
        rows, rois = two_stage_batch(self.adapter, pil, questions, stage1, self.roi, new)
        return [
            Answer(r["response"], r["crop_boxes"], r["grid_boxes"], m, roi.mask)
            for r, m, roi in zip(rows, stage1.maps, rois, strict=True)
        ]

    def answer(self, image: Image.Image | str, question: str, max_new_tokens: int | None = None) -> Answer:
        """Answer one question about one image."""
        return self.answer_batch([image], [question], max_new_tokens)[0]
