"""The RPN: a fresh copy reproduces the base model's own q.k scores; masked loss; checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from pipeline.models import load_adapter, wrap_model
from pipeline.student.rpn import GRID_CONVENTION, RPN, CheckpointMismatch, masked_bce, take_positions
from tests.conftest import WORDS, random_images
from toymodels.llava import ToyLlavaSizes, build_toy_llava

QUESTIONS = ["what is in the red box ?", "what colour ?", "a b c d e f g h is the shape in the blue box ?"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: OpenMP's spinning threads cost 100x more than they help.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch(adapter):
    prompts = [adapter.render_prompt(q) for q in QUESTIONS]
    return adapter.build_batch(random_images(3), prompts)


@torch.no_grad()
def base_scores(adapter, batch, layer: int) -> torch.Tensor:
    """Head-mean q.k/sqrt(d) of the base model's own layer ``layer``, last prompt token -> visual tokens.

    Independent of the RPN: a hook on that layer's attention in the full model forward, transformers'
    own rotary and repeat_kv.
    """
    got = {}

    def hook(module, args, kwargs):
        got["h"], got["pe"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    attn = adapter.decoder_layers[layer].self_attn
    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.model(**adapter.forward_inputs(batch), use_cache=False)
    finally:
        handle.remove()
    h, (cos, sin) = got["h"], got["pe"]
    bsz, seq, _ = h.shape
    q = attn.q_proj(h).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = q @ k.transpose(-1, -2) / attn.head_dim**0.5  # (B, H, S, S)
    rows = scores[:, :, -1, :]  # left padding: the last prompt token is every row's last position
    vis = torch.gather(rows, 2, batch.visual_index[:, None, :].expand(-1, rows.shape[1], -1))
    return vis.mean(1)


@pytest.mark.parametrize(("B", "R"), [(1, 2), (0, 1), (1, 3)])
def test_fresh_rpn_reproduces_base_layer_scores(adapter, batch, B, R):
    """Before training the RPN is a copy: its logits are layer B+R-1's scores (GQA model, left padding)."""
    assert batch.inputs["attention_mask"].sum(1).unique().numel() == 3  # three lengths: real left padding
    rpn = RPN.from_base(adapter, B, R)
    with torch.no_grad():
        logits = rpn(batch)
    expected = base_scores(adapter, batch, B + R - 1)
    assert logits.shape == (3, 16) and logits.dtype == torch.float32
    # float32 throughout, only op order differs (gathered rows vs the full score matrix): observed max abs
    # difference ~1e-8 on scores of magnitude ~0.04; a neighbouring layer's scores differ by ~0.04.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-7)


def test_from_base_freezes_backbone_and_leaves_only_reachable_params_trainable(adapter):
    rpn = RPN.from_base(adapter, 1, 2)
    assert not any(p.requires_grad for p in adapter.model.parameters())
    trainable = {n for n, p in rpn.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("layers.0.")} == {
        n for n, _ in rpn.layers[0].named_parameters(prefix="layers.0")
    }
    assert {n for n in trainable if not n.startswith("layers.0.")} == {
        "layers.1.input_layernorm.weight",
        "layers.1.self_attn.q_proj.weight",
        "layers.1.self_attn.k_proj.weight",
    }
    assert set(rpn.state_dict()) >= {"norm.weight", "layers.1.mlp.up_proj.weight"}  # carried, not trained
    assert not any(k.startswith(("model.", "adapter")) for k in rpn.state_dict())
    with pytest.raises(ValueError, match="B \\+ R"):
        RPN.from_base(adapter, 3, 2)  # 4 decoder layers


def test_every_head_param_gets_a_gradient(adapter, batch):
    rpn = RPN.from_base(adapter, 1, 2)
    masked_bce(rpn(batch), torch.randint(0, 2, (3, 16))).backward()
    for name, p in rpn.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_masked_bce_ignores_tokens_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, requires_grad=True)
    labels = torch.tensor([[1, 0, -1, -1, 1, 0], [-1, 1, 0, -1, -1, -1]], dtype=torch.int8)
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    loss = masked_bce(logits, labels, valid)
    keep = (labels != -1) & valid
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], labels[keep].float())
    torch.testing.assert_close(loss, ref)  # the mean over kept tokens
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[~keep] == 0) and torch.all(grad[keep] != 0)

    # Ignored tokens' logits may be anything (even non-finite): loss and gradient do not move.
    other = logits.detach().clone()
    other[~keep] = torch.tensor([1e4, -3.0, float("inf"), float("nan"), 7.0, -1e30])
    other.requires_grad_(True)
    loss2 = masked_bce(other, labels, valid)
    (grad2,) = torch.autograd.grad(loss2, other)
    assert torch.equal(loss, loss2) and torch.equal(grad[keep], grad2[keep]) and torch.all(grad2[~keep] == 0)

    # No kept token: zero loss, zero gradient; a normalizer turns the mean into sum / normalizer.
    none = torch.full((2, 6), -1, dtype=torch.int8)
    assert masked_bce(logits, none).item() == 0.0
    torch.testing.assert_close(masked_bce(logits, labels, valid, normalizer=4.0), ref * keep.sum() / 4)


def test_rpn_ignored_tokens_get_zero_gradient(adapter, batch):
    """Through the whole RPN: the loss gradient w.r.t. logits is exactly 0 at ignored tokens."""
    rpn = RPN.from_base(adapter, 1, 2)
    logits = rpn(batch)
    logits.retain_grad()
    labels = torch.full((3, 16), -1, dtype=torch.int8)
    labels[:, :4], labels[:, -4:] = 1, 0
    masked_bce(logits, labels).backward()
    assert torch.all(logits.grad[:, 4:-4] == 0) and torch.all(logits.grad[:, :4] != 0)


