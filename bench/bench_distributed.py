"""decode on the embedded default with 1 process vs 2 torchrun processes: samples/s and their ratio.

Runs ``sdrpn decode`` (the stage command, as dvc.yaml runs it) over the first ``--n`` samples of the embedded
world's training manifest (after ``dvc repro``), alternately as one plain process and under ``torchrun
--nproc_per_node 2``, ``--repeats`` times each, and prints the median samples/s of each (whole command: start,
model load, decode, assembling the artifact) and the ratio. The two outputs are also compared byte for byte.
On a 2-core CPU the two processes share the cores one thread each (one process uses both): the ratio says what
sharding costs or gains there; on GPUs each process has its own device.

    .venv/bin/python bench/bench_distributed.py                 # 256 samples, 2 repeats
    .venv/bin/python bench/bench_distributed.py --n 512 --nproc 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(work: Path, out: str, nproc: int) -> float:
    """Seconds for one decode of ``work``'s manifest into ``out``."""
    # run from the repository root: the manifest's image paths are relative to it
    args = ["-m", "stages.cli", "decode", str(work / "manifest.parquet"), str(work / out)]
    args += ["--params", str(work / "params.yaml"), "--no-progress", "--work-dir", str(work / f"work-{out}")]
    if nproc > 1:
        args = [
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
            *args,
        ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--manifest", type=Path, default=ROOT / "artifacts/manifest.parquet")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table = pq.read_table(args.manifest).slice(0, args.n)
        pq.write_table(table, work / "manifest.parquet")
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["model"]["path"] = str(ROOT / params["model"]["path"])
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        times: dict[int, list[float]] = {1: [], args.nproc: []}
        for r in range(args.repeats):
            for nproc in times:
                times[nproc].append(run(work, f"out-{nproc}-{r}.parquet", nproc))
        same = (work / "out-1-0.parquet").read_bytes() == (work / f"out-{args.nproc}-0.parquet").read_bytes()
    rate = {p: table.num_rows / statistics.median(t) for p, t in times.items()}
    print(
        f"decode, {table.num_rows} samples of {args.manifest.name}, batch {params['decode']['batch_size']}, "
        f"{os.cpu_count()} CPUs, median of {args.repeats}"
    )
    for p, t in times.items():
        print(f"  {p} process(es): {rate[p]:.1f} samples/s (runs {', '.join(f'{x:.1f}' for x in t)} s)")
    print(f"  ratio {args.nproc} vs 1: {rate[args.nproc] / rate[1]:.2f}x; outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
