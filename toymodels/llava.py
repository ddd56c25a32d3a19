"""Small LLaVA-architecture models built from configs: the tests' tiny models and the embedded default.

Everything here is an ordinary transformers object (``LlavaForConditionalGeneration``,
``LlavaProcessor`` with ``LlavaImageProcessorPil`` and a word-level fast tokenizer), so a model
saved with :func:`save_toy_llava` loads through exactly the same ``from_pretrained`` path as a
llava-hf LLaVA-1.5 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

# Mirrors llava-hf/llava-1.5's template: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

BASE_WORDS = ["USER", "ASSISTANT", ":", "?", ".", ",", "'"]


@dataclass
class ToyLlavaSizes:
    """Shape of a toy LLaVA; the defaults make a test-sized model (well under a second a forward)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int | None = None
    text_intermediate: int = 128
    max_position_embeddings: int = 2048
    vocab_size: int | None = None  # None = the tokenizer's size; benchmarks set a real model's vocabulary


def word_level_tokenizer(words: list[str]) -> Tokenizer:
    """A case-sensitive word-level ``tokenizers`` model over ``words`` (in order, duplicates dropped)."""
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A case-sensitive word-level fast tokenizer over ``words`` plus the chat and special tokens."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=word_level_tokenizer(SPECIAL_TOKENS + BASE_WORDS + list(words)),
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast, sizes: ToyLlavaSizes) -> LlavaProcessor:
    """LLaVA-1.5 style processor: pad to square with the mean colour, resize to the base view."""
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
        do_pad=True,
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA15_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: ToyLlavaSizes) -> LlavaConfig:
    """A ``LlavaConfig`` with a CLIP vision tower and a Llama decoder of the given sizes."""
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_hidden * 4,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=sizes.vocab_size or len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads or sizes.text_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    n_patches = (sizes.image_size // sizes.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_toy_llava(
    words: list[str], sizes: ToyLlavaSizes | None = None, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised toy LLaVA and its processor in-process."""
    sizes = sizes or ToyLlavaSizes()
    tokenizer = build_tokenizer(words)
    processor = build_processor(tokenizer, sizes)
    config = build_config(tokenizer, sizes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def save_toy_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, path: str | Path) -> Path:
    """Save as an ordinary transformers model directory (safetensors + processor/tokenizer configs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
