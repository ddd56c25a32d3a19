"""Small DeepSeek-VL models built from configs: the tests' tiny models and benchmark-shaped random models.

Everything here is an ordinary transformers object (``DeepseekVLForConditionalGeneration`` with a SigLIP vision
tower and a LLaMA decoder, ``DeepseekVLProcessor`` with ``DeepseekVLImageProcessorPil`` and a word-level fast
tokenizer that prepends DeepSeek's BOS), so a model saved with :func:`save_toy_deepseek` loads through exactly the
same ``from_pretrained`` path as a deepseek-community DeepSeek-VL checkpoint directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLImageProcessorPil,
    DeepseekVLProcessor,
    PreTrainedTokenizerFast,
)

from toymodels.llava import word_level_tokenizer

BOS, EOS, IMAGE = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>"
SPECIAL_TOKENS = [BOS, EOS, IMAGE, "<unk>"]

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# DeepSeek-VL's chat format as the deepseek-community checkpoints' chat template renders it (the original
# repository's "deepseek" conversation template): the system prompt, "User: " + images + question, "\n\n",
# "Assistant:"; an answer ends with the end-of-sentence token.
DEEPSEEK_VL_CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '" + EOS + "'] %}" + SYSTEM_PROMPT + "\n\n"
    "{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}User: {% elif message['role']|lower == 'assistant' %}Assistant: "
    "{% else %}{{ message['role'].capitalize() }}: {% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}" + IMAGE + "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}"
    "{% endif %}{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

BASE_WORDS = ["User", "Assistant", ":", "?", ".", ",", "'", *SYSTEM_PROMPT.replace(".", " ").replace(",", " ").split()]


@dataclass
class ToyDeepseekSizes:
    """Shape of a toy DeepSeek-VL; the defaults make a test-sized model (well under a second a forward)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 32
    vision_intermediate: int | None = None  # None = 4 x vision_hidden
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int | None = None
    text_intermediate: int = 128
    max_position_embeddings: int = 2048
    vocab_size: int | None = None  # None = the tokenizer's size; benchmarks set a real model's vocabulary


def deepseek_vl_sizes(variant: str = "1.3b") -> ToyDeepseekSizes:
    """The shape of DeepSeek-VL-1.3B (SigLIP-L/16 at 384 px, DeepSeek-LLM-1.3B; random weights for benchmarks)."""
    if variant != "1.3b":
        raise ValueError(f"unknown DeepSeek-VL variant {variant!r}; known: 1.3b (the hybrid 7B is not supported)")
    return ToyDeepseekSizes(
        image_size=384,
        patch_size=16,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        text_hidden=2048,
        text_layers=24,
        text_heads=16,
        text_kv_heads=16,
        text_intermediate=5632,
        max_position_embeddings=16384,
        vocab_size=102400,
    )


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A case-sensitive word-level fast tokenizer over ``words`` that prepends BOS, as DeepSeek's tokenizer does."""
    backend = word_level_tokenizer(SPECIAL_TOKENS + BASE_WORDS + list(words))
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, sizes: ToyDeepseekSizes) -> DeepseekVLProcessor:
    """DeepSeek-VL's processor: long side to the base view, pad to a centred square (SigLIP's 0.5 mean / std)."""
    image_processor = DeepseekVLImageProcessorPil(
        size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return DeepseekVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=DEEPSEEK_VL_CHAT_TEMPLATE,
        num_image_tokens=(sizes.image_size // sizes.patch_size) ** 2,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: ToyDeepseekSizes) -> DeepseekVLConfig:
    """A ``DeepseekVLConfig`` with a SigLIP vision tower and a LLaMA decoder of the given sizes."""
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_intermediate or sizes.vision_hidden * 4,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "image_size": sizes.image_size,
        "patch_size": sizes.patch_size,
    }
    text = {
        "model_type": "llama",
        "vocab_size": sizes.vocab_size or len(tokenizer),
        "hidden_size": sizes.text_hidden,
        "intermediate_size": sizes.text_intermediate,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads or sizes.text_heads,
        "max_position_embeddings": sizes.max_position_embeddings,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return DeepseekVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=False,
    )


def build_toy_deepseek(
    words: list[str], sizes: ToyDeepseekSizes | None = None, seed: int = 0
) -> tuple[DeepseekVLForConditionalGeneration, DeepseekVLProcessor]:
    """Build a randomly initialised toy DeepSeek-VL and its processor in-process."""
    sizes = sizes or ToyDeepseekSizes()
    tokenizer = build_tokenizer(words)
    processor = build_processor(tokenizer, sizes)
    config = build_config(tokenizer, sizes)
    torch.manual_seed(seed)
    model = DeepseekVLForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    # A random model would happily emit <image_placeholder> or BOS; fed back in a teacher-forced pass the first
    # would claim image features that do not exist. Real checkpoints never emit them, so the toy may not.
    gen.suppress_tokens = [tokenizer.convert_tokens_to_ids(t) for t in (BOS, IMAGE)]
    return model, processor


def save_toy_deepseek(
    model: DeepseekVLForConditionalGeneration, processor: DeepseekVLProcessor, path: str | Path
) -> Path:
    """Save as an ordinary transformers model directory (safetensors + processor/tokenizer configs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
