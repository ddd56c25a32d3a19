"""`sdrpn dump` under torchrun (CPU, gloo): one store, the same bytes as one process; a dead rank resumes.

The store is cut small (chunks of 1 sample, shards of 2) so that each of two ranks owns several shards. A
helper script run by torchrun patches those sizes, logs every shard a rank records and, when asked, makes one
rank exit right after recording its first shard (the way a killed rank leaves the store). The single-process
runs go through the CLI in this process with the same patches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
import zarr
from click.testing import CliRunner

from pipeline.distributed import DistInfo
from pipeline.io import attention_store
from pipeline.io.attention_store import open_attention_store, records_dir
from pipeline.io.contracts import write_parquet
from pipeline.io.manifest import MANIFEST_COLUMNS
from pipeline.teacher.decode import RESPONSE_COLUMNS
from stages.cli import main
from tests.conftest import random_images

ROOT = Path(__file__).resolve().parents[1]
N = 12  # samples: 6 shards of 2, 3 per rank
CHUNK, SHARD_CHUNKS = 1, 2
ARRAYS = ("sample_id", "grid", "n_response", "attention", "hidden_norm", "known_bg")

HELPER = f"""
import os, sys
from pipeline.io import attention_store as m

m.MIN_CHUNK_SAMPLES, m.MAX_SHARD_CHUNKS = {CHUNK}, {SHARD_CHUNKS}
record = m.AttentionStoreWriter._record
rank = int(os.environ.get("RANK", "0"))

def logged(self, s):
    record(self, s)
    with open(os.environ["DUMP_LOG"] + f".{{rank}}", "a") as fh:
        fh.write(f"{{s}}\\n")
    if str(rank) == os.environ.get("DUMP_DIE_RANK"):
        os._exit(3)  # after its first shard is recorded: the rank is gone, the shard is kept

m.AttentionStoreWriter._record = logged
from stages.cli import main
main(sys.argv[1:])
"""

# holds the lock of argv[1] until its stdin closes
HOLD = """
import sys
from pipeline.io.locks import output_lock
held = output_lock(sys.argv[1], kind="work dir")
held.__enter__()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, toy, toy_dir) -> Path:
    """A manifest of N samples of assorted image sizes, their responses, params for per-head maps at 2 layers."""
    proj = tmp_path_factory.mktemp("dist")
    (proj / "img").mkdir()
    refs, sizes = [], []
    for i, im in enumerate(random_images(N, seed=3)):
        im.save(proj / "img" / f"{i}.png")
        refs.append(str(proj / "img" / f"{i}.png"))
        sizes.append(im.size)
    ids = [f"s{i:02d}" for i in range(N)]
    manifest = {c.name: [None] * N for c in MANIFEST_COLUMNS}
    manifest.update(
        sample_id=ids,
        image=refs,
        question=["what is in the red box ?"] * N,
        width=[w for w, _ in sizes],
        height=[h for _, h in sizes],
        source=["unit"] * N,
    )
    write_parquet(pa.table(manifest, schema=MANIFEST_COLUMNS), proj / "manifest.parquet", "manifest")
    tokenizer = toy[1].tokenizer
    words = ["red", "box", "blue", "a", "b", "c"]
    responses = {
        "sample_id": ids,
        "prompt": [""] * N,
        "response": [""] * N,
        "response_token_ids": [tokenizer.convert_tokens_to_ids(words[: 2 + i % 4]) for i in range(N)],
        "finish_reason": ["length"] * N,
        "model_id": ["toy"] * N,
        "skip_reason": [None] * N,
    }
    write_parquet(pa.table(responses, schema=RESPONSE_COLUMNS), proj / "responses.parquet", "responses")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(toy_dir), device="cpu", dtype="float32")
    params["dump"].update(layers=[1, 2], per_head=True, batch_size=3, chunk_samples=CHUNK)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    (proj / "helper.py").write_text(HELPER)
    return proj


def _args(proj: Path, out: str, work: str) -> list[str]:
    return [
        "dump",
        str(proj / "manifest.parquet"),
        str(proj / "responses.parquet"),
        str(proj / out),
        "--params",
        str(proj / "params.yaml"),
        "--work-dir",
        str(proj / work),
        "--no-progress",
    ]


def _torchrun(proj: Path, args: list[str], log: str, die_rank: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DUMP_LOG": str(proj / log)}
    env.pop("DUMP_DIE_RANK", None)
    if die_rank is not None:
        env["DUMP_DIE_RANK"] = str(die_rank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(proj / "helper.py"), *args]
    return subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=300)


