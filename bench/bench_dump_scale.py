"""The dump stage at scale: its memory does not grow with the manifest, and its store stays cheap for DVC.

1. Peak RSS of ``sdrpn dump`` (a subprocess; ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, each run
   measured from its own parent so one run's peak cannot hide the other's) over a synthetic manifest of
   ``--big`` samples vs ``--small`` (default 20K vs 2K), on a tiny random LLaVA (toymodels/llava.py) with tiny
   images and a responses Parquet made per the responses schema. Target: within 1.2x.
2. The attention store of LLaVA-1.5-7B per-head maps at layers [2, 14] (32 heads, 576 visual tokens),
   written with the real writer (synthetic values: a blob, noise and a few sinks per head), for
   ``--store-samples`` samples: its file count and bytes on disk, and the time of ``dvc add`` and ``dvc status``
   on it in a fresh git + DVC repository (DVC's default cache: the files are hashed and copied). The numbers are
   extrapolated to 152K samples (the estimated store size among them). The default is a 1/8 slice: the whole
   store is ~20 GB, twice that with DVC's cache copy, and takes well over 10 minutes of 2 cores to write and add.

    .venv/bin/python bench/bench_dump_scale.py                       # both parts, ~6 min on 2 cores
    .venv/bin/python bench/bench_dump_scale.py --store-samples 152000  # the whole store (~40 GB of disk)
    .venv/bin/python bench/bench_dump_scale.py --small 200 --big 2000 --store-samples 4000  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.io.attention_store import MIN_CHUNK_SAMPLES, AttentionStoreWriter, shard_samples_for  # noqa: E402

FULL = 152_000
LAYERS, HEADS, VISUAL = [2, 14], 32, 576
IMAGE_SIZES = [(32, 32), (40, 24), (24, 40), (36, 36)]
WORDS = ["what", "is", "in", "the", "red", "box", "?", "a", "b", "c"]


def make_model(root: Path) -> Path:
    """The tiny random LLaVA of the tests, saved as a checkpoint directory."""
    from toymodels.llava import ToyLlavaSizes, build_toy_llava, save_toy_llava

    return save_toy_llava(*build_toy_llava(WORDS, ToyLlavaSizes(), seed=0), root / "toy-llava")


def make_inputs(root: Path, n: int, model: Path) -> tuple[Path, Path]:
    """A manifest of ``n`` samples over a few tiny images, and a responses Parquet for it."""
    from PIL import Image
    from transformers import AutoTokenizer

    from pipeline.io.contracts import write_parquet
    from pipeline.io.manifest import MANIFEST_COLUMNS
    from pipeline.teacher.decode import RESPONSE_COLUMNS

    rng = np.random.default_rng(0)
    refs = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        ref = root / f"img{i}.png"
        if not ref.exists():
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(ref)
        refs.append(str(ref))
    ids = [f"s{i:07d}" for i in range(n)]
    k = np.arange(n) % len(refs)
    manifest = {c.name: pa.nulls(n, c.type) for c in MANIFEST_COLUMNS}
    manifest.update(
        sample_id=pa.array(ids),
        image=pa.array([refs[j] for j in k]),
        question=pa.array(["what is in the red box ?"] * n),
        width=pa.array([IMAGE_SIZES[j][0] for j in k], pa.int32()),
        height=pa.array([IMAGE_SIZES[j][1] for j in k], pa.int32()),
        source=pa.array(["bench"] * n),
    )
    man = root / f"manifest-{n}.parquet"
    write_parquet(pa.table(manifest, schema=MANIFEST_COLUMNS), man, "manifest")
    tokens = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(["a", "b", "c", "box"])
    responses = {
        "sample_id": ids,
        "prompt": [""] * n,
        "response": ["a b c box"] * n,
        "response_token_ids": [tokens[: 2 + i % 3] for i in range(n)],
        "finish_reason": ["length"] * n,
        "model_id": ["toy-llava"] * n,
        "skip_reason": [None] * n,
    }
    resp = root / f"responses-{n}.parquet"
    write_parquet(pa.table(responses, schema=RESPONSE_COLUMNS), resp, "responses")
    return man, resp


def measure(argv: list[str]) -> None:
    """(Run as its own process) run ``sdrpn dump`` with ``argv`` and print its peak RSS and time as JSON."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "stages.cli", "dump", *argv], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"dump failed:\n{res.stdout}\n{res.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    print(json.dumps({"rss_mib": peak_kib / 1024, "seconds": time.perf_counter() - t0}))


def dump_rss(root: Path, model: Path, n: int) -> dict[str, float]:
    man, resp = make_inputs(root, n, model)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(model), device="cpu", dtype="float32")
    params["dump"].update(layers=[1, 2], per_head=False, batch_size=64)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    argv = [str(man), str(resp), str(root / f"attention-{n}.zarr"), "--params", str(root / "params.yaml")]
    argv += ["--work-dir", str(root / "work"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--measure", *argv], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(out.stdout + out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_maps(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-head attention (n, 2, 32, 576) and norms (n, 2, 576): a blob per map, noise, a few sinks per sample."""
    side = 24
    yy, xx = np.mgrid[0:side, 0:side].reshape(2, 1, 1, 1, VISUAL).astype(np.float32)
    cy, cx = rng.uniform(0, side, (2, n, 1, HEADS, 1)).astype(np.float32)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32(2 * 9.0))
    att = blob * np.float32(0.02) + rng.random((n, len(LAYERS), HEADS, VISUAL), dtype=np.float32) * np.float32(0.004)
    sinks = rng.integers(0, VISUAL, (n, 3))
    att[np.arange(n)[:, None], :, :, sinks] += np.float32(0.2)
    norms = rng.normal(40.0, 4.0, (n, len(LAYERS), VISUAL)).astype(np.float32)
    norms[np.arange(n)[:, None], :, sinks] *= np.float32(30.0)
    return att, norms


def write_store(path: Path, n: int) -> float:
    """The per-head store of ``n`` samples, written through AttentionStoreWriter; returns seconds."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    w = AttentionStoreWriter.create(path, n, LAYERS, VISUAL, heads=list(range(HEADS)), attrs={"model_id": "synthetic"})
    step = 512
    for s in range(0, n, step):
        e = min(s + step, n)
        att, norms = synthetic_maps(rng, e - s)
        ids = np.array([f"gqa_{i:07d}" for i in range(s, e)], dtype=object)
        w.write(s, ids, np.full((e - s, 2), 24, np.int32), rng.integers(1, 6, e - s), att, norms)
    w.finalize()
    return time.perf_counter() - t0


def dvc(repo: Path, *args: str) -> float:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return time.perf_counter() - t0


def store_layout(n: int) -> tuple[int, int]:
    """(shards, files) of the per-head store of ``n`` samples: 5 arrays, a file per shard, plus 6 zarr.json."""
    shard = shard_samples_for(min(MIN_CHUNK_SAMPLES, n), 4 * len(LAYERS) * HEADS * VISUAL, n)
    shards = -(-n // shard)
    return shards, 5 * shards + 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--big", type=int, default=20_000)
    ap.add_argument("--store-samples", type=int, default=FULL // 8, help="samples of the per-head store (152000: all)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-store", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dump_scale_"))
    try:
        if not args.skip_rss:
            model = make_model(tmp)
            runs = {n: dump_rss(tmp, model, n) for n in (args.small, args.big)}
            for n, r in runs.items():
                print(f"sdrpn dump, {n:>6} samples: peak RSS {r['rss_mib']:7.1f} MiB, {r['seconds']:6.1f} s")
            ratio = runs[args.big]["rss_mib"] / runs[args.small]["rss_mib"]
            verdict = "PASS" if ratio <= 1.2 else "FAIL"
            print(f"  peak RSS {args.big} / {args.small} samples: {ratio:.3f}x (target <= 1.2x: {verdict})")
        if not args.skip_store:
            n = args.store_samples
            repo = tmp / "repo"
            repo.mkdir()
            subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
            dvc(repo, "init", "-q")
            store = repo / "attention.zarr"
            seconds = write_store(store, n)
            files = [p for p in store.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            shards, expect = store_layout(n)
            assert len(files) == expect, (len(files), expect)
            raw = n * 4 * len(LAYERS) * (HEADS + 1) * VISUAL
            print(
                f"per-head store, {n} samples, layers {LAYERS}, {HEADS} heads, {VISUAL} tokens: written in "
                f"{seconds:.1f} s; {len(files)} files ({shards} shards x 5 arrays + 6 zarr.json), "
                f"{size / 2**30:.2f} GiB on disk ({raw / size:.2f}x compression of {raw / 2**30:.2f} GiB)"
            )
            t_add = dvc(repo, "add", "-q", "attention.zarr")
            t_status = dvc(repo, "status", "-q")
            t_status2 = dvc(repo, "status", "-q")
            print(f"  dvc add {t_add:.1f} s, dvc status {t_status:.1f} s (again: {t_status2:.1f} s)")
            if n != FULL:
                k = FULL / n
                full_shards, full_files = store_layout(FULL)
                v2_files = 5 * -(-FULL // 256) + 6
                print(
                    f"  extrapolated to {FULL} samples (x{k:.2f}): {full_files} files ({full_shards} shards; "
                    f"one file per chunk, v2, would be {v2_files}), estimated store size {size * k / 2**30:.1f} GiB "
                    f"on disk ({raw * k / 2**30:.1f} GiB raw), dvc add ~{t_add * k:.0f} s (hashing and copying "
                    f"scale with bytes); dvc status stats {full_files} files instead of {len(files)}"
                )
            else:
                print(f"  estimated store size at {FULL} samples: {size / 2**30:.1f} GiB (measured)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2:])
    else:
        main()
