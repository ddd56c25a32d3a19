"""Stage 2 reuses what stage 1 computed over the prompt's shared prefix (SPEC 3.5; an optimisation, exact).

A stage-1 row and its stage-2 row begin alike: the chat template's opening and the original image's tokens.
Stage 1 has already run the vision tower and the frozen decoder layers ``0..B-1`` over that prefix, so stage 2

1. takes layers ``0..B-1``'s keys and values for the prefix from stage 1's cache,
2. runs only layers ``B..L-1`` over the prefix, from the layer-``B`` inputs stage 1 captured,
3. prefills just the suffix (the crops' tokens and the question) on top of that cache, then decodes greedily.

The original image is never encoded twice and the prefix never goes through the first ``B`` layers again.
Keys carry their rotary positions, and LLaVA's positions count real tokens from the row's first one, so a
prefix's keys are the same whatever padding surrounds it: the stage-2 layout puts each prefix at the end of a
left-padded block and each suffix at the end of the row (padding in between), and positions come from the
padding mask as generate() derives them. Families with their own position scheme (Qwen2.5-VL's M-RoPE) say
``supports_prefix_reuse = False`` and take the plain stage 2.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from pipeline.models.base import Batch, ModelAdapter, Stage2Inputs


@dataclass
class PrefixState:
    """What stage 1 leaves for stage 2: its rows, layers ``0..B-1``'s cache and layer ``B``'s inputs.

    ``prefix_end`` (n,) is each row's first column after the original image's tokens (stage-1 layout).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Any  # transformers Cache holding layers 0..B-1 over the whole stage-1 rows
    hidden: torch.Tensor  # (n, T1, D) inputs of decoder layer B
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), (n or 1, T1, d)
    prefix_end: torch.Tensor
    B: int


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword a transformers forward takes its KV cache by (``cache`` since 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def prefix_state(adapter: ModelAdapter, batch: Batch, B: int, hidden: torch.Tensor, layer_kwargs: dict) -> PrefixState:
    """Package a stage-1 backbone run (made with a cache) for :func:`prefix_generate_inputs`."""
    cache = layer_kwargs.get("cache", layer_kwargs.get("past_key_values"))
    if cache is None:
        raise ValueError("the stage-1 backbone ran without a cache; run it with keep_cache=True")
    return PrefixState(
        input_ids=batch.inputs["input_ids"],
        attention_mask=batch.inputs["attention_mask"],
        cache=cache,
        hidden=hidden,
        position_embeddings=layer_kwargs["position_embeddings"],
        prefix_end=adapter.prefix_end(batch),
        B=B,
    )


def _gather_columns(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-row sequence gather: out[b, ..., c, ...] = x[b, ..., index[b, c], ...] along ``dim`` (batch on axis 0)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    idx = index.view(shape).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(x.shape)])
    return torch.gather(x, dim, idx)


@torch.no_grad()
def prefix_generate_inputs(adapter: ModelAdapter, state: PrefixState, inputs: Stage2Inputs) -> dict[str, Any]:
    """generate() keyword arguments for ``inputs`` (a plain stage-2 batch of the same rows) on a prefilled cache.

    Checks that each stage-2 row really begins with its stage-1 prefix; the embeddings of ``inputs`` over the
    prefix are never read (the original image may be left unencoded there).
    """
    dev = state.hidden.device
    n = state.input_ids.shape[0]
    if inputs.input_ids.shape[0] != n:
        raise ValueError(f"{inputs.input_ids.shape[0]} stage-2 rows for {n} stage-1 rows")
    pad1 = (state.attention_mask == 0).sum(1)  # stage-1 rows are left-padded
    plen = (state.prefix_end.to(dev) - pad1.to(dev)).tolist()
    real2 = [m.bool() for m in inputs.attention_mask]
    suffix_len = []
    for i in range(n):
        first = state.input_ids[i, int(pad1[i]) : int(pad1[i]) + plen[i]]
        second = inputs.input_ids[i][real2[i]]
        if len(second) < plen[i] or not torch.equal(second[: plen[i]].to(first.device), first):
            raise ValueError(f"batch row {i}: the stage-2 prompt does not begin with the stage-1 prefix")
        suffix_len.append(len(second) - plen[i])
    P, S = max(plen), max(suffix_len)

    # Stage-1 column feeding stage-2 prefix column c of row i (pads point at column 0 and stay masked).
    col = torch.arange(P, device=dev)[None].expand(n, -1)
    lead = torch.tensor([P - p for p in plen], device=dev)[:, None]
    prefix_mask = col >= lead
    src = torch.where(prefix_mask, pad1.to(dev)[:, None] + col - lead, 0)

    kw = cache_kwarg(adapter.model)
    cache = DynamicCache(config=adapter.model.config)
    for layer in range(state.B):
        old = state.cache.layers[layer]
        cache.update(_gather_columns(old.keys, src, 2), _gather_columns(old.values, src, 2), layer)
    h = _gather_columns(state.hidden, src, 1)
    cos, sin = (_gather_columns(t.expand(n, *t.shape[1:]), src, 1) for t in state.position_embeddings)
    # Causal over the prefix, blind to its padding; a pad row sees itself so no softmax row is empty.
    allowed = (col[:, None, :] <= col[:, :, None]) & prefix_mask[:, None, :]
    allowed = allowed | torch.eye(P, dtype=torch.bool, device=dev)[None]
    neg = torch.finfo(h.dtype).min
    mask4d = torch.zeros(allowed.shape, dtype=h.dtype, device=dev).masked_fill(~allowed, neg)[:, None]
    positions = (prefix_mask.long().cumsum(-1) - 1).clamp(min=0)
    layer_kw = {
        "attention_mask": mask4d,
        "position_ids": positions,
        "position_embeddings": (cos, sin),
        "use_cache": True,
        cache_kwarg(adapter.decoder_layers[state.B]): cache,
    }
    for layer in adapter.decoder_layers[state.B :]:
        out = layer(h, **layer_kw)
        h = out[0] if isinstance(out, tuple) else out

    # Rows: [pad | prefix] (P columns, cached) then [pad | suffix] (S columns, prefilled by generate()).
    embeds = inputs.inputs_embeds
    full = embeds.new_zeros((n, P + S, embeds.shape[-1]))
    mask = torch.zeros((n, P + S), dtype=inputs.attention_mask.dtype, device=dev)
    mask[:, :P] = prefix_mask.to(mask.dtype)
    for i in range(n):
        suffix = embeds[i][real2[i]][plen[i] :]
        if suffix_len[i]:
            full[i, P + S - suffix_len[i] :] = suffix.to(dev)
            mask[i, P + S - suffix_len[i] :] = 1
    return {"inputs_embeds": full, "attention_mask": mask, kw: cache}
