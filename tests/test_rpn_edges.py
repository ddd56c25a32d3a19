"""RPN pieces mutation testing found unpinned: the soft-target loss of the no-assignment ablation by hand, the
refusal message of a checkpoint made for another model, the KV-cache keys the copied layers never see, and the
exact ``rpn_config.json`` content."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import wrap_model
from pipeline.student.rpn import (
    GRID_CONVENTION,
    RPN,
    CheckpointMismatch,
    base_fingerprint,
    check_base,
    masked_mse,
    without_cache,
)
from tests.conftest import WORDS
from toymodels.llava import ToyLlavaSizes, build_toy_llava


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_masked_mse_by_hand():
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]])
    targets = torch.tensor([[0.5, -1.0, 1.0, 0.25]])
    valid = torch.tensor([[True, True, True, False]])
    sq = (_sig(0.0) - 0.5) ** 2 + (_sig(2.0) - 1.0) ** 2  # token 1 is ignored (-1), token 3 is not valid
    assert masked_mse(logits, targets, valid).item() == pytest.approx(sq / 2)
    assert masked_mse(logits, targets, valid, normalizer=4.0).item() == pytest.approx(sq / 4)
    assert masked_mse(logits, targets).item() == pytest.approx((sq + (_sig(-1.0) - 0.25) ** 2) / 3)
    one = masked_mse(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    assert one.item() == pytest.approx(0.25)  # one kept token: divided by 1
    assert masked_mse(logits, torch.full_like(targets, -1.0)).item() == 0.0  # nothing kept: 0, not NaN


def test_another_models_checkpoint_is_refused_by_name(adapter):
    saved = base_fingerprint(adapter)
    other, proc = build_toy_llava(WORDS, ToyLlavaSizes(text_kv_heads=4), seed=0)
    now = base_fingerprint(wrap_model(other, proc, "toy-mha"))
    want = (
        f"release was trained on base model 'toy', this model is 'toy-mha': base config fingerprint "
        f"{saved['config_sha256'][:12]} != {now['config_sha256'][:12]}; refusing"
    )
    with pytest.raises(CheckpointMismatch) as err:
        check_base(saved, wrap_model(other, proc, "toy-mha"), where="release")
    assert str(err.value).startswith(want)
    with pytest.raises(CheckpointMismatch, match=r"base model None, this model is 'toy': base config fingerprint \? "):
        check_base({}, adapter)


def test_copied_layers_never_see_the_cache():
    kwargs = {"cache": 1, "past_key_values": 2, "use_cache": True, "attention_mask": 3, "position_embeddings": 4}
    assert without_cache(kwargs) == {"attention_mask": 3, "position_embeddings": 4}


def test_rpn_config_content(adapter):
    rpn = RPN.from_base(adapter, 1, 2)
    n_heads, n_kv, head_dim = adapter.attention_geometry
    cfg = rpn.config_dict("abc", extra={"inference": {"tau": 0.2}})
    assert cfg == {
        "format": cfg["format"],
        "version": cfg["version"],
        "base_model": base_fingerprint(adapter),
        "B": 1,
        "R": 2,
        "grid": GRID_CONVENTION,
        "query": "last prompt token (right before the answer)",
        "num_heads": n_heads,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "dtype": "float32",
        "label_hash": "abc",
        "inference": {"tau": 0.2},
    }
    assert isinstance(cfg["format"], str) and isinstance(cfg["version"], int)
