"""Parameters of RPN training (params.yaml ``train``); no torch needed to read them."""

from __future__ import annotations

from dataclasses import dataclass


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
    log_every: int = 10  # steps between log lines (every step is recorded)
    objective: str = "bce"  # bce on tri-state labels (SD-RPN); mse on soft_target (ablation: no label assignment)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.global_batch < 1 or self.micro_batch < 1 or self.epochs < 1 or self.save_every < 1:
            raise ValueError("global_batch, micro_batch, epochs and save_every must be >= 1")
        if not 0 <= self.holdout_frac < 1 or not 0 <= self.warmup_frac < 1:
            raise ValueError("holdout_frac and warmup_frac must lie in [0, 1)")
        if self.objective not in ("bce", "mse"):
            raise ValueError(f"objective must be 'bce' or 'mse', got {self.objective!r}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"bf16 must be true, false or 'auto', got {self.bf16!r}")
