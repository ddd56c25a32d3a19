"""LLaVA architecture (``LlavaForConditionalGeneration``): llava-hf LLaVA-1.5 checkpoints and the toy models."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.models.base import Batch, ModelAdapter, left_pad
from pipeline.models.geometry import ViewSpec, grid_box_to_source, source_box_to_grid, source_box_to_span


class LlavaAdapter(ModelAdapter):
    """Adapter for LLaVA-1.5-style models: one fixed square grid of visual tokens per image."""

    family = "llava"

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
    def view_spec(self) -> ViewSpec:
        """How the image processor maps an image onto the base view, read from its config."""
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
        enc = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
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

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def rotate(self, x, position_embeddings):
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(x, x, cos, sin)[0]
