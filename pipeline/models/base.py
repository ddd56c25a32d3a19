"""The adapter interface: what the pipeline needs to know about a multimodal LLM, and nothing more.

Every stage talks to a model through a :class:`ModelAdapter`: render the chat prompt, build
left-padded batched inputs (optionally with response tokens appended), locate the visual tokens
and their grid, reach decoder layer ``i``, and build the stage-2 inputs of two-stage inference
(:meth:`ModelAdapter.stage2_inputs`). Adding a model family means one subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.models.geometry import Crop, ViewSpec


@dataclass
class Batch:
    """Model inputs for a left-padded batch plus where things sit in each row.

    ``visual_index`` (B, V) holds the sequence positions of each sample's first-image visual tokens
    in grid row-major order, padded with 0 where ``visual_valid`` is False (per-sample grids).
    ``response_len`` (B,) counts response tokens appended at the end of each row (0 for prompts).
    """

    inputs: dict[str, torch.Tensor]
    visual_index: torch.Tensor
    visual_valid: torch.Tensor
    grids: list[tuple[int, int]]
    response_len: torch.Tensor
    prompt_len: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        self.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        self.visual_index = self.visual_index.to(device)
        self.visual_valid = self.visual_valid.to(device)
        self.response_len = self.response_len.to(device)
        self.prompt_len = self.prompt_len.to(device)
        return self


@dataclass
class Stage2Inputs:
    """A left-padded stage-2 batch (SPEC 3.5): ids with image placeholders, embeddings with the visual features in.

    ``position_ids`` is None where generate() derives the model's positions from the padding mask (LLaVA's 1-D
    positions); families with their own position scheme (Qwen2.5-VL's 3-D M-RoPE) give them explicitly, and
    generate() then continues each row from its last position. ``mm_token_type_ids`` (1 on image tokens) and
    ``image_grid_thw`` (every image of the batch, in sequence order) describe the sequence for families that
    have them; with explicit positions the model itself needs neither.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[str]
    crops: list[list[Crop]]  # the crops actually used (those keeping at least one token)
    n_crop_tokens: list[int]
    position_ids: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` and ``model.generate(...)``."""
        out = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


class ModelAdapter(ABC):
    """Uniform access to one model family (LLaVA, Qwen2.5-VL, ...)."""

    family: str = ""

    def __init__(self, model: nn.Module, processor, model_id: str):
        self.model = model
        self.processor = processor
        self.model_id = model_id

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, list | tuple) else [int(eos)]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids[0])

    @abstractmethod
    def render_prompt(self, question: str, n_images: int = 1) -> str:
        """The chat-template prompt for one user question with ``n_images`` images, ready to answer."""

    #: Whether :meth:`build_batch` tokenises prompts with the tokenizer's special tokens (LLaVA's processor adds
    #: them, e.g. the BOS of llava-hf checkpoints; Qwen2.5-VL's chat template already holds its own).
    prompt_special_tokens: bool = True

    @property
    def context_length(self) -> int | None:
        """Positions the language model is built for: ``max_position_embeddings`` of its text config (LLaVA and
        Qwen2.5-VL: ``text_config``); None when the config names none. Past it a model answers nonsense."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text, "max_position_embeddings", None)
        return int(n) if n else None

    def prompt_lengths(self, questions: Sequence[str], sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Tokens of each question's prompt with its (width, height) image expanded, as :meth:`build_batch` makes
        it, from the tokenizer and :meth:`visual_grid` alone (no image is read, no weights are needed).

        Each image placeholder token of the rendered prompt becomes the image's ``grid_h * grid_w`` visual tokens.
        Qwen2.5-VL's M-RoPE gives an image fewer positions than tokens, so this is an upper bound of its positions.
        """
        prompts = [self.render_prompt(q) for q in questions]
        ids = self.tokenizer(prompts, add_special_tokens=self.prompt_special_tokens)["input_ids"]
        image_id = int(self.model.config.image_token_id)
        out = []
        for row, (width, height) in zip(ids, sizes, strict=True):
            gh, gw = self.visual_grid(int(width), int(height))
            out.append(len(row) + row.count(image_id) * (gh * gw - 1))
        return out

    @abstractmethod
    def visual_grid(self, width: int, height: int) -> tuple[int, int]:
        """(grid_h, grid_w) of the visual tokens this model makes for a ``width`` x ``height`` image."""

    def crop_grid(self, width: int, height: int) -> tuple[int, int]:
        """(grid_h, grid_w) a ``width`` x ``height`` stage-2 crop is encoded on: by default, that of an image."""
        return self.visual_grid(width, height)

    @property
    def crop_view(self) -> ViewSpec:
        """How a stage-2 crop (cut from the source image) is mapped onto its grid: by default stretched."""
        return ViewSpec(pad_to_square=False)

    def padding_tokens(self, width: int, height: int) -> np.ndarray | None:
        """(grid_h * grid_w,) bool: the visual tokens of a ``width`` x ``height`` image that lie over the padding
        of a padded square view (the reference code's ``get_foreground_mask`` rule), or None when the view has
        no padding (the labels' known background, ``assign_labels(known_bg=...)``)."""
        return None

    @abstractmethod
    def source_box(self, grid_box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
        """Source pixels (x0, y0, x1, y1; far edge exclusive) under an inclusive grid box (y0, x0, y1, x1).

        Undoes the processor's pad / resize / crop exactly and clips to the image (padding excluded).
        """

    @abstractmethod
    def grid_box(
        self, source_box: tuple[float, float, float, float], width: int, height: int
    ) -> tuple[int, int, int, int] | None:
        """Inclusive grid box (y0, x0, y1, x1) of the tokens a source box (x0, y0, x1, y1) overlaps; None if none."""

    @abstractmethod
    def grid_span(
        self, source_box: tuple[float, float, float, float], width: int, height: int
    ) -> tuple[float, float, float, float]:
        """A source box in continuous grid coordinates (y0, x0, y1, x1; token i spans [i, i + 1))."""

    @abstractmethod
    def build_batch(
        self,
        images: list[Image.Image],
        prompts: list[str],
        responses: list[list[int]] | None = None,
    ) -> Batch:
        """Tokenise and left-pad a batch; append ``responses`` token ids after each prompt if given."""

    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, index ``i`` = layer ``i``."""

    @abstractmethod
    def rotate(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Apply the model's rotary position embedding to (B, H, S, D) queries or keys.

        ``position_embeddings`` is the (cos, sin) pair the decoder passes its attention modules,
        already sliced to the S positions of ``x``.
        """

    def stage2_inputs(
        self,
        images: list[Image.Image],
        questions: list[str],
        crops: Sequence[Sequence[Crop]],
        encode_originals: bool = True,
        original_features: Sequence[torch.Tensor] | None = None,
    ) -> Stage2Inputs:
        """Stage-2 inputs: each image's original view, then its crops' kept tokens, then the question.

        ``crops`` holds, per sample, crops that keep at least one token, with keep-masks (if any) on the crop's
        grid ``crop_grid(box width, box height)``. A sample without crops gets exactly its baseline prompt.
        ``encode_originals=False`` leaves the original views' embeddings as zeros (for callers that take the
        prefix from a cache, :mod:`pipeline.inference.prefix_cache`). ``original_features`` are the original views'
        visual tokens as stage 1 computed them (:meth:`capture_image_features`), used instead of encoding them again.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement two-stage inference")

    #: Whether stage 2 may start from stage 1's cache of the shared prefix (:mod:`pipeline.inference.prefix_cache`):
    #: needs positions that count real tokens from each row's first one (1-D rotary from the padding mask).
    supports_prefix_reuse: bool = False

    #: Whether stage 2 may take the original views' visual tokens from stage 1 (:meth:`capture_image_features`)
    #: instead of running the vision tower over them again (for families without prefix reuse).
    supports_feature_reuse: bool = False

    def capture_image_features(self) -> AbstractContextManager[list[torch.Tensor]]:
        """Within the context, every image the model's forward encodes appends its visual tokens (T, D), in order."""
        raise NotImplementedError(f"{type(self).__name__} does not hand its visual tokens to stage 2")

    def prefix_end(self, batch: Batch) -> torch.Tensor:
        """(B,) first column after the first image's tokens in each row of ``batch``: the prompt prefix that
        stage 1 and stage 2 share."""
        raise NotImplementedError(f"{type(self).__name__} does not share a prefix between the stages")

    def embed_with_visual(
        self, rows: list[list[int]], features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad ``rows`` and embed them with ``features`` (T_k, D), in order, in the image placeholders.

        Returns (ids, attention mask, inputs_embeds) on the model's device. Features fill the placeholders
        row-major over (batch, sequence), exactly as the models' own forward scatters image features.
        """
        ids, mask = left_pad(rows, self.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == int(self.model.config.image_token_id)) & mask.bool()
        visual = torch.cat(features).to(embeds.device, embeds.dtype)
        if int(slots.sum()) != visual.shape[0]:
            raise RuntimeError(f"{int(slots.sum())} image placeholders for {visual.shape[0]} visual tokens")
        return ids, mask, embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), visual)

    def forward_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` that reproduce generate()'s positions for this batch."""
        inputs = dict(batch.inputs)
        mask = inputs["attention_mask"]
        # generate() derives positions from the padding mask; a plain forward would not.
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    @property
    def attention_geometry(self) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) of the decoder's self-attention."""
        attn = self.decoder_layers[0].self_attn
        cfg = attn.config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        return n_heads, n_kv, attn.head_dim


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (ids, attention_mask) tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask
