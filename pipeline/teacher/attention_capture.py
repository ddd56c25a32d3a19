"""Capture response->image attention rows and visual hidden-state norms in one truncated forward.

The model runs with its normal (SDPA) attention. At each requested layer a pre-hook on the
attention module recomputes only what labels need: queries of the response rows against all keys,
softmax over the whole causal key sequence, then the visual columns. The forward is cut right
after the deepest requested layer's hook, so no later layer, final norm or LM head runs and no
full attention matrix is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.attention_math import attention_probs, attention_scores
from pipeline.models.base import Batch, ModelAdapter


class _StopForward(Exception):
    """Raised from a hook to end the forward once everything needed is captured."""


@dataclass
class Captured:
    """Per-sample captures for a batch.

    attention: (B, L, V) head-mean, or (B, L, H, V) per head, averaged over the response rows.
    hidden_norm: (B, L, V) L2 norm of the visual tokens' hidden state entering each layer.
    n_rows: (B,) response rows that were averaged (0 leaves the attention all zero).
    """

    attention: torch.Tensor
    hidden_norm: torch.Tensor
    n_rows: torch.Tensor


def response_row_mask(
    batch: Batch,
    n_rows: int,
    include_eos: bool,
    eos_ids: list[int] | None = None,
    include_last_prompt: bool = False,
) -> torch.Tensor:
    """(B, n_rows) mask over the last ``n_rows`` positions: True where the row is a response query.

    The rows are the generated tokens as the model is fed them back during generation: every response token
    except the last one, whatever the last one is (an EOS, or the token that hit ``max_new_tokens``), each row
    weighing the same. That is the reference's rule (github YuHengsss/SD-RPN, commit 27ba877): its label
    script ``LLaVA/llava/eval/model_vqa_label.py`` registers its hooks once (L90), clears them per sample
    (L96) and generates with ``use_cache=True``, ``output_attentions=True``, ``max_new_tokens=128``
    (L117-129); the hook (``LLaVA/llava/ana_utils.py`` L35-56) appends the attention of every call of every
    layer's ``self_attn``. ``get_attn_weights_map`` (ana_utils.py L76-163) sets the prefill call (j == 0)
    apart (L124-135), takes query row 0 of each later call (L143-144), which is the token generated at the
    step before (``generate`` runs no forward after its last token, EOS or not), and averages those rows with
    equal weight (``np.mean`` over the calls, L154-157).

    ``include_eos`` (not the reference) also takes the last response token, so every response token is a row.
    ``include_last_prompt`` adds the last prompt token, the position that produced the first answer token (for
    one-word answers it is where the model reads the image; not the paper's default). ``eos_ids`` is unused
    (the rule no longer looks at the token; kept so older callers still work).
    """
    ids = batch.inputs["input_ids"]
    lens = batch.response_len.to(ids.device)
    keep = lens.clone() if include_eos else (lens - 1).clamp(min=0)
    offsets = torch.arange(n_rows, device=ids.device).unsqueeze(0)
    # Row r sits at sequence position S - n_rows + r; the response starts at row n_rows - lens.
    first = (n_rows - lens).unsqueeze(1)
    if include_last_prompt:
        first, keep = first - 1, keep + 1
    return (offsets >= first) & (offsets < first + keep.unsqueeze(1))


@torch.no_grad()
def capture_attention(
    adapter: ModelAdapter,
    batch: Batch,
    layers: list[int],
    per_head: bool = False,
    include_eos: bool = False,
    include_last_prompt: bool = False,
) -> Captured:
    """Run one truncated forward over prompt + response and capture what the label stage needs.

    The averaged rows are :func:`response_row_mask`'s: the response tokens but the last (the reference's
    rows), all of them with ``include_eos``, plus the last prompt token with ``include_last_prompt``.
    """
    if not layers:
        raise ValueError("capture_attention needs at least one layer")
    n_layers_model = len(adapter.decoder_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers_model]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {n_layers_model}-layer decoder")
    n_heads, n_kv, _ = adapter.attention_geometry
    bsz, n_vis = batch.visual_index.shape
    n_rows = max(int(batch.response_len.max().item()) + int(include_last_prompt), 1)
    row_mask = response_row_mask(batch, n_rows, include_eos, adapter.eos_token_ids, include_last_prompt)
    row_mask = row_mask.to(adapter.device)
    n_valid_rows = row_mask.sum(-1)
    pad_mask = batch.inputs["attention_mask"].bool().to(adapter.device)
    seq = pad_mask.shape[1]
    # Key j is visible to the row at position p iff it is real (not padding) and j <= p.
    query_pos = torch.arange(seq - n_rows, seq, device=adapter.device)
    causal = torch.arange(seq, device=adapter.device).unsqueeze(0) <= query_pos.unsqueeze(1)  # (R, S)
    key_ok = causal.unsqueeze(0) & pad_mask.unsqueeze(1)  # (B, R, S)

    shape = (bsz, len(layers), n_heads, n_vis) if per_head else (bsz, len(layers), n_vis)
    attention = torch.zeros(shape, dtype=torch.float32, device=adapter.device)
    hidden_norm = torch.zeros((bsz, len(layers), n_vis), dtype=torch.float32, device=adapter.device)
    vis_idx = batch.visual_index.to(adapter.device)
    order = {layer: i for i, layer in enumerate(layers)}
    deepest = max(layers)

    def layer_hook(module, args, kwargs, slot: int):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        vis = torch.gather(hidden, 1, vis_idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        hidden_norm[:, slot] = vis.float().norm(dim=-1)

    def attn_hook(module, args, kwargs, slot: int, layer: int):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        head_dim = module.head_dim
        q = module.q_proj(hidden[:, -n_rows:]).view(bsz, n_rows, -1, head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(bsz, seq, -1, head_dim).transpose(1, 2)
        q = adapter.rotate(q, (cos[..., -n_rows:, :], sin[..., -n_rows:, :]))
        k = adapter.rotate(k, (cos, sin))
        if n_kv != n_heads:
            k = k.repeat_interleave(n_heads // n_kv, dim=1)
        scores = attention_scores(q, k, module.scaling)  # (B, H, R, S)
        probs = attention_probs(scores, ~key_ok.unsqueeze(1))  # all-masked rows (padding) -> 0
        vis = torch.gather(probs, 3, vis_idx[:, None, None, :].expand(-1, probs.shape[1], n_rows, -1))
        vis = vis * row_mask[:, None, :, None]
        per_head_mean = vis.sum(2) / n_valid_rows.clamp(min=1)[:, None, None]  # (B, H, V)
        attention[:, slot] = per_head_mean if per_head else per_head_mean.mean(1)
        if layer == deepest:
            raise _StopForward

    handles = []
    try:
        for layer, slot in order.items():
            mod = adapter.decoder_layers[layer]
            handles.append(
                mod.register_forward_pre_hook(lambda m, a, k, s=slot: layer_hook(m, a, k, s), with_kwargs=True)
            )
            handles.append(
                mod.self_attn.register_forward_pre_hook(
                    lambda m, a, k, s=slot, li=layer: attn_hook(m, a, k, s, li), with_kwargs=True
                )
            )
        try:
            adapter.model(**adapter.forward_inputs(batch.to(adapter.device)), use_cache=False)
        except _StopForward:
            pass
        else:  # pragma: no cover - hooks always stop the forward
            raise RuntimeError("attention capture did not reach its deepest layer")
    finally:
        for h in handles:
            h.remove()
    valid = batch.visual_valid.to(adapter.device)  # per-sample grids: padded columns stay exactly 0
    attention *= valid[:, None, None, :] if per_head else valid[:, None, :]
    hidden_norm *= valid[:, None, :]
    return Captured(attention=attention, hidden_norm=hidden_norm, n_rows=n_valid_rows)
