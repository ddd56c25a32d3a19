"""`sdrpn launch`: one process runs the stage in place; more become torchrun over the same interpreter."""

from __future__ import annotations

import subprocess
import sys

from stages.launch import torchrun_argv


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", "launch", *args], capture_output=True, text=True)


def test_one_process_runs_the_stage_in_place_with_its_exit_status():
    ok = _launch("--nnodes", "1", "--nproc-per-node", "1", "--rdzv-endpoint", "localhost:0", "label", "--help")
    assert ok.returncode == 0 and "Usage: sdrpn label" in ok.stdout
    bad = _launch("--nnodes", "1", "--nproc-per-node", "1", "label", "missing.parquet", "x", "y")
    assert bad.returncode == 2 and "missing.parquet" in bad.stderr  # click's usage error, from the stage itself
    assert "torch.distributed" not in ok.stderr + bad.stderr


def test_several_processes_are_torchrun_of_this_interpreter():
    argv = torchrun_argv("2", "8", "head:29500", ["decode", "a.parquet", "b.parquet"])
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[3:] == [
        "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint", "head:29500",
        "-m", "stages.cli", "decode", "a.parquet", "b.parquet",
    ]  # fmt: skip
