"""The shared q.k attention arithmetic against a plain per-element reference: any leading shape, hidden keys,
and a padding query whose every key is hidden (zeros, not NaN, with and without autograd)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.attention_math import attention_probs, attention_scores


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_scores_any_leading_shape(lead):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*lead, 4, 5, generator=g, dtype=torch.float64).to(torch.bfloat16)
    k = torch.randn(*lead, 6, 5, generator=g, dtype=torch.float64).to(torch.bfloat16)
    got = attention_scores(q, k, 0.5)
    assert got.dtype == torch.float32 and got.shape == (*lead, 4, 6)
    qf, kf = q.double().reshape(-1, 4, 5), k.double().reshape(-1, 6, 5)
    want = torch.tensor(
        [
            [[sum(qf[b, r, d] * kf[b, s, d] for d in range(5)) * 0.5 for s in range(6)] for r in range(4)]
            for b in range(len(qf))
        ]
    ).reshape(*lead, 4, 6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_probs_with_hidden_keys_and_a_padding_query(grad):
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0], [4.0, 4.0, 4.0]], requires_grad=grad)
    hidden = torch.tensor([[False, False, True], [False, False, False], [True, True, True]])
    got = attention_probs(scores, hidden)
    e1, e2 = math.exp(1.0), math.exp(2.0)
    assert got[0].tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2), 0.0])
    assert got[1].sum().item() == pytest.approx(1.0) and got[1, 2].item() > 0.99
    assert got[2].tolist() == [0.0, 0.0, 0.0]  # every key hidden: zeros, not NaN
    if grad:
        got[0, 0].backward()
        assert torch.isfinite(scores.grad).all()
