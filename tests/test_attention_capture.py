"""The dump's captured attention equals the eager full-attention computation of the same rows."""

from __future__ import annotations

import pytest
import torch

from pipeline.teacher.attention_capture import capture_attention
from tests.conftest import random_images

# fp32 on CPU: the capture recomputes q.k in float32 and softmaxes over the same keys, so the only
# differences are summation order; 1e-6 absolute on probabilities of order 1/seq_len.
ATOL = 1e-6


def _eager_reference(model, adapter, batch, layers, include_eos, include_last_prompt=False):
    """Full eager forward with output_attentions=True; slice response rows x visual columns by hand."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**adapter.forward_inputs(batch), output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    seq = batch.inputs["input_ids"].shape[1]
    eos = set(adapter.eos_token_ids)
    attn, norms = [], []
    for i in range(batch.visual_index.shape[0]):
        n_resp = int(batch.response_len[i])
        ids = batch.inputs["input_ids"][i].tolist()
        n_rows = n_resp - (1 if (not include_eos and n_resp and ids[-1] in eos) else 0)
        rows = list(range(seq - n_resp, seq - n_resp + n_rows))
        if include_last_prompt:
            rows = [seq - n_resp - 1, *rows]
        vis = batch.visual_index[i]
        per_layer = [out.attentions[layer][i][:, rows][:, :, vis].mean(1) for layer in layers]  # (H, V)
        attn.append(torch.stack(per_layer))
        norms.append(torch.stack([out.hidden_states[layer][i][vis].norm(dim=-1) for layer in layers]))
    return torch.stack(attn), torch.stack(norms)


@pytest.mark.parametrize("include_eos", [False, True])
def test_capture_matches_eager(toy, adapter, include_eos):
    model, _ = toy
    eos = adapter.eos_token_ids[0]
    # uneven responses (padding), with and without a final EOS
    responses = [[20, 21, eos], [22], [20, 21, 22, 23, eos], [24, 25]]
    prompts = [adapter.render_prompt(q) for q in ["what is in the red box ?", "a b", "what colour is it ?", "box"]]
    batch = adapter.build_batch(random_images(4), prompts, responses)
    layers = [1, 3]
    cap = capture_attention(adapter, batch, layers, per_head=True, include_eos=include_eos)
    ref_attn, ref_norm = _eager_reference(model, adapter, batch, layers, include_eos)
    torch.testing.assert_close(cap.attention, ref_attn, atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.hidden_norm, ref_norm, atol=1e-5, rtol=1e-6)
    head_mean = capture_attention(adapter, batch, layers, per_head=False, include_eos=include_eos)
    torch.testing.assert_close(head_mean.attention, ref_attn.mean(2), atol=ATOL, rtol=0)
    expected_rows = [2, 1, 4, 2] if not include_eos else [3, 1, 5, 2]
    assert head_mean.n_rows.tolist() == expected_rows


def test_capture_stops_after_deepest_layer(adapter):
    """Layers past the deepest requested one, the final norm and the LM head never run."""
    ran = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, layer in enumerate(adapter.decoder_layers)
    ]
    head = adapter.model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    try:
        batch = adapter.build_batch(random_images(2), [adapter.render_prompt("a b")] * 2, [[20, 21], [22]])
        capture_attention(adapter, batch, [1])
    finally:
        for h in [*handles, head]:
            h.remove()
    assert ran == [0], ran  # layer 0 completes; layer 1 stops inside its attention pre-hook


def test_capture_rejects_bad_layers(adapter):
    batch = adapter.build_batch(random_images(1), [adapter.render_prompt("a")], [[20]])
    with pytest.raises(ValueError, match="out of range"):
        capture_attention(adapter, batch, [99])


def test_capture_with_last_prompt_row_matches_eager(toy, adapter):
    model, _ = toy
    eos = adapter.eos_token_ids[0]
    responses = [[20, eos], [22], [20, 21, 22, eos]]
    prompts = [adapter.render_prompt(q) for q in ["what is in the red box ?", "a b", "box"]]
    batch = adapter.build_batch(random_images(3), prompts, responses)
    cap = capture_attention(adapter, batch, [2], per_head=True, include_last_prompt=True)
    ref_attn, _ = _eager_reference(model, adapter, batch, [2], include_eos=False, include_last_prompt=True)
    torch.testing.assert_close(cap.attention, ref_attn, atol=ATOL, rtol=0)
    assert cap.n_rows.tolist() == [2, 2, 4]
