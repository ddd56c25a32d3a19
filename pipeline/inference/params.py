"""Parameters of two-stage evaluation (params.yaml ``evaluate``) and the settings a released RPN carries; no torch."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pipeline.config import FieldError, check_indices, check_min, check_range, parse_nested
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
        check_min("batch_size", self.batch_size)
        check_min("max_new_tokens", self.max_new_tokens)
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise FieldError("modes", f"name each upscaling mode (masked, box) once (got {self.modes!r})")
        if "mode" in self.roi:
            raise FieldError("roi.mode", "is set per method by evaluate (modes); remove it")
        known = [f.name for f in fields(RoIParams) if f.name != "mode"]
        unknown = sorted(set(self.roi) - set(known))
        if unknown:
            raise FieldError("roi", f"unknown key(s) {unknown}; known: {known}")
        roi = parse_nested(RoIParams, self.roi, "roi")  # values typed and range-checked, named roi.<key>
        self.roi = {k: getattr(roi, k) for k in self.roi}  # the converted values (YAML "0.2" -> 0.2)
        # derived from dump.layers / label in the pipeline: a duplicate would weigh one layer twice
        check_indices("raw_attention_layers", self.raw_attention_layers, what="decoder layer indices")
        check_range("raw_attention_tau", self.raw_attention_tau, 0, 1)
        check_min("crop_size", self.crop_size, optional=True)  # a multiple of the patch: checked by the adapter

    def roi_params(self, mode: UpscaleMode, **overrides: Any) -> RoIParams:
        """The RoI settings of one method: the ``roi`` overrides, its upscaling ``mode`` and any ``overrides``."""
        return RoIParams(**{**self.roi, "mode": mode, **overrides})


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
        return cls(params.roi_params(params.modes[0]), params.max_new_tokens, params.crop_size, params.reuse_prefix)

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
