"""RPN training: learns hand-made labels, leaves the backbone untouched, resumes, and matches under 2-process DDP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pipeline.models import wrap_model
from pipeline.student.params import TrainParams
from pipeline.student.rpn import RPN
from pipeline.student.train import Sample, join_samples, lr_at, make_micro, split_holdout, train_rpn
from tests.conftest import WORDS, random_images
from toymodels.llava import ToyLlavaSizes, build_toy_llava

FG = [5, 6, 9, 10]  # the centre of the 4x4 grid
BG = [0, 1, 2, 3, 12, 15]
QUESTIONS = ["what is in the red box ?", "what colour is the shape ?", "what is in the blue box ?"]
FAST = TrainParams(B=1, R=2, lr=3e-3, global_batch=4, micro_batch=2, holdout_frac=0.0, save_every=100, log_every=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: OpenMP's spinning threads cost 100x more than they help.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_adapter():
    """A fresh copy of conftest's `adapter` model (same seed, same weights), for runs that must not share one."""
    model, processor = build_toy_llava(WORDS, ToyLlavaSizes(text_kv_heads=2), seed=0)
    model.set_attn_implementation("sdpa")
    return wrap_model(model, processor, "toy")


def hand_labels() -> np.ndarray:
    labels = np.full(16, -1, dtype=np.int8)
    labels[FG], labels[BG] = 1, 0
    return labels


def make_samples(root: Path, n: int) -> list[Sample]:
    out = []
    for i, img in enumerate(random_images(n, seed=3)):
        img.save(root / f"{i}.png")
        out.append(Sample(f"s{i}", str(root / f"{i}.png"), QUESTIONS[i % 3], hand_labels(), (4, 4)))
    return out


def test_training_learns_hand_labels_and_leaves_backbone_bit_identical(adapter, tmp_path):
    samples = make_samples(tmp_path, 8)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    res = train_rpn(adapter, samples, replace(FAST, epochs=25, holdout_frac=0.25), progress=False)

    losses = [r["loss"] for r in res.records]
    assert len(losses) == 50  # 6 training samples, global batch 4: 2 steps an epoch
    assert np.mean(losses[-4:]) < 0.4 * np.mean(losses[:4])
    train_idx, hold_idx = split_holdout(8, 0.25, FAST.seed)
    with torch.no_grad():
        logits = res.rpn(make_micro(adapter, samples, train_idx).batch)
    assert torch.all(logits[:, FG].min(1).values > logits[:, BG].max(1).values)  # every fg above every bg
    m = res.metrics
    assert (m["n_train"], m["n_holdout"], m["n_skipped"], m["steps"]) == (6, 2, 0, 50)
    for key in ("holdout_loss", "holdout_fg_acc", "holdout_bg_acc"):  # 2 unseen noise images: no claim on values
        assert m[key] is not None and np.isfinite(m[key])

    after = adapter.model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # the frozen backbone never moves


