"""Concurrent writers, with real processes: one writer per output or work dir, the second fails at once.

Issue 15, defect 1: two ``sdrpn label`` runs to one output left an unreadable artifact while one exited 0, and
two decode runs sharing a work dir crashed one of them. Here every outcome is checked from outside, as a user
would see it: exit codes, the one-line error, and the artifact read back through its contract.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

from pipeline.io.attention_store import AttentionStoreWriter
from pipeline.io.contracts import read_metadata, read_parquet, write_parquet
from pipeline.io.locks import OutputLocked, lock_file, output_lock
from pipeline.io.resumable import PartStore
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
LOCK_MESSAGE = "another sdrpn process"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _store(path: Path, n: int = 300, side: int = 16) -> Path:
    """A finished attention store on the layer params.yaml's dump stores, one strong token per sample."""
    rng = np.random.default_rng(0)
    attention = rng.random((n, 1, side * side)).astype(np.float32) * 0.01
    attention[:, 0, 5] = 1.0
    layers = yaml.safe_load((ROOT / "params.yaml").read_text())["dump"]["layers"]
    attention = np.repeat(attention, len(layers), axis=1)
    writer = AttentionStoreWriter.create(path, n_samples=n, layers=layers, max_visual=side * side)
    grid = np.full((n, 2), side, dtype=np.int32)
    norms = np.ones_like(attention)
    writer.write(0, [f"s{i}" for i in range(n)], grid, np.ones(n, dtype=np.int32), attention, norms)
    writer.finalize()
    return path


def _label(store: Path, out: Path, tau_fg: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "stages.cli", "label", str(store), str(out), "--no-progress"]
    cmd += ["--params", str(ROOT / "params.yaml"), "--set", f"tau_fg={tau_fg}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(store: Path, out: Path, taus: tuple[float, float], timeout: float = 90) -> list[dict]:
    """Two label runs started together: exit code, stderr, and the output read back the moment each one printed
    ``label: ... -> OUT`` (while it still holds the output, so what it claims must be on disk)."""
    procs = [_label(store, out, tau) for tau in taus]
    runs = [{"tau": tau, "claim_at": None, "output_then": None} for tau in taus]

    def watch(i: int) -> None:
        for line in procs[i].stdout:
            if line.startswith("label:"):
                runs[i]["claim_at"] = time.monotonic()
                runs[i]["output_then"] = _tau_or_none(out)

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(len(procs))]
    for w in watchers:
        w.start()
    try:
        for i, proc in enumerate(procs):
            runs[i]["rc"] = proc.wait(timeout=timeout)
            watchers[i].join()
            runs[i]["stderr"] = proc.stderr.read()
    finally:
        for proc in procs:
            proc.kill()
    return runs


