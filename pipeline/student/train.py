"""Training the RPN on the label artifact: a plain nanoGPT-style loop, resumable, DDP under ``torchrun``.

One optimizer step consumes one global batch of ``global_batch`` samples whatever the world size: each rank
takes a contiguous, disjoint shard of it and accumulates gradients over micro-batches of ``micro_batch``.
The loss of a step is the BCE summed over the global batch's kept tokens divided by their count, so the
gradient is the same for any world size or micro-batch size (up to float summation order).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from pipeline.distributed import DistInfo, all_reduce, dist_info
from pipeline.io.images import load_images
from pipeline.io.locks import atomic_path
from pipeline.models.base import Batch, ModelAdapter
from pipeline.student.params import TrainParams
from pipeline.student.rpn import RPN, masked_bce, masked_mse

STATE_NAME = "state.pt"
PLOT_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm")


@dataclass
class Sample:
    """One kept training sample: where its image is, its question, and its row-major labels."""

    sample_id: str
    image: str
    question: str
    labels: np.ndarray  # (grid_h * grid_w,): int8 in {-1, 0, 1}, or float32 a / a_max targets (objective mse)
    grid: tuple[int, int]

    @property
    def n_labelled(self) -> int:
        return int(np.count_nonzero(self.labels != -1))


def label_arrays(labels: pa.Table, column: str = "labels") -> list[np.ndarray]:
    """Each row's per-token values (``labels`` int8, or ``soft_target`` float32), checked against grid_h * grid_w."""
    if column not in labels.column_names or labels.column(column).null_count == labels.num_rows:
        raise ValueError(f"labels: no {column!r} column; set label.soft_targets for the mse objective")
    col = labels.column(column).combine_chunks()
    sizes = labels.column("grid_h").to_numpy().astype(np.int64) * labels.column("grid_w").to_numpy()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != sizes)
    if len(bad):
        ids = [labels.column("sample_id")[int(i)].as_py() for i in bad[:5]]
        raise ValueError(f"labels: label count != grid_h*grid_w for sample(s) {ids}")
    dtype = np.int8 if column == "labels" else np.float32
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []


def join_samples(manifest: pa.Table, labels: pa.Table, soft: bool = False) -> tuple[list[Sample], int]:
    """Kept samples with their image and question from the manifest, and how many were not kept.

    ``soft`` takes the per-token ``soft_target`` values instead of the tri-state labels (objective mse).

    A label whose sample is not in the manifest is an error naming it (the two come from different runs).
    """
    by_id = dict(
        zip(
            manifest.column("sample_id").to_pylist(),
            zip(manifest.column("image").to_pylist(), manifest.column("question").to_pylist(), strict=True),
            strict=True,
        )
    )
    ids = labels.column("sample_id").to_pylist()
    missing = [s for s in ids if s not in by_id]
    if missing:
        raise ValueError(
            f"labels: sample(s) {missing[:5]} ({len(missing)} in all) are not in the manifest; "
            "were labels and manifest made by different runs?"
        )
    kept = labels.column("kept").to_numpy(zero_copy_only=False)
    arrays = label_arrays(labels, "soft_target" if soft else "labels")
    gh, gw = labels.column("grid_h").to_pylist(), labels.column("grid_w").to_pylist()
    samples = [
        Sample(ids[i], by_id[ids[i]][0], by_id[ids[i]][1], arrays[i], (gh[i], gw[i])) for i in np.flatnonzero(kept)
    ]
    return samples, int(len(ids) - len(samples))


# --- distributed -------------------------------------------------------------------------------------------


# --- schedule, data plan -----------------------------------------------------------------------------------


def cosine_lr(
    step: int, total: int, base_lr: float, warmup: int, floor: float = 0.0, peak_in_warmup: bool = False
) -> float:
    """Learning rate of 0-based ``step``: linear warmup over ``warmup`` steps, then cosine from ``base_lr`` down to
    ``floor * base_lr`` at step ``total``.

    The warmup is nanoGPT's ``base_lr * (it + 1) / (warmup + 1)``; ``peak_in_warmup`` makes it
    ``base_lr * ((it + 1) / warmup)`` instead, which reaches ``base_lr`` on the last warmup step (the embedded
    model's recipe). Each form keeps its callers' rounding order: they can differ in the last bit.
    """
    if step < warmup:
        return base_lr * ((step + 1) / warmup) if peak_in_warmup else base_lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def lr_at(step: int, total: int, params: TrainParams) -> float:
    """Learning rate of 0-based ``step``: linear warmup (nanoGPT's (it+1)/(warmup+1)), then cosine to 0."""
    return cosine_lr(step, total, params.lr, math.ceil(params.warmup_frac * total))


def split_holdout(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) sample positions: a seeded permutation, the first round(frac * n) held out."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = min(round(frac * n), max(n - 1, 0))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