def test_lr_schedule_warms_up_then_decays_to_zero():
    p = TrainParams(lr=1.0, warmup_frac=0.1)
    lrs = [lr_at(s, 100, p) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert lrs[10] == 1.0 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 1e-3


def _labels_table(ids, grids, labels, kept) -> pa.Table:
    return pa.table(
        {
            "sample_id": ids,
            "grid_h": pa.array([g[0] for g in grids], pa.int32()),
            "grid_w": pa.array([g[1] for g in grids], pa.int32()),
            "labels": pa.array(labels, pa.list_(pa.int8())),
            "kept": kept,
        }
    )


def test_join_samples_counts_skips_and_names_missing_samples(tmp_path):
    manifest = pa.table({"sample_id": ["a", "b", "c"], "image": ["a.png", "b.png", "c.png"], "question": ["x"] * 3})
    labels = _labels_table(["a", "b", "c"], [(1, 2), (2, 2), (1, 1)], [[1, 0], [-1, 1, 0, 0], [1]], [True, False, True])
    samples, skipped = join_samples(manifest, labels)
    assert skipped == 1 and [s.sample_id for s in samples] == ["a", "c"]
    assert samples[0].labels.tolist() == [1, 0] and samples[0].grid == (1, 2) and samples[0].image == "a.png"
    with pytest.raises(ValueError, match="'zz'"):
        join_samples(manifest, _labels_table(["a", "zz"], [(1, 1)] * 2, [[1], [0]], [True, True]))
    with pytest.raises(ValueError, match="grid_h\\*grid_w.*'a'"):
        join_samples(manifest, _labels_table(["a"], [(2, 2)], [[1, 0]], [True]))


def test_labels_for_another_grid_are_refused(adapter, tmp_path):
    (sample,) = make_samples(tmp_path, 1)
    bad = replace(sample, labels=np.zeros(4, np.int8), grid=(2, 2))
    with pytest.raises(ValueError, match="sample s0: labels are on a 2x2 grid but the model makes 4x4"):
        make_micro(adapter, [bad], np.arange(1))


class Crash(Exception):
    pass


def test_resume_after_interruption_ends_with_the_same_weights(adapter, tmp_path):
    samples = make_samples(tmp_path, 8)
    params = replace(FAST, epochs=3, save_every=2)  # 2 steps an epoch, 6 in all, states after steps 2 and 4
    ref = train_rpn(adapter, samples, params, progress=False)

    def crash(step, record):
        if step == 5:
            raise Crash

    state = tmp_path / "state"
    with pytest.raises(Crash):
        train_rpn(adapter, samples, params, state_dir=state, progress=False, on_step=crash)
    assert torch.load(state / "state.pt", weights_only=True)["step"] == 4
    ran = []
    res = train_rpn(adapter, samples, params, state_dir=state, progress=False, on_step=lambda s, r: ran.append(s))
    assert ran == [5, 6]  # continued from the last saved step, redoing only step 5
    assert [r["loss"] for r in res.records] == [r["loss"] for r in ref.records]
    for k, v in ref.rpn.state_dict().items():
        assert torch.equal(res.rpn.state_dict()[k], v), k


def _ddp_worker(rank: int, world: int, root: str, samples: list[Sample], params: TrainParams) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        res = train_rpn(toy_adapter(), samples, params, progress=False)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in res.rpn.state_dict().items()}, f"{root}/ddp.safetensors")
            Path(root, "ddp.json").write_text(json.dumps({"metrics": res.metrics, "records": res.records}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    """Same global batch on 1 and on 2 ranks: same weights up to float summation order.

    9 samples, 4 held out, 5 trained at global batch 4: steps of 4 (2 per rank) and 1 (rank 1 gets none and
    contributes a zero-weight sample), twice. Tolerance 1e-6 absolute on weights of magnitude up to ~1: here
    the micro-batches happen to coincide and the weights come out bit-identical; with other splits (e.g.
    micro_batch 1) padding and summation order differ and the observed gap is ~1e-7.
    """
    samples = make_samples(tmp_path, 9)
    params = replace(FAST, epochs=2, holdout_frac=0.45)
    single = train_rpn(toy_adapter(), samples, params, progress=False)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), samples, params), nprocs=2, join=True)

    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    out = json.loads((tmp_path / "ddp.json").read_text())
    ref = single.rpn.state_dict()
    assert ddp.keys() == ref.keys()
    fresh = RPN.from_base(toy_adapter(), params.B, params.R).state_dict()
    assert (
        max(float((ref[k] - fresh[k]).abs().max()) for k in ref) > 1e-3
    )  # training moved them far beyond the tolerance
    for k, v in ref.items():
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-6, msg=k)
    assert out["metrics"]["world_size"] == 2 and single.metrics["world_size"] == 1
    assert [r["samples"] for r in out["records"]] == [4, 1, 4, 1]
    np.testing.assert_allclose([r["loss"] for r in out["records"]], [r["loss"] for r in single.records], rtol=1e-5)
    for key in ("holdout_loss", "holdout_fg_acc", "holdout_bg_acc"):
        assert out["metrics"][key] == pytest.approx(single.metrics[key], rel=1e-5)
