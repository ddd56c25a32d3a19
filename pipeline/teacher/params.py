"""Parameters of the teacher's model stages (params.yaml ``decode`` and ``dump``); no torch needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeParams:
    """Greedy decoding settings (SPEC 1.1); the reference uses max_new_tokens=128."""

    batch_size: int = 16
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")


@dataclass
class DumpParams:
    """Which layers to capture and how (SPEC 1.2).

    The attention is the equal-weight mean over the response rows of
    :func:`~pipeline.teacher.attention_capture.response_row_mask`. By default (the reference's rows) they are
    the response tokens fed back during generation: every generated token except the last one, whether that
    one is an EOS or the token that reached ``max_new_tokens``. ``include_eos`` also takes that last token
    (every generated token; not the reference); ``include_last_prompt`` also takes the last prompt token.
    """

    layers: list[int] = field(default_factory=lambda: [14])  # LLaVA-1.5-7B's label layer
    per_head: bool = False
    include_eos: bool = False  # also the last generated token (EOS or cut by max_new_tokens); reference: false
    include_last_prompt: bool = False  # also the row that produced the first answer token (not the paper's)
    batch_size: int = 16
    chunk_samples: int = 256

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct decoder layer indices >= 0, got {self.layers}")
        if self.batch_size < 1 or self.chunk_samples < 1:
            raise ValueError("batch_size and chunk_samples must be >= 1")