@dataclass
class Plan:
    """Which samples each step uses: a fresh seeded order per epoch, global batches cut from it."""

    train_idx: np.ndarray
    params: TrainParams
    steps_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps_per_epoch = math.ceil(len(self.train_idx) / self.params.global_batch)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.params.epochs

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            rng = np.random.default_rng([self.params.seed, epoch + 1])
            self._orders[epoch] = self.train_idx[rng.permutation(len(self.train_idx))]
        g = self.params.global_batch
        return self._orders[epoch][i * g : (i + 1) * g]

    def micro_batches(self, step: int, info: DistInfo) -> list[tuple[np.ndarray, float]]:
        """This rank's micro-batches of ``step`` as (sample positions, loss weight).

        A rank left without samples (a last batch smaller than the world) runs one sample at weight 0, so
        every rank still takes part in DDP's gradient all-reduce.
        """
        idx = self.global_batch(step)
        shard = np.array_split(idx, info.world)[info.rank]
        if len(shard) == 0:
            return [(idx[:1], 0.0)]
        mb = self.params.micro_batch
        return [(shard[i : i + mb], 1.0) for i in range(0, len(shard), mb)]


@dataclass
class MicroBatch:
    batch: Batch
    labels: torch.Tensor  # (b, V) int8, -1 past each sample's visual tokens
    weight: float

    def to(self, device: torch.device) -> MicroBatch:
        self.batch = self.batch.to(device)
        self.labels = self.labels.to(device)
        return self


def make_micro(adapter: ModelAdapter, samples: list[Sample], idx: np.ndarray, weight: float = 1.0) -> MicroBatch:
    """Load images, build the model batch and the matching padded label tensor."""
    chosen = [samples[int(i)] for i in idx]
    images = load_images([s.image for s in chosen], [s.sample_id for s in chosen])
    batch = adapter.build_batch(images, [adapter.render_prompt(s.question) for s in chosen])
    dtype = torch.int8 if chosen and chosen[0].labels.dtype == np.int8 else torch.float32
    labels = torch.full(batch.visual_index.shape, -1, dtype=dtype)
    for row, s in enumerate(chosen):
        h, w = batch.grids[row]
        if tuple(s.grid) != (h, w) or int(batch.visual_valid[row].sum()) != h * w:
            raise ValueError(
                f"sample {s.sample_id}: labels are on a {s.grid[0]}x{s.grid[1]} grid but the model makes {h}x{w} "
                "visual tokens; were the labels made with another model?"
            )
        labels[row, : h * w] = torch.tensor(s.labels)  # label arrays can be read-only arrow views
    return MicroBatch(batch, labels, weight)


def _prefetch(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 3) -> Iterator[Any]:
    """``map(fn, items)`` in order, computed ahead by ``workers`` threads so batch building overlaps the model.

    Image decoding, resizing and tokenising mostly release the GIL; one thread alone can fall behind a GPU.
    """
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque(pool.submit(fn, x) for x in _take(it, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, x) for x in _take(it, 1))
            yield result


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


# --- resumable state ---------------------------------------------------------------------------------------