def _in_process(proj: Path, args: list[str], monkeypatch, log: list[int] | None = None) -> None:
    monkeypatch.setattr(attention_store, "MIN_CHUNK_SAMPLES", CHUNK)
    monkeypatch.setattr(attention_store, "MAX_SHARD_CHUNKS", SHARD_CHUNKS)
    if log is not None:
        record = attention_store.AttentionStoreWriter._record

        def logged(self, s):
            record(self, s)
            log.append(s)

        monkeypatch.setattr(attention_store.AttentionStoreWriter, "_record", logged)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)


def _logged(proj: Path, log: str, rank: int) -> list[int]:
    f = proj / f"{log}.{rank}"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys()) == sorted(ARRAYS)
    for name in ARRAYS:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert dict(ga.attrs) == dict(gb.attrs)  # no attr records the world size
    files = {p.relative_to(a).as_posix(): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    assert files == {p.relative_to(b).as_posix(): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single(project: Path) -> Path:
    """The store of one process (no torchrun)."""
    with pytest.MonkeyPatch.context() as mp:
        _in_process(project, _args(project, "one.zarr", "work-one"), mp)
    return project / "one.zarr"


def test_two_ranks_write_the_single_process_store(project, single):
    st = open_attention_store(single)
    assert (st.n_samples, st.chunk_samples, st.shard_samples, st.attrs["per_head"]) == (N, 1, 2, True)
    res = _torchrun(project, _args(project, "two.zarr", "work-two"), "two.log")
    assert res.returncode == 0, res.stdout + res.stderr
    # each rank wrote the shards it owns (s % 2 == rank), and rank 0 alone finalized and published
    assert _logged(project, "two.log", 0) == [0, 2, 4] and _logged(project, "two.log", 1) == [1, 3, 5]
    assert res.stdout.count("dump: 12 samples") == 1
    _assert_same_store(single, project / "two.zarr")
    assert not list((project / "work-two").glob("dump-*.zarr")) and not list((project / "work-two").glob("*.done"))


@pytest.mark.parametrize("die_rank, rerun_world", [(1, 1), (0, 2)])
def test_a_dead_rank_then_a_rerun_redoes_only_the_missing_shards(project, single, monkeypatch, die_rank, rerun_world):
    name = f"kill{die_rank}"
    work = project / f"work-{name}"
    args = _args(project, f"{name}.zarr", work.name)
    res = _torchrun(project, args, f"{name}.log", die_rank=die_rank)
    assert res.returncode != 0 and not (project / f"{name}.zarr").exists()
    assert _logged(project, f"{name}.log", die_rank) == [die_rank]  # one shard recorded, then the rank died
    (store,) = work.glob("dump-*.zarr")
    kept = sorted(int(p.stem) for p in records_dir(store).glob("*.json"))
    assert die_rank in kept and len(kept) < N // CHUNK // SHARD_CHUNKS
    if rerun_world == 1:
        redone: list[int] = []
        _in_process(project, args, monkeypatch, redone)
    else:
        res = _torchrun(project, args, f"{name}.rerun")
        assert res.returncode == 0, res.stdout + res.stderr
        by_rank = [_logged(project, f"{name}.rerun", r) for r in (0, 1)]
        assert all(s % 2 == r for r in (0, 1) for s in by_rank[r])
        redone = by_rank[0] + by_rank[1]
    assert sorted(redone) == sorted(set(range(6)) - set(kept))
    _assert_same_store(single, project / f"{name}.zarr")


def test_each_rank_locks_its_share_of_the_work_store(project, monkeypatch):
    """A second job's rank 1 stops at once on the first job's rank-1 lock (rank 0 on the store's own lock)."""
    import stages.dump

    _in_process(project, _args(project, "lock.zarr", "work-lock"), monkeypatch)  # a finished job: its key
    (job,) = (project / "work-lock").glob(".dump-*.zarr.lock")
    rank1 = project / "work-lock" / (job.name.removeprefix(".").removesuffix(".lock") + ".rank1")
    # rank 1 of 2 as torchrun would start it, without a process group: it stops before any collective
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(stages.dump, "init_distributed", lambda: DistInfo(rank=1, world=2))
    holder = subprocess.Popen(  # the first job's rank 1, in another process (a lock is re-entrant in its own)
        [sys.executable, "-c", HOLD, str(rank1)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = CliRunner().invoke(main, _args(project, "lock.zarr", "work-lock"))
    finally:
        holder.communicate(timeout=30)
    assert res.exit_code == 1 and f"work dir {rank1}: another sdrpn process" in res.output, res.output
