"""One training step's gradient is the global-batch mean BCE's whatever the micro-batch size, and the held-out
fg / bg accuracies count the right sign (issue 20, mutants 2 and 7)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.student.params import TrainParams
from pipeline.student.rpn import RPN
from pipeline.student.train import Sample, evaluate, label_arrays, make_micro, train_rpn
from tests.conftest import random_images

QUESTIONS = ["what is in the red box ?", "what colour is the shape ?", "what is in the blue box ?", "a b"]
ONE_STEP = TrainParams(B=1, R=2, lr=1e-3, epochs=1, global_batch=4, holdout_frac=0.0, log_every=0, save_every=100)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _labels(i: int) -> np.ndarray:
    """Sample i's labels: a different number of kept tokens per sample (2 + 3i), so a per-micro-batch mean
    weighs tokens differently from the global mean."""
    labels = np.full(16, -1, dtype=np.int8)
    kept = np.random.default_rng(i).permutation(16)[: 2 + 3 * i]
    labels[kept] = (np.arange(len(kept)) % 2).astype(np.int8)
    return labels


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[Sample]:
    root: Path = tmp_path_factory.mktemp("train-step")
    out = []
    for i, img in enumerate(random_images(4, seed=7)):
        img.save(root / f"{i}.png")
        out.append(Sample(f"s{i}", str(root / f"{i}.png"), QUESTIONS[i], _labels(i), (4, 4)))
    return out


def _first_step(adapter, samples, micro_batch, monkeypatch):
    """(gradients of the one step, its record): the gradients as train_rpn hands them to clip_grad_norm_."""
    grads = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    res = train_rpn(adapter, samples, replace(ONE_STEP, micro_batch=micro_batch), progress=False)
    assert len(grads) == len(res.records) == 1
    return grads[0], res.records[0]


@pytest.fixture(scope="module")
def reference(adapter, samples):
    """Gradient and loss of the mean BCE over the global batch's kept tokens, in one forward of all 4 samples."""
    rpn = RPN.from_base(adapter, ONE_STEP.B, ONE_STEP.R)
    rpn.train()
    mb = make_micro(adapter, samples, np.arange(len(samples)))
    logits = rpn(mb.batch)
    keep = (mb.labels != -1) & mb.batch.visual_valid
    assert int(keep.sum()) == sum(2 + 3 * i for i in range(4))
    loss = F.binary_cross_entropy_with_logits(logits[keep], mb.labels[keep].float())  # mean over kept tokens
    loss.backward()
    return [p.grad.detach().clone() for p in rpn.parameters() if p.requires_grad], float(loss.detach())


@pytest.mark.parametrize("micro_batch", [1, 2, 3, 4])
def test_step_gradient_does_not_depend_on_micro_batch(adapter, samples, reference, micro_batch, monkeypatch):
    want, want_loss = reference
    got, record = _first_step(adapter, samples, micro_batch, monkeypatch)
    assert len(got) == len(want)
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 1e-3  # a gradient worth comparing
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * scale, msg=lambda m, i=i: f"parameter {i}: {m}")
    assert record["loss"] == pytest.approx(want_loss, rel=1e-5)
    want_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in want])))
    assert record["grad_norm"] == pytest.approx(want_norm, rel=1e-4)


# --- held-out accuracy -------------------------------------------------------------------------------------

FG, BG = [5, 6, 9, 10], [0, 1, 2, 3, 12, 15]


class FixedLogits:
    """A stand-in RPN: the same logits for every sample of every micro-batch."""

    device = torch.device("cpu")

    def __init__(self, logits: list[float]):
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def __call__(self, batch):
        return self.logits.expand(batch.visual_index.shape[0], -1).clone()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list[Sample]:
    root: Path = tmp_path_factory.mktemp("held-out")
    labels = np.full(16, -1, dtype=np.int8)
    labels[FG], labels[BG] = 1, 0
    out = []
    for i, img in enumerate(random_images(3, seed=9)):
        img.save(root / f"{i}.png")
        out.append(Sample(f"h{i}", str(root / f"{i}.png"), QUESTIONS[i], labels, (4, 4)))
    return out


def _logits(fg: list[float], bg: list[float], ignored: float) -> list[float]:
    out = [ignored] * 16
    for j, v in zip(FG, fg, strict=True):
        out[j] = v
    for j, v in zip(BG, bg, strict=True):
        out[j] = v
    return out


def _bce(logits: list[float]) -> float:
    lab = torch.full((16,), -1.0)
    lab[FG], lab[BG] = 1.0, 0.0
    keep = lab != -1
    return float(F.binary_cross_entropy_with_logits(torch.tensor(logits)[keep], lab[keep]))


