"""Parameters of the teacher's model stages (params.yaml ``decode`` and ``dump``); no torch needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import check_indices, check_min


@dataclass
class DecodeParams:
    """Greedy decoding settings (SPEC 1.1); the reference uses max_new_tokens=128."""

    batch_size: int = 16
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        check_min("batch_size", self.batch_size)
        check_min("max_new_tokens", self.max_new_tokens)


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
        # a repeated layer would get one store slot written twice and one left all zero
        check_indices("layers", self.layers, what="decoder layer indices")
        check_min("batch_size", self.batch_size)
        check_min("chunk_samples", self.chunk_samples)
