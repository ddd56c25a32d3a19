"""LLaVA architecture (``LlavaForConditionalGeneration``): llava-hf LLaVA-1.5 checkpoints and the toy models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.config import FieldError
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


class LlavaAdapter(ModelAdapter):
    """Adapter for LLaVA-1.5-style models: one fixed square grid of visual tokens per image."""

    family = "llava"

    def __init__(
        self,
        model: nn.Module,
        processor,
        model_id: str,
        crop_size: int | None = None,
        pad_to_square: bool = False,
    ):
        """``crop_size``: side in pixels of the square view stage-2 crops are encoded at (None: the base view).

        A smaller side gives fewer crop tokens, ``(crop_size / patch)^2``, at the price of less zoom; the vision
        tower's position embeddings are then interpolated (transformers' ``interpolate_pos_encoding``), which the
        model may never have seen in training: measure before relying on it.

        ``pad_to_square``: the reference LLaVA-1.5 view (``image_aspect_ratio: pad``): every image is centred on
        a square of the image-mean colour (``int(255 * mean)`` per channel), then resized straight to the base
        view, with no centre crop, whatever the processor's own pad / resize / crop settings (llava-hf's
        ``CLIPImageProcessor`` resizes the short side and centre-crops instead).
        """
        super().__init__(model, processor, model_id)
        self.pad_to_square = bool(pad_to_square)
        patch = int(model.config.vision_config.patch_size)
        if crop_size is not None and (int(crop_size) <= 0 or int(crop_size) % patch):
            raise FieldError("crop_size", f"must be a positive multiple of the patch size {patch} (got {crop_size})")
        self.crop_size = int(crop_size) if crop_size is not None else None

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def grid_shape(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid_shape
        return h * w

    def visual_grid(self, width: int, height: int) -> tuple[int, int]:
        return self.grid_shape  # every image is fitted to the one square base view

    @property
    def crop_side(self) -> int:
        """Side in pixels of the square view a stage-2 crop is stretched to."""
        return self.crop_size or self.base_view

    def crop_grid(self, width: int, height: int) -> tuple[int, int]:
        side = self.crop_side // int(self.model.config.vision_config.patch_size)
        return side, side

    @property
    def view_spec(self) -> ViewSpec:
        """How an image is mapped onto the base view: ``pad_to_square``'s, else the processor's own."""
        if self.pad_to_square:
            return ViewSpec(pad_to_square=True)  # pad, then a plain resize to the base view
        ip = self.processor.image_processor

        def get(obj, key):
            return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

        shortest = get(ip.size, "shortest_edge")
        crop = (
            (get(ip.crop_size, "height"), get(ip.crop_size, "width")) if getattr(ip, "do_center_crop", False) else None
        )
        return ViewSpec(
            pad_to_square=bool(getattr(ip, "do_pad", False)),
            shortest_edge=int(shortest) if shortest else None,
            crop_hw=crop if shortest and crop and None not in crop else None,
        )

    @property
    def pad_fill(self) -> tuple[int, ...]:
        """The reference pad colour: the processor's image mean, ``int(255 * x)`` (CLIP: (122, 116, 104))."""
        return tuple(int(x * 255) for x in self.processor.image_processor.image_mean)

    def view_image(self, image: Image.Image) -> Image.Image:
        """The image handed to the processor: centred on a mean-colour square with ``pad_to_square``, else as is."""
        return expand_to_square(image.convert("RGB"), self.pad_fill) if self.pad_to_square else image

    def _view_kwargs(self) -> dict:
        """Processor overrides of the reference view: a plain resize to the base view, no crop, no second pad."""
        if not self.pad_to_square:
            return {}
        side = self.base_view
        kwargs = {"size": {"height": side, "width": side}, "do_center_crop": False}
        if hasattr(self.processor.image_processor, "do_pad"):
            kwargs["do_pad"] = False
        return kwargs

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Pixel values of the base views of ``images`` (the view :attr:`view_spec` describes)."""
        ip = self.processor.image_processor
        return ip([self.view_image(im) for im in images], return_tensors="pt", **self._view_kwargs())["pixel_values"]

    def padding_tokens(self, width: int, height: int) -> np.ndarray | None:
        spec = self.view_spec
        cut = spec.shortest_edge is not None and spec.crop_hw not in (None, (spec.shortest_edge, spec.shortest_edge))
        if not spec.pad_to_square or cut:
            return None  # no padding, or a centre crop that cuts into the padded square (no reference rule)
        return padding_token_mask(width, height, self.grid_shape)

    def source_box(self, grid_box, width, height):
        return grid_box_to_source(grid_box, self.grid_shape, width, height, self.view_spec)

    def grid_box(self, source_box, width, height):
        return source_box_to_grid(source_box, self.grid_shape, width, height, self.view_spec)

    def grid_span(self, source_box, width, height):
        return source_box_to_span(source_box, self.grid_shape, width, height, self.view_spec)

    def render_prompt(self, question: str, n_images: int = 1) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build_batch(
        self,
        images: list[Image.Image],
        prompts: list[str],
        responses: list[list[int]] | None = None,
    ) -> Batch:
        enc = self.processor(
            images=[self.view_image(im) for im in images],
            text=prompts,
            padding=True,
            return_tensors="pt",
            **self._view_kwargs(),
        )
        prompt_rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        responses = responses if responses is not None else [[] for _ in prompts]
        rows = [p + list(r) for p, r in zip(prompt_rows, responses, strict=True)]
        ids, mask = left_pad(rows, self.pad_token_id)
        n_vis = self.tokens_per_image
        visual_index = torch.zeros((len(rows), n_vis), dtype=torch.long)
        for i in range(len(rows)):
            pos = (ids[i] == self.image_token_id).nonzero().flatten()
            if len(pos) < n_vis:
                raise ValueError(f"batch row {i}: found {len(pos)} image tokens, expected at least {n_vis}")
            visual_index[i] = pos[:n_vis]  # the first image's tokens, row-major over the patch grid
        inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": enc["pixel_values"]}
        return Batch(
            inputs=inputs,
            visual_index=visual_index,
            visual_valid=torch.ones_like(visual_index, dtype=torch.bool),
            grids=[self.grid_shape] * len(rows),
            response_len=torch.tensor([len(r) for r in responses], dtype=torch.long),
            prompt_len=torch.tensor([len(p) for p in prompt_rows], dtype=torch.long),
        )

    # --- two-stage inference ------------------------------------------------------------------------
    @property
    def base_view(self) -> int:
        """Side in pixels of the square view every image is fitted to."""
        return int(self.model.config.vision_config.image_size)

    def crop_pixels(self, images: list[Image.Image], boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Pixel values of crops, each resized straight to :attr:`crop_side` by the model's image processor.

        Same resampling and normalisation as the original view, but no pad and no centre crop: the crop
        fills the whole grid, so crop token (i, j) sits at (i, j) of the crop's box. For a square crop
        of a padding processor this is exactly what the processor makes of the crop on its own. The reference
        code does the same with ``pad_to_square`` (its two-stage crops are resized to 336 x 336 before its
        padding ``process_images``, so nothing is padded): crops are stretched, never padded.
        """
        ip = self.processor.image_processor
        side = self.crop_side
        kwargs = {"size": {"height": side, "width": side}, "do_center_crop": False}
        if hasattr(ip, "do_pad"):
            kwargs["do_pad"] = False
        cut = [im.crop(b) for im, b in zip(images, boxes, strict=True)]
        return ip(cut, return_tensors="pt", **kwargs)["pixel_values"]

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The model's own visual tokens, (T, D) per image, in grid row-major order (any multiple of the patch)."""
        extra = {"interpolate_pos_encoding": True} if pixel_values.shape[-1] != self.base_view else {}
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype), **extra)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return list(feats)

    def expand_placeholders(self, prompt: str, counts: list[int]) -> list[int]:
        """Token ids of ``prompt`` with its k-th image placeholder repeated ``counts[k]`` times.

        The same string expansion the processor does before tokenising, so a crop keeping all its
        tokens yields exactly the processor's ids for the same prompt with two images.
        """
        tok = self.processor.image_token
        parts = prompt.split(tok)
        if len(parts) != len(counts) + 1:
            raise ValueError(f"prompt has {len(parts) - 1} image placeholders, expected {len(counts)}")
        text = parts[0] + "".join(tok * n + part for n, part in zip(counts, parts[1:], strict=True))
        return list(self.tokenizer(text)["input_ids"])

    supports_prefix_reuse = True

    def prefix_end(self, batch: Batch) -> torch.Tensor:
        return batch.visual_index[:, -1] + 1  # the chat template's opening, then the image: nothing else before

    @torch.no_grad()
    def stage2_inputs(
        self,
        images: list[Image.Image],
        questions: list[str],
        crops: Sequence[Sequence[Crop]],
        encode_originals: bool = True,
        original_features: Sequence[torch.Tensor] | None = None,
    ) -> Stage2Inputs:
        """Original views, then each crop stretched to :attr:`crop_side` (its kept tokens only), then the question.

        LLaVA's positions are 1-D, so generate() derives them from the padding mask (``position_ids`` None).
        """
        grid = self.grid_shape
        n_full = grid[0] * grid[1]
        crop_grid = self.crop_grid(0, 0)
        used = [list(cs) for cs in crops]
        given = original_features is not None
        if given and len(original_features) != len(images):
            raise ValueError(f"{len(original_features)} original feature sets for {len(images)} images")
        encode_originals = encode_originals and not given
        pixels = []
        if encode_originals:
            pixels.append(self.pixel_values(images))
        crop_images = [im for im, cs in zip(images, used, strict=True) for _ in cs]
        if crop_images:
            pixels.append(self.crop_pixels(crop_images, [c.box for cs in used for c in cs]))
        # One vision forward for every original view and crop of the batch, when they share a size.
        same_size = len({p.shape[-1] for p in pixels}) <= 1
        groups = [torch.cat(pixels)] if pixels and same_size else pixels
        feats = [f for g in groups for f in self.image_features(g)]
        if encode_originals:
            orig_feats, crop_feats = feats[: len(images)], iter(feats[len(images) :])
        elif given:
            orig_feats, crop_feats = list(original_features), iter(feats)
        else:
            blank = torch.zeros(n_full, self.model.config.text_config.hidden_size)
            orig_feats, crop_feats = [blank] * len(images), iter(feats)

        prompts, rows, seq_feats, n_crop_tokens = [], [], [], []
        for i, (q, cs) in enumerate(zip(questions, used, strict=True)):
            prompt = self.render_prompt(q, n_images=1 + len(cs))
            counts = [n_full] + [c.n_tokens(crop_grid) for c in cs]
            prompts.append(prompt)
            rows.append(self.expand_placeholders(prompt, counts))
            seq_feats.append(orig_feats[i])
            for c in cs:
                f = next(crop_feats)
                seq_feats.append(f if c.keep is None else f[torch.from_numpy(c.keep.reshape(-1)).to(f.device)])
            n_crop_tokens.append(sum(counts[1:]))
        ids, mask, embeds = self.embed_with_visual(rows, seq_feats)
        return Stage2Inputs(ids, embeds, mask, prompts, used, n_crop_tokens)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def rotate(self, x, position_embeddings):
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(x, x, cos, sin)[0]