@pytest.mark.parametrize(
    ("fg", "bg", "fg_acc", "bg_acc"),
    [
        ([3.0, 2.0, 1.0, 0.5], [-1.0, -2.0, -0.5, -3.0, -1.0, -1.0], 1.0, 1.0),  # right side everywhere
        ([-3.0, -2.0, -1.0, -0.5], [1.0, 2.0, 0.5, 3.0, 1.0, 1.0], 0.0, 0.0),  # the sign flipped
        # sigmoid exactly 0.5 (logit 0) is bg: a fg miss, a bg hit; one fg below 0, one bg above
        ([2.0, 0.0, -1.0, 4.0], [-1.0, 0.0, 1.0, -2.0, -1.0, -1.0], 0.5, 5 / 6),
    ],
    ids=["right", "flipped", "boundary"],
)
def test_holdout_accuracy_by_hand(adapter, held_out, fg, bg, fg_acc, bg_acc):
    logits = _logits(fg, bg, ignored=7.0)  # ignored tokens (-1) count for neither
    params = replace(ONE_STEP, micro_batch=2)  # micro-batches of 2 and 1: the sums run over both
    got = evaluate(FixedLogits(logits), adapter, held_out, np.arange(3), params)
    assert got["holdout_fg_acc"] == pytest.approx(fg_acc, abs=1e-12)
    assert got["holdout_bg_acc"] == pytest.approx(bg_acc, abs=1e-12)
    assert got["holdout_loss"] == pytest.approx(_bce(logits), rel=1e-6)


def test_holdout_without_fg_tokens_is_none(adapter, held_out):
    only_bg = [replace(s, labels=np.where(s.labels == 1, -1, s.labels).astype(np.int8)) for s in held_out]
    got = evaluate(FixedLogits([-1.0] * 16), adapter, only_bg, np.arange(3), ONE_STEP)
    assert got["holdout_fg_acc"] is None and got["holdout_bg_acc"] == 1.0


# --- the no-assignment ablation: soft targets, mse objective ----------------------------------------------


def test_soft_targets_stay_soft_and_train_with_mse(adapter, samples, monkeypatch):
    """objective mse on float soft targets: the micro-batch keeps the fractions (not cast to int8), and the first
    step's loss is the mean squared error of sigmoid(logits) over the kept tokens, not a BCE."""
    soft = []
    for s in samples:
        target = np.where(s.labels == -1, -1.0, np.linspace(0.05, 0.95, 16)).astype(np.float32)
        soft.append(Sample(s.sample_id, s.image, s.question, target, s.grid))
    mb = make_micro(adapter, soft, np.arange(len(soft)))
    assert mb.labels.dtype == torch.float32
    keep = (mb.labels != -1) & mb.batch.visual_valid
    torch.testing.assert_close(
        mb.labels[keep], torch.from_numpy(np.concatenate([t.labels[t.labels != -1] for t in soft]))
    )

    rpn = RPN.from_base(adapter, ONE_STEP.B, ONE_STEP.R)
    with torch.no_grad():
        logits = rpn(mb.batch)
    want = float(((torch.sigmoid(logits[keep]) - mb.labels[keep]) ** 2).mean())
    res = train_rpn(adapter, soft, replace(ONE_STEP, objective="mse"), progress=False)
    assert res.records[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_label_arrays_keep_their_dtypes():
    """Tri-state labels stay int8 (a quarter of float32 for a store of millions of tokens), soft targets float32."""
    import pyarrow as pa

    table = pa.table(
        {
            "sample_id": ["a", "b"],
            "grid_h": [1, 2],
            "grid_w": [2, 1],
            "labels": pa.array([[1, -1], [0, 1]], pa.list_(pa.int8())),
            "soft_target": pa.array([[0.25, -1.0], [0.5, 1.0]], pa.list_(pa.float32())),
        }
    )
    labels, soft = label_arrays(table), label_arrays(table, "soft_target")
    assert [a.dtype for a in labels] == [np.int8] * 2 and [a.tolist() for a in labels] == [[1, -1], [0, 1]]
    assert [a.dtype for a in soft] == [np.float32] * 2 and [a.tolist() for a in soft] == [[0.25, -1.0], [0.5, 1.0]]


def test_states_are_saved_between_steps_not_after_the_last(adapter, samples, monkeypatch, tmp_path, capsys):
    """save_every 1 over two steps: one resumable state, after step 1 (the last step's result is the RPN itself);
    the log names each step out of the total."""
    import pipeline.student.train as train

    saved = []
    monkeypatch.setattr(train, "save_state", lambda path, rpn, opt, step, records: saved.append(step))
    params = replace(ONE_STEP, global_batch=2, save_every=1, log_every=1)
    train_rpn(adapter, samples, params, state_dir=tmp_path / "state", progress=False)
    assert saved == [1]
    out = capsys.readouterr()
    log = out.out + out.err
    assert "train: step 1/2 loss " in log and "train: step 2/2 loss " in log
