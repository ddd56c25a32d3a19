"""Probe: paired ``sdrpn label`` runs to one output, started together, as two users (or two shells) would.

Each pair runs ``sdrpn label STORE OUT --set tau_fg=<unique>`` twice at once on a synthetic attention store.
Every run's tau_fg is distinct, so the artifact names the run that wrote it. A run that exits 0 claims the
output is its own: the probe reads the output back (through its contract) the moment the run prints
``label: ... -> OUT``, and again after the pair, when it must be the output of the last successful run to print
that. It prints:

- corrupt outputs: pairs after which the output does not read back as a valid labels artifact;
- exit codes that lied: runs that exited 0 while the output was not theirs (or not readable);
- failures other than the lock: runs that exited non-zero without the one-line "another sdrpn process" error.

Issue 15 asks for 0 corrupt outputs and every exit code truthful over 50 pairs.

    .venv/bin/python bench/probe_concurrent_label.py [--pairs 50] [--samples 600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from pipeline.io.attention_store import AttentionStoreWriter  # noqa: E402
from pipeline.io.contracts import read_metadata, read_parquet  # noqa: E402

LOCK_MESSAGE = "another sdrpn process"
SIDE = 24


def make_store(path: Path, n: int) -> None:
    """A finished store on params.yaml's dump layers: noise plus one strong token per sample."""
    rng = np.random.default_rng(0)
    layers = yaml.safe_load((ROOT / "params.yaml").read_text())["dump"]["layers"]
    att = rng.random((n, len(layers), SIDE * SIDE)).astype(np.float32) * 0.01
    att[:, :, 5] = 1.0
    writer = AttentionStoreWriter.create(path, n_samples=n, layers=layers, max_visual=SIDE * SIDE)
    grid = np.full((n, 2), SIDE, dtype=np.int32)
    writer.write(0, [f"s{i}" for i in range(n)], grid, np.ones(n, dtype=np.int32), att, np.ones_like(att))
    writer.finalize()


def output_tau(out: Path) -> float | None:
    """The tau_fg of the run that wrote ``out``, or None if it does not read back as a valid labels artifact."""
    try:
        read_parquet(out, "labels")
        return float(read_metadata(out)["params"]["tau_fg"])
    except Exception:
        return None


def run_pair(store: Path, out: Path, taus: tuple[float, float]) -> dict:
    """Start two label runs at once; read the output back the moment each one reports it is written, and after."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    t0 = time.monotonic()
    for tau in taus:
        cmd = [sys.executable, "-m", "stages.cli", "label", str(store), str(out), "--no-progress"]
        cmd += ["--params", str(ROOT / "params.yaml"), "--set", f"tau_fg={tau}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    runs = [{"tau": tau, "claim_at": None, "output_then": None} for tau in taus]

    def watch(i: int) -> None:
        # "label: ... -> OUT" is the run saying it wrote OUT (it still holds the output then): check it at once
        for line in procs[i].stdout:
            if line.startswith(b"label:"):
                runs[i]["claim_at"] = time.monotonic() - t0
                runs[i]["output_then"] = output_tau(out)
        runs[i]["at"] = time.monotonic() - t0  # its stdout closed: the process is exiting

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(len(procs))]
    for w in watchers:
        w.start()
    for i, p in enumerate(procs):
        watchers[i].join()
        runs[i]["stderr"] = p.stderr.read().decode(errors="replace").strip()
        runs[i]["rc"] = p.wait()
    return {"runs": runs, "final": output_tau(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--samples", type=int, default=600, help="samples in the synthetic store")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="probe-label-"))
    work.mkdir(parents=True, exist_ok=True)
    store, out = work / "attention.zarr", work / "out" / "labels.parquet"
    if not store.exists():
        make_store(store, args.samples)
    counts = {"one_refused": 0, "both_serial": 0, "other": 0}
    corrupt = lied = unexpected = 0
    refused_at: list[float] = []
    notes: list[str] = []
    started = time.monotonic()
    for k in range(args.pairs):
        taus = (round(0.3 + 0.002 * k, 3), round(0.301 + 0.002 * k, 3))  # unique per run
        res = run_pair(store, out, taus)
        runs = res["runs"]
        winners = sorted((r for r in runs if r["rc"] == 0), key=lambda r: r["claim_at"] or 0.0)
        if res["final"] is None:
            corrupt += 1
            notes.append(f"pair {k}: output unreadable after the pair")
        for r in winners:
            if r["output_then"] != r["tau"]:
                lied += 1
                notes.append(f"pair {k}: run tau_fg={r['tau']} exited 0 but the output held {r['output_then']}")
        if winners and res["final"] != winners[-1]["tau"]:
            lied += 1
            notes.append(f"pair {k}: output after the pair is {res['final']}, not the last successful run's")
        refused = 0
        for r in runs:
            if r["rc"] != 0:
                if LOCK_MESSAGE in r["stderr"] and len(r["stderr"].splitlines()) == 1:
                    refused += 1
                    refused_at.append(r["at"])
                else:
                    unexpected += 1
                    last = r["stderr"].splitlines()[-1] if r["stderr"] else ""
                    notes.append(f"pair {k}: run tau_fg={r['tau']} exit {r['rc']}: {last[:160]}")
        if len(winners) == 1 and refused == 1:
            counts["one_refused"] += 1
        elif len(winners) == 2:
            counts["both_serial"] += 1
        else:
            counts["other"] += 1
    print(f"pairs: {args.pairs} ({time.monotonic() - started:.0f} s, store {args.samples} samples, {work})")
    print(
        f"outcomes: one ran and the other was refused by the lock: {counts['one_refused']}; "
        f"both exited 0: {counts['both_serial']} (with the lock, only one after the other); other: {counts['other']}"
    )
    print(f"corrupt outputs: {corrupt}")
    print(f"exit codes that lied: {lied}")
    print(f"failures other than the lock: {unexpected}")
    if refused_at:
        print(
            f"refused runs exited after {statistics.median(refused_at):.2f} s median, {max(refused_at):.2f} s max "
            "(from start, interpreter startup included)"
        )
    for line in notes[:20]:
        print("  " + line)
    return 1 if corrupt or lied or unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
