"""Model adapters and loading from a local checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.models.base import Batch, ModelAdapter
from pipeline.models.llava import LlavaAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {"llava": LlavaAdapter}

__all__ = ["ADAPTERS", "Batch", "ModelAdapter", "load_adapter", "resolve_device", "resolve_dtype"]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it, float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_adapter(path: str | Path, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa"):
    """Load a local checkpoint directory (no hub access) and wrap it in the adapter of its family."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (real checkpoints load from a local dir)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(f"model {path}: model_type {model_type!r} has no adapter; known: {sorted(ADAPTERS)}")
    dev = resolve_device(device)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        config=config,
        dtype=resolve_dtype(dtype, dev),
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    model.to(dev).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return wrap_model(model, processor, model_id=path.name)


def wrap_model(model, processor, model_id: str) -> ModelAdapter:
    """Wrap an in-memory transformers model and its processor (tests build these from configs)."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} has no adapter; known: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type](model, processor, model_id)
