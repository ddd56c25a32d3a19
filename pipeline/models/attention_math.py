"""Query-key attention arithmetic shared by the teacher's capture, the RPN head and the embedded model's trainer.

One definition of the float32 casts and the op order, so the three agree bit for bit: the scores are
``(q . k^T) * scaling`` with q and k cast to float32 before the product, the probabilities a softmax over
the keys after the hidden keys are set to -inf.
"""

from __future__ import annotations

import torch


def attention_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled dot products in float32: q (..., R, d), k (..., S, d) -> (..., R, S)."""
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling


def attention_probs(scores: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last (key) axis; ``hidden`` (True = key not visible, broadcast to ``scores``) gets -inf.

    A row whose every key is hidden (a padding query) comes out as zeros, not NaN.
    """
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if probs.requires_grad:  # autograd keeps softmax's output for its backward: it must not be edited in place
        return torch.nan_to_num(probs, nan=0.0)
    return probs.nan_to_num_(0.0)