def test_take_positions_handles_mrope_tables():
    torch.manual_seed(0)
    table = torch.randn(3, 2, 7, 4)  # M-RoPE: (sections, B, S, D)
    index = torch.tensor([[6, 0, 2], [1, 1, 5]])
    got = take_positions(table, index)
    assert got.shape == (3, 2, 3, 4)
    for b in range(2):
        assert torch.equal(got[:, b], table[:, b, index[b]])
    shared = torch.randn(1, 7, 4)  # one position row for the whole batch
    assert torch.equal(take_positions(shared, index)[1], shared[0, index[1]])


def test_checkpoint_round_trip_reproduces_logits(adapter, batch, tmp_path):
    rpn = RPN.from_base(adapter, 1, 2)
    with torch.no_grad():  # move away from the base copy so loading is really what restores it
        for p in rpn.parameters():
            p.add_(0.01 * torch.randn_like(p))
        before = rpn(batch)
    out = rpn.save(tmp_path / "ckpt", label_hash="abc123")
    assert sorted(p.name for p in out.iterdir()) == ["rpn.safetensors", "rpn_config.json"]  # no pickle
    cfg = json.loads((out / "rpn_config.json").read_text())
    assert (cfg["B"], cfg["R"], cfg["grid"], cfg["label_hash"], cfg["dtype"]) == (
        1,
        2,
        GRID_CONVENTION,
        "abc123",
        "float32",
    )
    assert cfg["base_model"]["model_id"] == "toy" and len(cfg["base_model"]["config_sha256"]) == 64
    assert set(load_file(str(out / "rpn.safetensors"))) == set(rpn.state_dict())

    loaded = RPN.load(adapter, out)
    with torch.no_grad():
        assert torch.equal(loaded(batch), before)


def test_checkpoint_loads_on_a_bf16_reload_and_refuses_other_models(adapter, toy_dir, tmp_path):
    out = RPN.from_base(adapter, 1, 2).save(tmp_path / "ckpt")
    reloaded = load_adapter(toy_dir, device="cpu", dtype="bfloat16")  # same model, other dtype and path
    assert RPN.load(reloaded, out).B == 1

    same_arch, proc = build_toy_llava(WORDS, ToyLlavaSizes(text_kv_heads=2), seed=1)
    with pytest.raises(CheckpointMismatch, match="other weights"):
        RPN.load(wrap_model(same_arch, proc, "toy-seed1"), out)
    other_arch, proc = build_toy_llava(WORDS, ToyLlavaSizes(text_kv_heads=4), seed=0)
    with pytest.raises(CheckpointMismatch, match="config fingerprint"):
        RPN.load(wrap_model(other_arch, proc, "toy-mha"), out)
    with pytest.raises(CheckpointMismatch, match="not an RPN checkpoint"):
        RPN.load(adapter, tmp_path)


def test_qwen_rpn_reproduces_base_layer_scores():
    """Same identity on Qwen2.5-VL: M-RoPE through adapter.rotate, GQA, per-sample grids (padded visual slots)."""
    toy_qwen = pytest.importorskip("toymodels.qwen")
    model, processor = toy_qwen.build_toy_qwen(WORDS)
    model.set_attn_implementation("sdpa")
    adapter = wrap_model(model, processor, "toy-qwen")
    batch = adapter.build_batch(random_images(3), [adapter.render_prompt(q) for q in QUESTIONS])
    valid = batch.visual_valid
    assert not valid.all()  # native resolution: grids differ, so some visual slots are padding
    rpn = RPN.from_base(adapter, 1, 2)
    with torch.no_grad():
        logits = rpn(batch)

    got = {}
    attn = adapter.decoder_layers[2].self_attn
    hook = attn.register_forward_pre_hook(
        lambda m, a, kw: got.update(h=kw["hidden_states"], pe=kw["position_embeddings"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            adapter.model(**adapter.forward_inputs(batch), use_cache=False)
    finally:
        hook.remove()
    h = got["h"]
    bsz, seq, _ = h.shape
    with torch.no_grad():
        q = adapter.rotate(attn.q_proj(h).view(bsz, seq, -1, attn.head_dim).transpose(1, 2), got["pe"])
        k = adapter.rotate(attn.k_proj(h).view(bsz, seq, -1, attn.head_dim).transpose(1, 2), got["pe"])
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        rows = (q @ k.transpose(-1, -2))[:, :, -1, :] / attn.head_dim**0.5
    expected = torch.gather(rows, 2, batch.visual_index[:, None, :].expand(-1, rows.shape[1], -1)).mean(1)
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-5, atol=1e-7)
    assert torch.all(logits[~valid] == torch.finfo(torch.float32).min)


def test_masked_mse_ignores_unlabelled_tokens():
    from pipeline.student.rpn import masked_mse

    logits = torch.tensor([[0.0, 2.0, -1.0]], requires_grad=True)
    targets = torch.tensor([[0.5, -1.0, 1.0]])
    loss = masked_mse(logits, targets)
    expected = ((torch.sigmoid(torch.tensor(0.0)) - 0.5) ** 2 + (torch.sigmoid(torch.tensor(-1.0)) - 1.0) ** 2) / 2
    assert torch.isclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0.0 and logits.grad[0, 2] != 0.0
