"""Small Qwen2.5-VL models built from configs: the tests' tiny models and benchmark-shaped random models.

Everything here is an ordinary transformers object (``Qwen2_5_VLForConditionalGeneration``, a fast
tokenizer with Qwen's special tokens and chat template, ``Qwen2VLImageProcessorPil``), so a model saved
with :func:`save_toy_qwen` loads through exactly the same ``from_pretrained`` path as a real
Qwen2.5-VL checkpoint directory. ``Qwen2_5_VLProcessor`` itself is never built: it needs torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from pipeline.models.qwen2_5_vl import QwenVLProcessor
from toymodels.llava import word_level_tokenizer

# The order of Qwen2.5-VL's own vocabulary (151643 = <|endoftext|>, ...); ids differ in the toy.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]

# Qwen2.5-VL-Instruct's chat template, verbatim (default system prompt included).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", ":", "?", ",", "'"]


@dataclass
class ToyQwenSizes:
    """Shape of a toy Qwen2.5-VL; the defaults make a test-sized model (well under a second a forward)."""

    vision_hidden: int = 32
    vision_intermediate: int | None = None  # None = 2 x vision_hidden
    vision_layers: int = 2
    vision_heads: int = 2
    # 56 px = 2 merged tokens a side: windows are smaller than most test images, so window attention is exercised
    window_size: int = 56
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1])
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])  # sums to head_dim / 2
    max_position_embeddings: int = 4096
    # image processor budget (native mode): 4 .. 36 merged tokens
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 36 * 28 * 28
    vocab_size: int | None = None  # None = the tokenizer's size; benchmarks set a real model's vocabulary


def qwen25_vl_sizes(variant: str = "7b") -> ToyQwenSizes:
    """The shapes of Qwen2.5-VL-3B / -7B (random weights for benchmarks; the vocabulary is the real one)."""
    vision = {
        "vision_hidden": 1280,
        "vision_intermediate": 3420,
        "vision_layers": 32,
        "vision_heads": 16,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "mrope_section": [16, 24, 24],
        "max_position_embeddings": 128000,
        "min_pixels": 3136,
        "max_pixels": 12845056,
    }
    if variant == "7b":
        text = {"text_hidden": 3584, "text_layers": 28, "text_heads": 28, "text_kv_heads": 4, "vocab_size": 152064}
        return ToyQwenSizes(**vision, **text, text_intermediate=18944)
    if variant == "3b":
        text = {"text_hidden": 2048, "text_layers": 36, "text_heads": 16, "text_kv_heads": 2, "vocab_size": 151936}
        return ToyQwenSizes(**vision, **text, text_intermediate=11008)
    raise ValueError(f"unknown Qwen2.5-VL variant {variant!r}; known: 3b, 7b")


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A case-sensitive word-level fast tokenizer over ``words`` with Qwen's special tokens and chat template."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=word_level_tokenizer(SPECIAL_TOKENS + BASE_WORDS + list(words)),
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in {"<|endoftext|>", "<|im_end|>", "<unk>"}],
        padding_side="left",
    )
    fast.chat_template = QWEN25_VL_CHAT_TEMPLATE
    return fast


def build_image_processor(sizes: ToyQwenSizes) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor: 14 px patches, 2x2 merge, a pixel budget for native resolution."""
    return Qwen2VLImageProcessorPil(
        min_pixels=sizes.min_pixels,
        max_pixels=sizes.max_pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: ToyQwenSizes) -> Qwen2_5_VLConfig:
    """A ``Qwen2_5_VLConfig`` with a windowed vision tower and a GQA decoder with M-RoPE of the given sizes."""
    head_dim = sizes.text_hidden // sizes.text_heads
    if 2 * sum(sizes.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {sizes.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = {
        "depth": sizes.vision_layers,
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_intermediate or sizes.vision_hidden * 2,
        "num_heads": sizes.vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": sizes.window_size,
        "fullatt_block_indexes": list(sizes.fullatt_block_indexes),
        "out_hidden_size": sizes.text_hidden,
        "tokens_per_second": 2,
    }
    text = {
        "vocab_size": sizes.vocab_size or len(tokenizer),
        "hidden_size": sizes.text_hidden,
        "intermediate_size": sizes.text_intermediate,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads,
        "max_position_embeddings": sizes.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(sizes.mrope_section)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_toy_qwen(
    words: list[str], sizes: ToyQwenSizes | None = None, seed: int = 0
) -> tuple[Qwen2_5_VLForConditionalGeneration, QwenVLProcessor]:
    """Build a randomly initialised toy Qwen2.5-VL and its (tokenizer + image processor) in-process."""
    sizes = sizes or ToyQwenSizes()
    tokenizer = build_tokenizer(words)
    processor = QwenVLProcessor(tokenizer, build_image_processor(sizes))
    config = build_config(tokenizer, sizes)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    gen.bos_token_id = tokenizer.pad_token_id
    # A random model would happily emit <|image_pad|>; fed back in a teacher-forced pass it would claim image
    # features that do not exist. Real checkpoints never emit these, so the toy is simply forbidden to.
    gen.suppress_tokens = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[1:] if t != "<|im_end|>"]
    return model, processor


def save_toy_qwen(model: Qwen2_5_VLForConditionalGeneration, processor: QwenVLProcessor, path: str | Path) -> Path:
    """Save as an ordinary transformers model directory (safetensors, tokenizer and image processor configs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
