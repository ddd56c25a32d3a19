"""The self-distilled region proposal network (SPEC 2): a frozen MLLM prefix plus R copied decoder layers.

The backbone is the MLLM itself (vision tower, projector, embeddings, decoder layers ``0..B-1``), frozen and
run by the model's own forward, cut by a pre-hook on decoder layer ``B`` that captures what that layer would
receive (hidden states, attention mask, rotary ``(cos, sin)``). The RPN is ``R`` deep copies of layers
``B..B+R-1`` plus a copy of the final norm. The first ``R-1`` copies run as ordinary decoder layers; the last
one contributes only its input norm and ``q_proj`` / ``k_proj``: the query is the last prompt token, the keys
are the first image's visual tokens, and the logit of token ``j`` is the head mean of ``q . k_j / sqrt(d)``.

Everything model-specific goes through the adapter (``decoder_layers``, ``rotate`` for the rotary variant,
``attention_geometry`` for grouped-query attention), so another family only brings its adapter.

Precision: the RPN's weights are kept in float32 (master weights for AdamW) and run under bf16 autocast when
training asks for it; the backbone stays in the model's dtype. Logits are always float32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.inference.prefix_cache import PrefixState, prefix_state
from pipeline.io.locks import atomic_path
from pipeline.models.attention_math import attention_scores
from pipeline.models.base import Batch, ModelAdapter
from pipeline.student.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointMismatch,
    read_config,
)

GRID_CONVENTION = "row-major visual tokens of the first image"
# Parameters of the last RPN layer that the head reads; the rest of that layer (v/o, MLP) is carried for
# fidelity with the reference checkpoint layout but nothing reaches it.
HEAD_PARAMS = ("input_layernorm.", "self_attn.q_proj.", "self_attn.k_proj.")
# Config keys that change with how a model was loaded (path, dtype, ...) rather than what it is.
_VOLATILE_CONFIG_KEYS = {"architectures", "dtype", "torch_dtype", "transformers_version", "use_cache"}


class _StopForward(Exception):
    """Raised from the pre-hook on decoder layer B once its inputs are captured."""


@dataclass
class BackboneOutput:
    """What decoder layer B receives: its input hidden states and the keyword arguments of its call."""

    hidden: torch.Tensor
    layer_kwargs: dict[str, Any]

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer_kwargs["position_embeddings"]


@torch.no_grad()
def run_backbone(adapter: ModelAdapter, batch: Batch, B: int, keep_cache: bool = False) -> BackboneOutput:
    """Run the frozen model up to (not including) decoder layer ``B`` and capture that layer's inputs.

    The ordinary model forward does the image merging and builds the mask and rotary embeddings exactly as
    generation would; the pre-hook stops it before any deeper layer, the final norm or the LM head. With
    ``keep_cache`` the forward fills a KV cache for layers ``0..B-1``, left in ``layer_kwargs`` under the
    forward's cache keyword (``layer_kwargs`` otherwise carries no cache).
    """
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = adapter.decoder_layers[B].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.model(**adapter.forward_inputs(batch), use_cache=keep_cache)
    except _StopForward:
        pass
    else:  # pragma: no cover - the hook always fires
        raise RuntimeError(f"the forward never reached decoder layer {B}")
    finally:
        handle.remove()
    kwargs = captured["kwargs"] if keep_cache else without_cache(captured["kwargs"])
    return BackboneOutput(hidden=captured["hidden"], layer_kwargs=kwargs)


def without_cache(layer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Decoder-layer kwargs minus the KV cache: the RPN's copied layers must not write into the model's cache."""
    return {k: v for k, v in layer_kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}


