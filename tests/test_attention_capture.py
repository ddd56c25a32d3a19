"""The dump's captured attention equals the eager full-attention computation of the same rows."""

from __future__ import annotations

import pytest
import torch

from pipeline.teacher.attention_capture import capture_attention, response_row_mask
from tests.conftest import random_images

# fp32 on CPU: the capture recomputes q.k in float32 and softmaxes over the same keys, so the only
# differences are summation order; 1e-6 absolute on probabilities of order 1/seq_len.
ATOL = 1e-6


def _eager_reference(model, adapter, batch, layers, rows_by_sample):
    """Full eager forward with output_attentions=True; the mean over the given rows x visual columns, by hand.

    ``rows_by_sample[i]`` lists sample i's rows as offsets from its first response token (-1 = the last prompt
    token); a sample without rows gets all-zero attention, as the capture leaves it.
    """
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**adapter.forward_inputs(batch), output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    seq = batch.inputs["input_ids"].shape[1]
    attn, norms = [], []
    for i, offsets in enumerate(rows_by_sample):
        start = seq - int(batch.response_len[i])
        rows = [start + k for k in offsets]
        vis = batch.visual_index[i]
        per_layer = []
        for layer in layers:
            a = out.attentions[layer][i][:, :, vis]  # (H, S, V)
            per_layer.append(a[:, rows].mean(1) if rows else torch.zeros_like(a[:, 0]))
        attn.append(torch.stack(per_layer))
        norms.append(torch.stack([out.hidden_states[layer][i][vis].norm(dim=-1) for layer in layers]))
    return torch.stack(attn), torch.stack(norms)


# Responses of uneven length (a left-padded batch): 0 and 2 end with EOS; 1 and 3 were cut by max_new_tokens
# (no EOS), 1 after a single token. Rows by hand, as offsets from the first response token: the reference
# feeds back every generated token but the last (EOS or not); include_eos takes the last one too;
# include_last_prompt prepends the last prompt token (-1).
EOS = -7  # replaced by the adapter's EOS id
RESPONSES = [[20, 21, EOS], [22], [20, 21, 22, 23, EOS], [24, 25]]
ROWS = {
    False: [[0, 1], [], [0, 1, 2, 3], [0]],
    True: [[0, 1, 2], [0], [0, 1, 2, 3, 4], [0, 1]],
}


@pytest.mark.parametrize("include_last_prompt", [False, True])
@pytest.mark.parametrize("include_eos", [False, True])
def test_capture_matches_eager(toy, adapter, include_eos, include_last_prompt):
    model, _ = toy
    eos = adapter.eos_token_ids[0]
    responses = [[eos if t == EOS else t for t in r] for r in RESPONSES]
    prompts = [adapter.render_prompt(q) for q in ["what is in the red box ?", "a b", "what colour is it ?", "box"]]
    batch = adapter.build_batch(random_images(4), prompts, responses)
    assert batch.inputs["attention_mask"].sum(1).unique().numel() > 1  # really padded
    rows = [([-1] if include_last_prompt else []) + r for r in ROWS[include_eos]]
    layers = [1, 3]
    kw = {"include_eos": include_eos, "include_last_prompt": include_last_prompt}
    cap = capture_attention(adapter, batch, layers, per_head=True, **kw)
    ref_attn, ref_norm = _eager_reference(model, adapter, batch, layers, rows)
    torch.testing.assert_close(cap.attention, ref_attn, atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.hidden_norm, ref_norm, atol=1e-5, rtol=1e-6)
    head_mean = capture_attention(adapter, batch, layers, per_head=False, **kw)
    torch.testing.assert_close(head_mean.attention, ref_attn.mean(2), atol=ATOL, rtol=0)
    assert head_mean.n_rows.tolist() == [len(r) for r in rows]
    if not rows[1]:
        assert (cap.attention[1] == 0).all()  # a one-token answer without the last prompt row has no row


def test_row_mask_drops_the_last_token_eos_or_not(adapter):
    """response_row_mask by hand: the last response token is never a row, whether or not it is an EOS."""
    eos = adapter.eos_token_ids[0]
    batch = adapter.build_batch(
        random_images(3), [adapter.render_prompt("a")] * 3, [[20, 21, eos], [20, 21, 22], [eos]]
    )
    got = response_row_mask(batch, 4, include_eos=False)
    want = [[False, True, True, False], [False, True, True, False], [False, False, False, False]]
    assert got.tolist() == want
    got = response_row_mask(batch, 4, include_eos=True)
    assert got.tolist() == [[False, True, True, True], [False, True, True, True], [False, False, False, True]]
    got = response_row_mask(batch, 4, include_eos=False, include_last_prompt=True)
    assert got.tolist() == [[True, True, True, False], [True, True, True, False], [False, False, True, False]]


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
    rows = [[-1, 0], [-1], [-1, 0, 1, 2]]
    ref_attn, _ = _eager_reference(model, adapter, batch, [2], rows)
    torch.testing.assert_close(cap.attention, ref_attn, atol=ATOL, rtol=0)
    assert cap.n_rows.tolist() == [2, 1, 4]
