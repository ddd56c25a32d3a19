"""Model adapters and loading from a local checkpoint directory."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from pipeline.config import canonical_dtype
from pipeline.models.base import Batch, ModelAdapter
from pipeline.models.deepseek_vl import DeepseekVLAdapter
from pipeline.models.llava import LlavaAdapter
from pipeline.models.qwen2_5_vl import Qwen25VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "deepseek_vl": DeepseekVLAdapter,
}

__all__ = [
    "ADAPTERS",
    "Batch",
    "ModelAdapter",
    "load_adapter",
    "resolve_device",
    "resolve_dtype",
]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it, float32 elsewhere; aliases (fp16, bf16, half, ...) are taken."""
    dtype = canonical_dtype(dtype)  # an unknown name is an error listing the valid ones
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_adapter(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    weights: bool = True,
    **adapter_kwargs,
):
    """Load a local checkpoint directory (no hub access) and wrap it in the adapter of its family.

    ``weights=False`` builds the model on the meta device from its config alone: enough for prompts, grids and
    box geometry (reports) without reading gigabytes of weights. ``adapter_kwargs`` go to the adapter's
    constructor (Qwen2.5-VL: ``resolution``).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (real checkpoints load from a local dir)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(f"model {path}: model_type {model_type!r} has no adapter; known: {sorted(ADAPTERS)}")
    _check_options(model_type, adapter_kwargs)
    dev = resolve_device(device)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if weights:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            config=config,
            dtype=resolve_dtype(dtype, dev),
            attn_implementation=attn_implementation,
            local_files_only=True,
        )
        model.to(dev).eval()
    else:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config).eval()
    # Families whose stock processor cannot be built here (Qwen2_5_VLProcessor needs torchvision) bring a loader.
    load_processor = getattr(ADAPTERS[model_type], "load_processor", None)
    if load_processor is not None:
        processor = load_processor(path)
    else:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return wrap_model(model, processor, model_id=path.name, **adapter_kwargs)


def wrap_model(model, processor, model_id: str, **adapter_kwargs) -> ModelAdapter:
    """Wrap an in-memory transformers model and its processor (tests build these from configs)."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} has no adapter; known: {sorted(ADAPTERS)}")
    _check_options(model_type, adapter_kwargs)
    return ADAPTERS[model_type](model, processor, model_id, **adapter_kwargs)


def _check_options(model_type: str, adapter_kwargs: dict) -> None:
    """Refuse options the family's adapter does not take (before a checkpoint is loaded for nothing)."""
    unknown = sorted(set(adapter_kwargs) - set(inspect.signature(ADAPTERS[model_type].__init__).parameters))
    if unknown:
        raise ValueError(f"model options {unknown} do not apply to model_type {model_type!r}")
