"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): local Qwen2.5-VL-3B/7B checkpoints and the toy models.

Inputs are built without torchvision: ``Qwen2VLImageProcessorPil`` turns images into patches and
``image_grid_thw``, the tokenizer renders the chat prompt, and each ``<|image_pad|>`` is expanded here
to ``t*h*w / merge^2`` tokens. ``mm_token_type_ids`` (1 on image tokens) goes with every forward and
with generate(): transformers 5 only computes the 3-D M-RoPE positions when it is present and
otherwise silently falls back to plain 1-D positions.

Two grid modes (``resolution``): ``{"mode": "fixed", "size": 672}`` resizes every image to
size x size (24x24 merged tokens); with ``"pad": true`` the image is first centred on a grey (127, 127, 127)
square, as the reference code's ``expand2square`` does (the paper's view: labels, training and the label
scripts); ``{"mode": "native", "min_pixels": .., "max_pixels": ..}`` keeps the aspect ratio within a pixel
budget, so each sample has its own grid.

Two-stage inference (:meth:`Qwen25VLAdapter.stage2_inputs`) puts each crop after the original view as a
further image at the same resolution, with the M-RoPE positions the model gives a second image (masked
upscaling keeps the kept tokens' positions from the full crop grid). Stage 1's forward hands its visual tokens of
the original views to stage 2 (:meth:`Qwen25VLAdapter.capture_image_features`), so only the crops are encoded again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from pipeline.config import FieldError, Resolution
from pipeline.models.base import Batch, ModelAdapter, Stage2Inputs, left_pad
from pipeline.models.geometry import (
    Crop,
    ViewSpec,
    expand_to_square,
    grid_box_to_source,
    padding_token_mask,
    source_box_to_grid,
    source_box_to_span,
)


class QwenVLProcessor:
    """Tokenizer + PIL image processor + chat template: what ``Qwen2_5_VLProcessor`` holds, minus torchvision."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("Qwen2.5-VL processor: no chat template (tokenizer or chat_template.json/.jinja)")

    def apply_chat_template(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QwenVLProcessor:
        """Load from a local checkpoint directory (AutoTokenizer + ``Qwen2VLImageProcessorPil``)."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tokenizer.padding_side = "left"
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        template = getattr(tokenizer, "chat_template", None)
        # Released checkpoints also ship the processor-level template beside the tokenizer's.
        if not template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if not template and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        return cls(tokenizer, image_processor, template)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


class Qwen25VLAdapter(ModelAdapter):
    """Adapter for Qwen2.5-VL: merged-token grids per image (fixed or native resolution) and M-RoPE positions."""

    family = "qwen2_5_vl"
    prompt_special_tokens = False  # build_batch tokenises without them: the chat template has its own

    def __init__(
        self,
        model: nn.Module,
        processor: QwenVLProcessor,
        model_id: str,
        resolution: Resolution | dict[str, Any] | None = None,
    ):
        super().__init__(model, processor, model_id)
        self.resolution = Resolution.parse(resolution)
        if self.resolution.mode == "fixed" and self.resolution.size % self.factor:
            raise FieldError(
                "resolution.size", f"must be a multiple of {self.factor} (patch x merge) (got {self.resolution.size})"
            )

    @classmethod
    def load_processor(cls, path: str | Path) -> QwenVLProcessor:
        """``Qwen2_5_VLProcessor`` needs torchvision; build the torchvision-free equivalent."""
        return QwenVLProcessor.from_pretrained(path)

    # --- geometry -------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def factor(self) -> int:
        """Pixels per merged token along each side (patch 14 x merge 2 = 28)."""
        return int(self.model.config.vision_config.patch_size) * self.merge

    def pixel_budget(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of native mode: the resolution option, else the image processor's."""
        size = self.processor.image_processor.size
        lo = self.resolution.min_pixels or size["shortest_edge"]
        hi = self.resolution.max_pixels or size["longest_edge"]
        return int(lo), int(hi)

    def visual_grid(self, width: int, height: int) -> tuple[int, int]:
        if self.resolution.mode == "fixed":
            side = self.resolution.size // self.factor
            return side, side
        lo, hi = self.pixel_budget()
        h, w = smart_resize(height, width, factor=self.factor, min_pixels=lo, max_pixels=hi)
        return h // self.factor, w // self.factor

    #: The grey the reference code pads to a square with (``expand2square(image, (127, 127, 127))``).
    PAD_FILL = (127, 127, 127)

    @property
    def view_spec(self) -> ViewSpec:
        """Native and plain fixed stretch the whole image onto the grid; ``pad`` pads it to a square first."""
        return ViewSpec(pad_to_square=self.resolution.pad)

    @property
    def crop_view(self) -> ViewSpec:
        """Crops are encoded like images: padded to a square too when the view pads."""
        return self.view_spec

    def source_box(self, grid_box, width, height):
        return grid_box_to_source(grid_box, self.visual_grid(width, height), width, height, self.view_spec)

    def grid_box(self, source_box, width, height):
        return source_box_to_grid(source_box, self.visual_grid(width, height), width, height, self.view_spec)

    def grid_span(self, source_box, width, height):
        return source_box_to_span(source_box, self.visual_grid(width, height), width, height, self.view_spec)

    def padding_tokens(self, width: int, height: int) -> np.ndarray | None:
        if not self.resolution.pad:
            return None
        return padding_token_mask(width, height, self.visual_grid(width, height))

    def view_image(self, image: Image.Image) -> Image.Image:
        """The RGB image the processor patches (before its resize): padded to a grey square when the view pads."""
        image = image.convert("RGB")
        return expand_to_square(image, self.PAD_FILL) if self.resolution.pad else image

    def render_prompt(self, question: str, n_images: int = 1) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """pixel_values (sum of patches, patch_dim) and image_grid_thw (n, 3) in patch units, per the resolution."""
        ip = self.processor.image_processor
        if self.resolution.mode == "fixed":
            side = self.resolution.size
            resized = [self.view_image(im).resize((side, side), Image.Resampling.BICUBIC) for im in images]
            # Already a multiple of the patch factor: the processor must not apply its own pixel budget on top.
            out = ip(resized, do_resize=False, return_tensors="pt")
        else:
            lo, hi = self.pixel_budget()
            out = ip(images, size={"shortest_edge": lo, "longest_edge": hi}, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"].long()}

    # --- batches --------------------------------------------------------------------------------------
    def build_batch(
        self,
        images: list[Image.Image],
        prompts: list[str],
        responses: list[list[int]] | None = None,
    ) -> Batch:
        """Tokenise, expand each ``<|image_pad|>`` and left-pad; ``images`` fill the placeholders in order."""
        tok = self.tokenizer
        pad_id = self.image_token_id
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n_placeholders = [row.count(pad_id) for row in prompt_ids]
        if sum(n_placeholders) != len(images):
            raise ValueError(f"{len(images)} images for {sum(n_placeholders)} <|image_pad|> placeholders")
        enc = self.encode_images(images) if images else {}
        thw = enc["image_grid_thw"].tolist() if images else []
        merged = [(h // self.merge, w // self.merge) for _, h, w in thw]
        tokens_per_image = [t * h * w for (t, _, _), (h, w) in zip(thw, merged, strict=True)]

        responses = responses if responses is not None else [[] for _ in prompts]
        rows, types, first_span, grids = [], [], [], []
        k = 0
        for i, (ids, resp) in enumerate(zip(prompt_ids, responses, strict=True)):
            bad = {self.image_token_id, int(self.model.config.video_token_id)} & set(resp)
            if bad:
                raise ValueError(f"batch row {i}: response contains vision placeholder token(s) {sorted(bad)}")
            row: list[int] = []
            typ: list[int] = []
            span = None
            for t in ids:
                if t != pad_id:
                    row.append(t)
                    typ.append(0)
                    continue
                if span is None:
                    span = (len(row), tokens_per_image[k])
                    grids.append(merged[k])
                row.extend([pad_id] * tokens_per_image[k])
                typ.extend([1] * tokens_per_image[k])
                k += 1
            if span is None:
                raise ValueError(f"batch row {i}: prompt has no <|image_pad|> placeholder")
            rows.append(row + list(resp))
            types.append(typ + [0] * len(resp))
            first_span.append(span)

        ids, mask = left_pad(rows, self.pad_token_id)
        mm_types, _ = left_pad(types, 0)
        width = ids.shape[1]
        n_vis = max(n for _, n in first_span)
        visual_index = torch.zeros((len(rows), n_vis), dtype=torch.long)
        visual_valid = torch.zeros((len(rows), n_vis), dtype=torch.bool)
        for i, (start, n) in enumerate(first_span):
            offset = width - len(rows[i])  # left padding shifts every position of the row
            visual_index[i, :n] = torch.arange(offset + start, offset + start + n)
            visual_valid[i, :n] = True
        inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_types, **enc}
        return Batch(
            inputs=inputs,
            visual_index=visual_index,
            visual_valid=visual_valid,
            grids=grids,
            response_len=torch.tensor([len(r) for r in responses], dtype=torch.long),
            prompt_len=torch.tensor([len(r) - len(s) for r, s in zip(rows, responses, strict=True)], dtype=torch.long),
        )

    # --- two-stage inference ------------------------------------------------------------------------
    supports_feature_reuse = True

    @contextmanager
    def capture_image_features(self) -> Iterator[list[torch.Tensor]]:
        """Collect the merged visual tokens of every image the vision tower encodes inside the context."""
        got: list[torch.Tensor] = []

        def hook(module, args, kwargs, output):
            thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            got.extend(torch.split(output.pooler_output, (thw.prod(-1) // self.merge**2).tolist()))

        handle = self.model.model.visual.register_forward_hook(hook, with_kwargs=True)
        try:
            yield got
        finally:
            handle.remove()

    @torch.no_grad()
    def stage2_inputs(
        self,
        images: list[Image.Image],
        questions: list[str],
        crops: Sequence[Sequence[Crop]],
        encode_originals: bool = True,
        original_features: Sequence[torch.Tensor] | None = None,
    ) -> Stage2Inputs:
        """Each original view, then its crops as further images (kept tokens only), then the question.

        A crop is cut from the source image (source pixels, clipped to the image) and encoded exactly like an
        image of its own: the same image processor at the configured resolution (fixed: resized to the fixed
        size, after the same grey pad to a square when the view pads; native: its own size within the pixel
        budget) and the same vision tower, in one forward with the original views. The chat template
        puts it between its own ``<|vision_start|>`` / ``<|vision_end|>``; its ``<|image_pad|>`` run is as long
        as the tokens it keeps.

        Positions (3-D M-RoPE): the model's own ``get_rope_index`` is run on the sequence with every crop token
        present (so a crop gets exactly the positions of a second image, and the text after it continues from
        the crop's start + max(grid_h, grid_w)); masked upscaling then drops the positions of the dropped tokens
        with the tokens. Kept tokens keep the grid row / column they have in the crop, nothing after them moves,
        and with every token kept this is the model's own computation for the same prompt with two images.
        ``image_grid_thw`` and ``mm_token_type_ids`` describe every image of the batch (informative: the model
        gets the positions themselves, and generate() continues each row from its last position, which is what
        the model's rope deltas would give).

        With ``original_features`` (stage 1's visual tokens of the same images) only the crops go through the
        vision tower.
        """
        if not encode_originals:
            raise ValueError("Qwen2.5-VL has no prefix reuse: pass original_features to skip the original views")
        used = [list(cs) for cs in crops]
        n = len(images)
        cuts = [im.crop(c.box) for im, cs in zip(images, used, strict=True) for c in cs]
        if original_features is None:
            encs = [self.encode_images(images)] + ([self.encode_images(cuts)] if cuts else [])
            thw = torch.cat([e["image_grid_thw"] for e in encs])
            feats = self._features(torch.cat([e["pixel_values"] for e in encs]), thw)
        else:
            if len(original_features) != n:
                raise ValueError(f"{len(original_features)} original feature sets for {n} images")
            grids = [self.visual_grid(im.width, im.height) for im in images]
            for i, (f, (h, w)) in enumerate(zip(original_features, grids, strict=True)):
                if f.shape[0] != h * w:
                    raise ValueError(f"image {i}: {f.shape[0]} stage-1 visual tokens for a {h}x{w} grid")
            thw = torch.tensor([[1, h * self.merge, w * self.merge] for h, w in grids], dtype=torch.long)
            feats = list(original_features)
            if cuts:
                enc = self.encode_images(cuts)
                thw = torch.cat([thw, enc["image_grid_thw"]])
                feats += self._features(enc["pixel_values"], enc["image_grid_thw"])
        crop_thw, crop_feats = iter(thw[n:].tolist()), iter(feats[n:])

        tok = self.tokenizer
        rows, types, positions, seq_feats, prompts, n_crop_tokens, sample_thw = [], [], [], [], [], [], []
        for i, (q, cs) in enumerate(zip(questions, used, strict=True)):
            prompt = self.render_prompt(q, n_images=1 + len(cs))
            row_thw = [thw[i].tolist()] + [next(crop_thw) for _ in cs]  # (t, h, w) in patches, per image
            keeps: list[np.ndarray | None] = [None]
            seq_feats.append(feats[i])
            n_crop = 0
            for c, (_, h, w) in zip(cs, row_thw[1:], strict=True):
                grid = (h // self.merge, w // self.merge)
                if grid != tuple(self.visual_grid(c.box[2] - c.box[0], c.box[3] - c.box[1])):
                    raise RuntimeError(f"crop {c.box} encoded on a {grid} grid, visual_grid says otherwise")
                if c.keep is not None and tuple(c.keep.shape) != grid:
                    raise ValueError(f"crop keep-mask has shape {c.keep.shape}, the crop grid is {grid}")
                f = next(crop_feats)
                keep = None if c.keep is None else np.asarray(c.keep, dtype=bool).reshape(-1)
                keeps.append(keep)
                seq_feats.append(f if keep is None else f[torch.from_numpy(keep).to(f.device)])
                n_crop += c.n_tokens(grid)
            ids, typ, kept = self._expand_full(tok(prompt, add_special_tokens=False)["input_ids"], row_thw, keeps)
            full_pos, _ = self.model.model.get_rope_index(
                torch.tensor([ids]), mm_token_type_ids=torch.tensor([typ]), image_grid_thw=torch.tensor(row_thw)
            )
            sel = torch.tensor(kept)
            rows.append(torch.tensor(ids)[sel].tolist())
            types.append(torch.tensor(typ)[sel].tolist())
            positions.append(full_pos[:, 0, sel])
            prompts.append(prompt)
            n_crop_tokens.append(n_crop)
            sample_thw.extend(row_thw)

        ids, mask, embeds = self.embed_with_visual(rows, seq_feats)
        mm_types, _ = left_pad(types, 0)
        pos = torch.zeros((3, *ids.shape), dtype=torch.long)
        for i, p in enumerate(positions):
            pos[:, i, ids.shape[1] - p.shape[1] :] = p  # left padding gets 0, as get_rope_index gives it
        return Stage2Inputs(
            input_ids=ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            prompts=prompts,
            crops=used,
            n_crop_tokens=n_crop_tokens,
            position_ids=pos.to(ids.device),
            mm_token_type_ids=mm_types.to(ids.device),
            image_grid_thw=torch.tensor(sample_thw, dtype=torch.long),
        )

    def _features(self, pixel_values: torch.Tensor, thw: torch.Tensor) -> list[torch.Tensor]:
        """(t*h*w / merge^2, D) visual tokens per image, row-major over its merged grid."""
        out = self.model.get_image_features(
            pixel_values=pixel_values.to(self.device), image_grid_thw=thw.to(self.device)
        )
        return list(out.pooler_output)

    def _expand_full(
        self, prompt_ids: list[int], thw: list[list[int]], keeps: list[np.ndarray | None]
    ) -> tuple[list[int], list[int], list[bool]]:
        """Expand the k-th ``<|image_pad|>`` to image k's full run; returns (ids, mm types, token kept?)."""
        pad = self.image_token_id
        if prompt_ids.count(pad) != len(thw):
            raise ValueError(f"prompt has {prompt_ids.count(pad)} <|image_pad|> placeholders, expected {len(thw)}")
        ids: list[int] = []
        typ: list[int] = []
        kept: list[bool] = []
        k = 0
        for t in prompt_ids:
            if t != pad:
                ids.append(t)
                typ.append(0)
                kept.append(True)
                continue
            n_tok = thw[k][0] * thw[k][1] * thw[k][2] // self.merge**2
            ids.extend([pad] * n_tok)
            typ.extend([1] * n_tok)
            kept.extend([True] * n_tok if keeps[k] is None else keeps[k].tolist())
            k += 1
        return ids, typ, kept

    # --- positions ------------------------------------------------------------------------------------
    def position_ids(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, S) M-RoPE positions (temporal, height, width) and (B, 1) rope deltas, exactly as generate() does.

        Left padding is skipped (padded slots get 0); text after an image continues from
        ``start + max(grid_h, grid_w)``, so a row's positions end ``rope_delta`` away from its token count.
        """
        inp = batch.inputs
        return self.model.model.get_rope_index(
            inp["input_ids"],
            mm_token_type_ids=inp["mm_token_type_ids"],
            image_grid_thw=inp["image_grid_thw"],
            attention_mask=inp["attention_mask"],
        )

    def forward_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` with explicit 3-D positions (not the model's cached rope deltas)."""
        inputs = dict(batch.inputs)
        inputs["position_ids"] = self.position_ids(batch)[0]
        return inputs

    def rope_cos_sin(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) pair the decoder hands its attention modules, (B, S, head_dim), for (3, B, S) positions."""
        return self.model.model.language_model.rotary_emb(hidden, position_ids)

    @property
    def mrope_section(self) -> list[int]:
        return list(self.model.config.text_config.rope_parameters["mrope_section"])

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def rotate(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """M-RoPE on (B, H, S, D) queries or keys.

        transformers 5 hands attention modules cos/sin already recomposed per ``mrope_section`` (B, S, D); a
        per-axis pair (3, B, S, D), as older versions passed, is recomposed here first.
        """
        cos, sin = position_embeddings
        if cos.ndim == 4:
            cos, sin = self._recompose(cos), self._recompose(sin)
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    def _recompose(self, freq: torch.Tensor) -> torch.Tensor:
        """(3, B, S, D) -> (B, S, D): frequency band ``i`` of mrope_section takes axis ``i % 3`` (t, h, w)."""
        half = freq[..., : freq.shape[-1] // 2]
        parts = [chunk[i % 3] for i, chunk in enumerate(half.split(self.mrope_section, dim=-1))]
        band = torch.cat(parts, dim=-1)
        return torch.cat((band, band), dim=-1)