def take_positions(pe: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather sequence positions ``index`` (B, K) from a rotary table shaped (..., B or 1, S, D).

    Works for 1-D rotary (B, S, D) and for M-RoPE tables with a leading section axis (3, B, S, D).
    """
    bsz, k = index.shape
    lead = pe.shape[:-3]
    pe = pe.expand(*lead, bsz, *pe.shape[-2:])
    idx = index.view(*([1] * len(lead)), bsz, k, 1).expand(*lead, bsz, k, pe.shape[-1])
    return torch.gather(pe, -2, idx)


def query_positions(batch: Batch) -> torch.Tensor:
    """(B, 1) position of the last prompt token, the one right before the answer (rows are left-padded)."""
    seq = batch.inputs["input_ids"].shape[1]
    return (seq - 1 - batch.response_len).view(-1, 1)


def final_norm(adapter: ModelAdapter) -> nn.Module:
    """The language model's final norm: the ``norm`` of the module that owns the decoder layers."""
    layers = adapter.decoder_layers
    for module in adapter.model.modules():
        if getattr(module, "layers", None) is layers and isinstance(getattr(module, "norm", None), nn.Module):
            return module.norm
    raise ValueError(f"{type(adapter.model).__name__}: no final norm next to the decoder layers")


def _normalise_config(d: Any) -> Any:
    if isinstance(d, dict):
        return {
            str(k): _normalise_config(v)
            for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(d, list | tuple):
        return [_normalise_config(v) for v in d]
    return d


@torch.no_grad()
def base_fingerprint(adapter: ModelAdapter, n_tensors: int = 8, n_values: int = 8) -> dict[str, Any]:
    """Identity of a base model that survives reloading in another dtype or on another device.

    ``config``: sha256 of the model config without load-time keys. ``probe``: a few weight values at fixed
    places (compared with a tolerance, so bfloat16 vs float32 loads of one checkpoint match while two
    checkpoints of one architecture do not).
    """
    cfg = json.dumps(_normalise_config(adapter.model.config.to_dict()), sort_keys=True, default=str)
    params = [p for _, p in sorted(adapter.model.named_parameters(), key=lambda kv: kv[0])]
    picks = [params[round(i * (len(params) - 1) / max(n_tensors - 1, 1))] for i in range(min(n_tensors, len(params)))]
    probe: list[float] = []
    for p in picks:
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(n_values, flat.numel())).long().to(flat.device)
        probe += flat[idx].float().cpu().tolist()
    return {
        "family": adapter.family,
        "model_id": adapter.model_id,
        "config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
        "probe": probe,
    }


def check_base(saved: dict[str, Any], adapter: ModelAdapter, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatch` unless ``saved`` (a :func:`base_fingerprint`) matches ``adapter``."""
    now = base_fingerprint(adapter)
    who = f"{where} was trained on base model {saved.get('model_id')!r}, this model is {now['model_id']!r}"
    if saved.get("config_sha256") != now["config_sha256"]:
        raise CheckpointMismatch(
            f"{who}: base config fingerprint {saved.get('config_sha256', '?')[:12]} != {now['config_sha256'][:12]}; "
            "refusing to load an RPN made for another model"
        )
    a, b = torch.tensor(saved.get("probe", [])), torch.tensor(now["probe"])
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-4):
        raise CheckpointMismatch(f"{who}: same architecture but other weights; refusing to load")


class RPN(nn.Module):
    """R decoder layers copied from the base model after layer B, and the query/key head on top.

    ``self.adapter`` (not a submodule) gives the frozen backbone, so ``state_dict()`` holds the RPN only.
    """

    def __init__(self, adapter: ModelAdapter, B: int, R: int, layers: nn.ModuleList, norm: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.B, self.R = B, R
        self.layers = layers
        # The head never reads it (as in the reference); copied so checkpoints keep the reference layout.
        self.norm = norm

    @classmethod
    def from_base(cls, adapter: ModelAdapter, B: int, R: int = 3) -> RPN:
        """Freeze the base model and copy layers ``B..B+R-1`` and the final norm as the RPN (float32)."""
        n_layers = len(adapter.decoder_layers)
        if R < 1 or B < 0 or n_layers < B + R:
            raise ValueError(f"need 0 <= B and 1 <= R with B + R <= {n_layers} decoder layers, got B={B} R={R}")
        adapter.model.requires_grad_(False)
        layers = nn.ModuleList(copy.deepcopy(adapter.decoder_layers[i]) for i in range(B, B + R))
        rpn = cls(adapter, B, R, layers, copy.deepcopy(final_norm(adapter))).float()
        rpn.requires_grad_(True)
        # Parameters nothing in the head reaches never get a gradient (so AdamW never moves them); freezing
        # them says so and keeps DDP from waiting for their gradients.
        for name, p in rpn.layers[-1].named_parameters():
            p.requires_grad_(name.startswith(HEAD_PARAMS))
        rpn.norm.requires_grad_(False)
        return rpn

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every RPN weight (what the checkpoint holds), none of the backbone's."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def forward(self, batch: Batch) -> torch.Tensor:
        """(B, V) float32 logits over each sample's visual tokens; padded visual slots get the float32 minimum."""
        return self._run(run_backbone(self.adapter, batch, self.B), batch)

    @torch.no_grad()
    def stage1(self, batch: Batch) -> tuple[torch.Tensor, PrefixState]:
        """Inference: the logits of :meth:`forward`, plus what stage 2 reuses of the backbone's work."""
        bb = run_backbone(self.adapter, batch, self.B, keep_cache=True)
        state = prefix_state(self.adapter, batch, self.B, bb.hidden, bb.layer_kwargs)
        return self._run(BackboneOutput(bb.hidden, without_cache(bb.layer_kwargs)), batch), state

    def _run(self, bb: BackboneOutput, batch: Batch) -> torch.Tensor:
        # The RPN's residual stream is float32 like its weights; under autocast its matmuls still run in bf16.
        h = bb.hidden.to(next(self.layers.parameters()).dtype)
        for layer in self.layers[:-1]:
            out = layer(h, **bb.layer_kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(h, batch, bb.position_embeddings)

    def head(
        self, hidden: torch.Tensor, batch: Batch, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Head-mean ``q . k / sqrt(d)`` of the last RPN layer, from the last prompt token to the visual tokens."""
        last = self.layers[-1]
        attn = last.self_attn
        n_heads, n_kv, head_dim = self.adapter.attention_geometry
        x = last.input_layernorm(hidden)
        q_pos = query_positions(batch).to(x.device)
        vis = batch.visual_index.to(x.device)
        bsz, n_vis = vis.shape
        xq = torch.gather(x, 1, q_pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        xk = torch.gather(x, 1, vis.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        q = attn.q_proj(xq).view(bsz, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, d)
        k = attn.k_proj(xk).view(bsz, n_vis, -1, head_dim).transpose(1, 2)  # (B, KV, V, d)
        cos, sin = position_embeddings
        q = self.adapter.rotate(q, (take_positions(cos, q_pos), take_positions(sin, q_pos)))
        k = self.adapter.rotate(k, (take_positions(cos, vis), take_positions(sin, vis)))
        if n_kv != n_heads:
            k = k.repeat_interleave(n_heads // n_kv, dim=1)  # grouped-query attention: kv head g serves its group
        scores = attention_scores(q, k, head_dim**-0.5).squeeze(2)  # (B, H, V)
        logits = scores.mean(1)
        return logits.masked_fill(~batch.visual_valid.to(x.device), torch.finfo(logits.dtype).min)

    def config_dict(self, label_hash: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``rpn_config.json`` content: what the weights are for and how to read the logits."""
        n_heads, n_kv, head_dim = self.adapter.attention_geometry
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "base_model": base_fingerprint(self.adapter),
            "B": self.B,
            "R": self.R,
            "grid": GRID_CONVENTION,
            "query": "last prompt token (right before the answer)",
            "num_heads": n_heads,
            "num_kv_heads": n_kv,
            "head_dim": head_dim,
            "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
            "label_hash": label_hash,
            **(extra or {}),
        }

    def save(self, path: str | os.PathLike, label_hash: str | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``rpn.safetensors`` (RPN weights only) and ``rpn_config.json`` as directory ``path``.

        Both files go into a fresh sibling directory that then replaces ``path`` (under ``path``'s lock), so a
        crash or a concurrent writer never leaves weights and config from different runs side by side.
        """
        path = Path(path)
        tensors = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        cfg = self.config_dict(label_hash, extra)
        with atomic_path(path, directory=True) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, adapter: ModelAdapter, path: str | os.PathLike) -> RPN:
        """Rebuild the RPN on ``adapter`` from a checkpoint directory; refuses one made for another base model."""
        cfg = read_config(path)
        check_base(cfg["base_model"], adapter, where=f"RPN checkpoint {path}")
        rpn = cls.from_base(adapter, int(cfg["B"]), int(cfg["R"]))
        state = load_file(str(Path(path) / WEIGHTS_NAME))
        rpn.load_state_dict(state, strict=True)
        return rpn.to(adapter.device)


def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE-with-logits over tokens whose label is not -1 (and ``valid``), averaged over those tokens.

    With ``normalizer`` the sum is divided by it instead, so micro-batches and ranks can share the mean over a
    whole global batch. Ignored tokens are indexed out, so their gradient is exactly zero; no kept token gives 0.
    """
    keep = labels != -1
    if valid is not None:
        keep = keep & valid
    total = F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float(), reduction="sum")
    if normalizer is None:
        return total / keep.sum().clamp(min=1)
    return total / normalizer


def masked_mse(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error of sigmoid(logits) against soft targets in [0, 1] (the paper's "RPN regressing raw attention"
    ablation), over tokens whose target is not -1 (and ``valid``); normalised like :func:`masked_bce`."""
    keep = targets != -1
    if valid is not None:
        keep = keep & valid
    total = ((torch.sigmoid(logits[keep].float()) - targets[keep].float()) ** 2).sum()
    if normalizer is None:
        return total / keep.sum().clamp(min=1)
    return total / normalizer