def save_state(path: Path, rpn: RPN, optimizer: torch.optim.Optimizer, step: int, records: list[dict]) -> None:
    """Everything a rerun needs to continue after ``step`` completed steps, written atomically."""
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "rpn": rpn.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "records": records,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    # training state inside the work dir only (the final checkpoint is safetensors); a unique temp name, so a
    # killed save never leaves a half-written state under the real name. The train stage locks the whole state
    # dir for its run, so no lock file of its own here.
    with atomic_path(path / STATE_NAME, lock=False) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, rpn: RPN, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore a saved state into ``rpn`` and ``optimizer``; returns (completed steps, records)."""
    state = torch.load(path / STATE_NAME, map_location=rpn.device, weights_only=True)
    rpn.load_state_dict(state["rpn"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if torch.cuda.is_available() and state["rng_cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    return int(state["step"]), list(state["records"])


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    rpn: RPN
    metrics: dict[str, Any]
    records: list[dict[str, float]]


def use_bf16(flag: bool | str, device: torch.device) -> bool:
    if flag == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(flag)


def train_rpn(
    adapter: ModelAdapter,
    samples: list[Sample],
    params: TrainParams,
    *,
    n_skipped: int = 0,
    state_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train an RPN copied from ``adapter``'s model on ``samples``; resumes from ``state_dir`` if it holds a state.

    Runs distributed when a process group is initialised (see :func:`init_distributed`). ``on_step(step,
    record)`` is called after every completed (and, when due, saved) step.
    """
    info = dist_info()
    device = adapter.device
    torch.manual_seed(params.seed)
    train_idx, hold_idx = split_holdout(len(samples), params.holdout_frac, params.seed)
    if len(train_idx) == 0:
        raise ValueError("no kept samples to train on")
    plan = Plan(train_idx, params)
    total = plan.total_steps

    rpn = RPN.from_base(adapter, params.B, params.R).to(device)
    trainable = [p for p in rpn.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=params.lr, betas=params.betas, weight_decay=params.weight_decay, fused=device.type == "cuda"
    )
    start, records = 0, []
    state_path = Path(state_dir) if state_dir is not None else None
    if state_path is not None and (state_path / STATE_NAME).is_file():
        start, records = load_state(state_path, rpn, optimizer)
        if info.is_main:
            tqdm.write(f"train: resuming at step {start}/{total} from {state_path}")
    model = rpn
    if info.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(rpn, device_ids=None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(params.bf16, device))
    loss_fn = masked_bce if params.objective == "bce" else masked_mse

    n_per_step = [sum(samples[int(i)].n_labelled for i in plan.global_batch(s)) for s in range(total)]
    work = [(s, idx, w) for s in range(start, total) for idx, w in plan.micro_batches(s, info)]
    stream = _prefetch(lambda item: make_micro(adapter, samples, item[1], item[2]), work)
    done = sum(len(plan.global_batch(s)) for s in range(start))
    bar = tqdm(
        total=sum(len(plan.global_batch(s)) for s in range(total)),
        initial=done,
        desc="train",
        unit="sample",
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
    )
    rpn.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        micros = plan.micro_batches(step, info)
        norm = max(n_per_step[step], 1)
        loss_sum = torch.zeros((), device=device)
        for j in range(len(micros)):
            mb = next(stream).to(device)
            sync = info.world == 1 or j == len(micros) - 1
            with nullcontext() if sync else model.no_sync():
                with autocast:
                    logits = model(mb.batch)
                s = loss_fn(logits, mb.labels, mb.batch.visual_valid, normalizer=1.0)
                # DDP averages gradients over ranks; the world factor turns that into the global-batch mean.
                (s * (mb.weight * info.world / norm)).backward()
            loss_sum += s.detach() * mb.weight
        loss = float(all_reduce(loss_sum, info)) / norm
        max_norm = params.grad_clip if params.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        lr = lr_at(step, total, params)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        n = len(plan.global_batch(step))
        record = {
            "step": step + 1,
            "epoch": plan.epoch_of(step),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples": n,
            "time_s": time.perf_counter() - t0,
        }
        records.append(record)
        bar.update(n)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if info.is_main and params.log_every and (step + 1) % params.log_every == 0:
            tqdm.write(f"train: step {step + 1}/{total} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f}")
        if state_path is not None and info.is_main and (step + 1) % params.save_every == 0 and step + 1 < total:
            save_state(state_path, rpn, optimizer, step + 1, records)
        if on_step is not None:
            on_step(step + 1, record)
    bar.close()
    rpn.eval()

    held = evaluate(rpn, adapter, samples, hold_idx, params, info)
    last = [r["loss"] for r in records[-10:]]
    timed = records[1:] if len(records) > 1 else records  # the first step pays for warm-up
    metrics = {
        "train_loss": float(np.mean(last)) if last else None,  # mean of the last (up to) 10 steps
        **held,
        "n_train": len(train_idx),
        "n_holdout": len(hold_idx),
        "n_skipped": n_skipped,
        "steps": total,
        "world_size": info.world,
        "samples_per_s": sum(r["samples"] for r in timed) / max(sum(r["time_s"] for r in timed), 1e-9),
    }
    return TrainResult(rpn=rpn, metrics=metrics, records=records)


@torch.no_grad()
def evaluate(
    rpn: RPN,
    adapter: ModelAdapter,
    samples: list[Sample],
    idx: np.ndarray,
    params: TrainParams,
    info: DistInfo | None = None,
) -> dict[str, float | None]:
    """Held-out loss (mean over labelled tokens), fg accuracy (sigmoid > 0.5) and bg accuracy (<= 0.5)."""
    info = info or dist_info()
    device = rpn.device
    shard = np.array_split(idx, info.world)[info.rank] if len(idx) else idx
    # bce sum, labelled tokens, fg hits, fg tokens, bg hits, bg tokens
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(params.bf16, device))
    for i in range(0, len(shard), params.micro_batch):
        mb = make_micro(adapter, samples, shard[i : i + params.micro_batch]).to(device)
        with autocast:
            logits = rpn(mb.batch)
        lab, valid = mb.labels, mb.batch.visual_valid
        fg, bg = (lab == 1) & valid, (lab == 0) & valid
        sums += torch.stack(
            [
                (masked_bce if params.objective == "bce" else masked_mse)(logits, lab, valid, normalizer=1.0).double(),
                ((lab != -1) & valid).sum().double(),  # labelled tokens (all real tokens for soft targets)
                (fg & (logits > 0)).sum().double(),
                fg.sum().double(),
                (bg & (logits <= 0)).sum().double(),
                bg.sum().double(),
            ]
        )
    sums = all_reduce(sums, info).tolist()

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None  # JSON null, not NaN, when the split has no such token

    return {
        "holdout_loss": ratio(sums[0], sums[1]),
        "holdout_fg_acc": ratio(sums[2], sums[3]),
        "holdout_bg_acc": ratio(sums[4], sums[5]),
    }


def params_dict(params: TrainParams) -> dict[str, Any]:
    """JSON-friendly parameters (for job keys and the checkpoint config)."""
    d = asdict(params)
    d["betas"] = list(d["betas"])
    return d