def _wait_for_lock(lock: Path, pid: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until ``proc`` holds ``lock`` (the holder writes its pid into the lock file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(pid):
            return
        if proc.poll() is not None:
            pytest.fail(f"the writer exited ({proc.returncode}) without holding {lock}: {proc.communicate()[1]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no lock {lock} taken by the running writer within {timeout}s")


def _tau(out: Path) -> float:
    """tau_fg recorded in a labels artifact, after reading it back whole through its contract."""
    read_parquet(out, "labels")
    return read_metadata(out)["params"]["tau_fg"]


def _tau_or_none(out: Path) -> float | None:
    try:
        return _tau(out)
    except Exception:
        return None


def test_paired_label_runs_to_one_output_never_corrupt_it_and_exit_codes_are_truthful(tmp_path):
    store = _store(tmp_path / "a.zarr")
    out = tmp_path / "out" / "labels.parquet"
    for k in range(3):
        runs = _pair(store, out, (round(0.3 + 0.01 * k, 2), round(0.5 + 0.01 * k, 2)))
        winners = sorted((r for r in runs if r["rc"] == 0), key=lambda r: r["claim_at"])
        assert winners, f"pair {k}: neither run succeeded: {[r['stderr'] for r in runs]}"
        for r in runs:
            if r["rc"] == 0:  # exit 0 means "the output is mine": it was, when the run said so
                assert r["output_then"] == r["tau"], f"pair {k}: run {r['tau']} exited 0 but the output was not its"
            else:  # the only allowed failure: the lock, one line naming the output
                lines = r["stderr"].strip().splitlines()
                assert len(lines) == 1 and LOCK_MESSAGE in lines[0] and str(out) in lines[0], r["stderr"]
        # both exit 0 only one after the other, and then the later one's output stays, whole
        assert _tau(out) == winners[-1]["tau"], f"pair {k}: output is not the last successful run's"
        assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_second_label_fails_at_once_while_the_first_holds_its_output(tmp_path):
    """The lock is held for the whole run: a stopped first run still keeps the second one out."""
    store = _store(tmp_path / "a.zarr")
    out = tmp_path / "labels.parquet"
    first = _label(store, out, 0.3)
    try:
        _wait_for_lock(lock_file(out), first.pid, first)
        first.send_signal(signal.SIGSTOP)  # wherever it is in its run, it holds the output
        second = _label(store, out, 0.5)
        _, err = second.communicate(timeout=120)  # the first is stopped: had the second waited, never
        assert second.returncode != 0
        line = err.strip()
        assert "\n" not in line and LOCK_MESSAGE in line and str(out) in line and f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=60) == 0
    assert _tau(out) == 0.3


def test_killed_label_run_leaves_no_lock_and_no_temp_that_stops_the_next(tmp_path):
    store = _store(tmp_path / "a.zarr")
    out = tmp_path / "labels.parquet"
    first = _label(store, out, 0.3)
    _wait_for_lock(lock_file(out), first.pid, first)
    first.kill()  # kill -9 while it holds the output
    first.wait()
    again = _label(store, out, 0.5)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert _tau(out) == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".labels.parquet.lock", "a.zarr", "labels.parquet"]


# A process that holds a lock (or a PartStore) until its stdin closes.
HOLD = """
import sys
from pipeline.io.locks import output_lock
from pipeline.io.resumable import PartStore
kind, path = sys.argv[1], sys.argv[2]
if kind == "parts":
    held = PartStore(path, "decode", sys.argv[3])
else:
    held = output_lock(path)
    held.__enter__()
print("held", flush=True)
sys.stdin.read()
"""


def _holder(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, *args], cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_partstores_on_one_work_dir_second_fails_at_once_naming_it(tmp_path):
    work = tmp_path / "work"
    holder = _holder("parts", str(work), "k1")
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputLocked, match=LOCK_MESSAGE) as info:
            PartStore(work, "decode", "k1")
        assert time.monotonic() - t0 < 1
        assert str(work / "decode-k1") in str(info.value) and "work dir" in str(info.value)
        with PartStore(work, "decode", "k2") as other:  # another job in the same work dir is independent
            other.write(0, pa.table({"x": [1]}))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with PartStore(work, "decode", "k1") as parts:  # released when the holder exits
        assert parts.n_done() == 0


def _decode_project(tmp_path: Path, records_jsonl: Path, model: Path) -> list[str]:
    """A manifest and a params file for decode on ``model`` (a tiny saved model: its config passes the checks)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["input"] = str(records_jsonl)
    params["model"].update(path=str(model), device="cpu", dtype="float32")
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    man, skips = tmp_path / "manifest.parquet", tmp_path / "skips.parquet"
    res = CliRunner().invoke(main, ["prepare", str(man), str(skips), "--params", str(params_path)])
    assert res.exit_code == 0, res.output
    return [str(man), str(tmp_path / "responses.parquet"), "--params", str(params_path), "--no-progress"]


def test_second_decode_on_a_work_dir_in_use_stops_before_loading_the_model(
    tmp_path, records_jsonl, toy_dir, monkeypatch
):
    import stages.decode

    def no_loading(*args, **kwargs):
        raise RuntimeError("weights not loaded in this test")

    monkeypatch.setattr(stages.decode, "load_adapter", no_loading)
    args = _decode_project(tmp_path, records_jsonl, toy_dir)
    work = tmp_path / "work"
    first = CliRunner().invoke(main, ["decode", *args, "--work-dir", str(work)])
    assert first.exit_code != 0  # it cannot load the model; what matters is the job dir it opened
    (job,) = work.glob("decode-*")
    holder = _holder("parts", str(work), job.name.removeprefix("decode-"))
    try:
        res = CliRunner().invoke(main, ["decode", *args, "--work-dir", str(work)])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert res.exit_code == 1
    assert f"work dir {job}: {LOCK_MESSAGE}" in res.output and len(res.output.strip().splitlines()) == 1


# Writes an artifact and is killed (SIGKILL) with its temp half written.
DIE_MID_WRITE = """
import os, signal, sys
import pyarrow as pa
import pyarrow.parquet as pq
from pipeline.io.contracts import write_parquet
from pipeline.io.resumable import PartStore

