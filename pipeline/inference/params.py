"""Parameters of two-stage evaluation (params.yaml ``evaluate``) and the settings a released RPN carries; no torch."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pipeline.inference.roi import RoIParams, UpscaleMode
from pipeline.student.checkpoint import CONFIG_NAME, read_config


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


@dataclass
class InferenceSettings:
    """How two-stage inference runs a trained RPN: what a release checkpoint records (``inference`` in its
    ``rpn_config.json``) so the API and inspect answer as the evaluate stage did."""

    roi: RoIParams = field(default_factory=RoIParams)  # post-processing and the upscaling mode
    max_new_tokens: int = 64
    crop_size: int | None = None  # LLaVA: the side crops are re-encoded at (None: the base view)
    reuse_prefix: bool = True

    @classmethod
    def from_eval(cls, params: EvalParams) -> InferenceSettings:
        """The settings of evaluate's main method: its RoI overrides and its first upscaling mode."""
        roi = RoIParams(**{**params.roi, "mode": params.modes[0]})
        return cls(roi, params.max_new_tokens, params.crop_size, params.reuse_prefix)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> InferenceSettings:
        """Parse a recorded ``inference`` block; an unknown or malformed key is an error naming ``where``."""
        try:
            return cls(**{**values, "roi": RoIParams(**values.get("roi", {}))})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: inference settings: {exc}") from None

    @classmethod
    def of_checkpoint(cls, rpn_dir: str | os.PathLike) -> InferenceSettings | None:
        """The settings a release checkpoint records; None for a checkpoint that records none (``train``'s)."""
        recorded = read_config(rpn_dir).get("inference")
        return None if recorded is None else cls.from_dict(recorded, f"{rpn_dir}/{CONFIG_NAME}")
