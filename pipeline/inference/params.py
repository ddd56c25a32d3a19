"""Parameters of two-stage evaluation (params.yaml ``evaluate``); no torch needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pipeline.inference.roi import RoIParams, UpscaleMode


@dataclass
class EvalParams:
    """What the evaluate stage runs (SPEC 3) and how it scores."""

    batch_size: int = 16
    max_new_tokens: int = 16
    scoring: Literal["auto", "exact", "vqa_soft", "multiple_choice"] = "auto"  # auto: vqa_soft when `answers` given
    modes: list[UpscaleMode] = field(default_factory=lambda: ["masked", "box"])  # upscaling modes for the main RPN
    roi: dict[str, Any] = field(default_factory=dict)  # RoIParams overrides (tau, smoothing, filters)
    raw_attention: bool = True  # ablation: RoI from the teacher's answer->image attention, no RPN
    raw_attention_layers: list[int] = field(default_factory=lambda: [14])  # the pipeline derives it: dump.layers
    raw_attention_tau: float = 0.3  # on the map divided by its max
    raw_attention_last_prompt: bool = False  # the pipeline derives it: dump.include_last_prompt
    reuse_prefix: bool = True  # stage 2 starts from stage 1's cache of the shared prefix (same answers, faster)
    crop_size: int | None = None  # LLaVA: crops re-encoded at this square side (px) instead of the base view;
    # the adapter is built with it (``load_adapter(..., crop_size=...)``), evaluate_manifest checks it was

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if not self.modes:
            raise ValueError("modes: name at least one upscaling mode (masked, box)")
        if "mode" in self.roi:
            raise ValueError("roi.mode is set per method by evaluate (modes); remove it from roi")
        try:
            RoIParams(**self.roi)
        except TypeError as exc:
            known = [f.name for f in fields(RoIParams) if f.name != "mode"]
            raise ValueError(f"roi: {exc}; known keys: {known}") from None
        if not 0 <= self.raw_attention_tau <= 1:
            raise ValueError(f"raw_attention_tau must lie in [0, 1], got {self.raw_attention_tau}")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive side in pixels, got {self.crop_size}")
