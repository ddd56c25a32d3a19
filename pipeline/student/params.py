"""Parameters of RPN training (params.yaml ``train``) and the per-model presets; no torch needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pipeline.config import (
    FieldError,
    ParamsError,
    check_choice,
    check_min,
    check_positive,
    check_range,
    parse_section,
    require_keys,
)


@dataclass
class TrainParams:
    """RPN training settings (SPEC 2; reference: LLaVA lr 5e-5, global batch 512; Qwen lr 1e-4, 128, clip 1)."""

    B: int = 15  # frozen decoder layers (LLaVA-1.5-7B/13B 15, Qwen2.5-VL-3B 21, -7B 16)
    R: int = 3  # RPN layers copied from B..B+R-1
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_frac: float = 0.03  # linear warmup over this share of the steps, then cosine to 0
    epochs: int = 1
    global_batch: int = 512  # samples per optimizer step, summed over ranks
    micro_batch: int = 16  # samples per forward on one rank
    grad_clip: float | None = None  # max global grad norm (Qwen reference: 1.0)
    bf16: bool | str = "auto"  # autocast to bfloat16; auto = on GPUs that support it
    holdout_frac: float = 0.02  # kept samples held out for the final loss / fg-bg accuracy
    seed: int = 42
    save_every: int = 50  # steps between resumable training states
    log_every: int = 10  # steps between log lines, 0 for none (every step is recorded)
    objective: str = "bce"  # bce on tri-state labels (SD-RPN); mse on soft_target (ablation: no label assignment)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", f"must be two numbers in [0, 1) (got {list(self.betas)})")
        check_min("B", self.B, 0)  # whether B + R fits the model is checked against its config by the stage
        check_min("R", self.R)
        check_positive("lr", self.lr)
        check_min("weight_decay", self.weight_decay, 0)
        check_range("warmup_frac", self.warmup_frac, 0, 1, high_open=True)
        check_min("epochs", self.epochs)
        check_min("global_batch", self.global_batch)
        check_min("micro_batch", self.micro_batch)
        check_positive("grad_clip", self.grad_clip, optional=True)
        if self.bf16 not in (True, False, "auto"):
            raise FieldError("bf16", f"must be true, false or 'auto' (got {self.bf16!r})")
        check_range("holdout_frac", self.holdout_frac, 0, 1, high_open=True)
        check_min("seed", self.seed, 0)  # numpy's seeded generators refuse negative seeds
        check_min("save_every", self.save_every)
        check_min("log_every", self.log_every, 0)  # 0: no log lines
        check_choice("objective", self.objective, ("bce", "mse"))


# The reference code's training settings per model (SPEC 2 and 4): the RPN's B / R, learning rate, global batch and
# clipping. DeepSeek-VL-1.3B: B=9, R=3 from the authors' evaluation scripts ("deepseekvl-1.3b-roi-K9T3"); its
# optimiser settings are not published, so the preset sets B and R only (the rest: params.yaml's values).
_LLAVA = {"B": 15, "R": 3, "lr": 5e-5, "global_batch": 512}
_QWEN = {"R": 3, "lr": 1e-4, "global_batch": 128, "grad_clip": 1.0}
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "llava_1_5_7b": _LLAVA,
    "llava_1_5_13b": _LLAVA,
    "qwen2_5_vl_3b": {**_QWEN, "B": 21},
    "qwen2_5_vl_7b": {**_QWEN, "B": 16},
    "deepseek_vl_1_3b": {"B": 9, "R": 3},
}

TRAIN_KEYS = ("preset", *(f.name for f in fields(TrainParams)))


def resolve_train_params(section: dict[str, Any] | None, complete: bool = False) -> TrainParams:
    """TrainParams from a params.yaml ``train`` section: the named ``preset`` (default ``none``) plus overrides.

    As for the label presets, explicit keys override the preset and ``null`` keeps its value; with ``complete``
    (the stage) every key must be listed. Errors name ``train.<key>``.
    """
    section = dict(section or {})
    if complete:
        require_keys(section, TRAIN_KEYS, "train")
    name = section.pop("preset", None) or "none"
    if name not in TRAIN_PRESETS:
        raise ParamsError(f"train.preset: unknown preset {name!r}; known: {sorted(TRAIN_PRESETS)}")
    overrides = {k: v for k, v in section.items() if v is not None}
    return parse_section(TrainParams, {**TRAIN_PRESETS[name], **overrides}, "train")
