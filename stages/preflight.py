"""Checks of a model stage's params against the model itself, before its weights load or any output is made.

A stage parses every params section it uses first (:mod:`stages.params`); what only the model can tell (how many
decoder layers it has, whether a crop size is a multiple of its patch, whether the device exists) is checked here
on the model built from its ``config.json`` alone, on the meta device: no weights read, nothing written. So a
bad value fails in seconds, naming ``section.key``, not after minutes of loading with a half-made work dir behind.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from pipeline.config import FieldError, ModelParams
from pipeline.models import ModelAdapter, load_adapter, wrap_model


def probe_model(params_path: Path, model: ModelParams, device: bool = True, **adapter_kwargs) -> ModelAdapter:
    """The stage's adapter built from the model's config on the meta device (prompts, grids, layer counts).

    ``adapter_kwargs`` are stage options beyond the ``model`` section (``crop_size`` from ``evaluate``); a
    value the adapter refuses is a usage error naming its key. ``device=False``: the stage runs no model (geometry
    only), so ``model.device`` need not exist here.
    """
    if device:
        _check_device(params_path, model.device)
    try:
        probe = load_adapter(model.path, weights=False, **model.adapter_options())
    except FieldError as exc:
        raise click.UsageError(f"{params_path}: model.{exc}") from None
    except FileNotFoundError as exc:
        raise click.UsageError(f"{params_path}: model.path: {exc}") from None
    except ValueError as exc:  # an unknown model_type, an option the family does not take
        raise click.UsageError(f"{params_path}: model: {exc}") from None
    if adapter_kwargs:
        try:
            probe = wrap_model(
                probe.model, probe.processor, probe.model_id, **model.adapter_options(), **adapter_kwargs
            )
        except FieldError as exc:
            raise click.UsageError(f"{params_path}: evaluate.{exc}") from None
    return probe


def _check_device(params_path: Path, device: str) -> None:
    """Refuse a device this machine does not have (it would fail only after the weights are read)."""
    base, _, index = device.partition(":")
    if base == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (index and int(index) >= n):
            raise click.UsageError(f"{params_path}: model.device: {device!r}, but torch sees {n} CUDA device(s)")
    if base == "mps" and not torch.backends.mps.is_available():
        raise click.UsageError(f"{params_path}: model.device: 'mps', but torch sees no MPS device")


def check_layers(params_path: Path, probe: ModelAdapter, key: str, layers: list[int]) -> None:
    """Every layer index in ``layers`` exists in the model's decoder (``key`` names the params key)."""
    n = len(probe.decoder_layers)
    bad = [int(x) for x in layers if int(x) >= n]
    if bad:
        raise click.UsageError(
            f"{params_path}: {key}: layer(s) {bad} past the model's {n} decoder layers 0..{n - 1} (got {list(layers)})"
        )