def dying(table, where, **kwargs):
    with open(where, "wb") as fh:  # half a Parquet file, then the kill
        fh.write(b"PAR1" + b"\\0" * 100)
    os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = dying
table = pa.table({"sample_id": ["b"], "image": ["y"], "reason": ["new"]})
if sys.argv[1] == "parts":
    PartStore(sys.argv[2], "decode", "k").write(1, table)
else:
    write_parquet(table, sys.argv[2], "manifest_skips", params={"run": "killed"})
"""


def _die_mid_write(*args: str) -> None:
    res = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, *args], cwd=ROOT, env=ENV, capture_output=True)
    assert res.returncode == -signal.SIGKILL, res.stderr


def test_writer_killed_mid_write_keeps_the_old_artifact_and_the_rerun_succeeds(tmp_path):
    out = tmp_path / "skips.parquet"
    table = pa.table({"sample_id": ["a"], "image": ["x"], "reason": ["old"]})
    write_parquet(table, out, "manifest_skips", params={"run": "old"})
    _die_mid_write("artifact", str(out))
    assert read_metadata(out)["params"] == {"run": "old"}  # readers still see the old artifact, whole
    assert read_parquet(out, "manifest_skips").column("reason").to_pylist() == ["old"]
    write_parquet(table, out, "manifest_skips", params={"run": "rerun"})
    assert read_metadata(out)["params"] == {"run": "rerun"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".skips.parquet.lock", "skips.parquet"]


def test_partstore_writer_killed_mid_part_leaves_nothing_for_the_rerun(tmp_path):
    work = tmp_path / "work"
    with PartStore(work, "decode", "k") as parts:
        parts.write(0, pa.table({"x": [0]}))
    _die_mid_write("parts", str(work))
    with PartStore(work, "decode", "k") as parts:
        assert parts.n_done() == 1 and parts.done(0) and not parts.done(1)
        assert sorted(p.name for p in parts.dir.iterdir()) == ["part-000000000.parquet"]  # the stub is gone
        parts.write(1, pa.table({"x": [1]}))
        assert parts.collect().column("x").to_pylist() == [0, 1]


def test_lock_is_released_when_its_holder_dies(tmp_path):
    out = tmp_path / "o.parquet"
    holder = _holder("lock", str(out))
    message = rf"output {out}: {LOCK_MESSAGE} \(pid {holder.pid}\) is writing it"
    with pytest.raises(OutputLocked, match=message), output_lock(out):
        pass
    holder.kill()
    holder.wait()
    with output_lock(out):  # the kernel dropped the dead holder's flock
        pass


def test_locks_are_reentrant_in_one_process_and_leave_directory_outputs_untouched(tmp_path):
    out = tmp_path / "rpn"
    with output_lock(out), output_lock(out):
        out.mkdir()
        (out / "w").write_text("x")
    assert [p.name for p in out.iterdir()] == ["w"]  # the lock file is a sibling, never inside the output
    assert lock_file(out) == tmp_path / ".rpn.lock"


def test_writes_refuses_a_parameter_the_stage_does_not_have():
    """A typo in a stage's @writes fails when the stage module is imported, not by locking nothing."""
    from stages.common import writes

    with pytest.raises(TypeError, match="nope"):
        writes("nope")(lambda out: None)
