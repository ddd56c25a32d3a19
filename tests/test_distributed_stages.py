"""decode, evaluate and benchmarks under torchrun (gloo, 2 CPU processes): the same bytes as one process, and a
rank killed mid-way then rerun gives them too, redoing only the missing batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.io.contracts import write_parquet
from pipeline.io.manifest import build_manifest, records_from_table
from pipeline.student.rpn import RPN

ROOT = Path(__file__).resolve().parent.parent


def _sdrpn(project: Path, *args: str, nproc: int = 1, module: str = "stages.cli", env: dict | None = None):
    """Run a stage as one plain process, or with ``nproc`` processes: through ``sdrpn launch`` as dvc.yaml does,
    or, for a wrapper ``module`` (tests/die_after.py), under torchrun directly."""
    cmd = [sys.executable, "-m", module, *args, "--params", str(project / "params.yaml"), "--no-progress"]
    if nproc > 1 and module == "stages.cli":
        cmd = [sys.executable, "-m", module, "launch", "--nproc-per-node", str(nproc), *cmd[3:]]
    elif nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
        launcher += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0"]
        cmd = [sys.executable, *launcher, "-m", module, *cmd[3:]]
    run_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=project, env=run_env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def project(tmp_path_factory, toy_dir, adapter) -> Path:
    """10 samples in batches of 2 (5 batches: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3), the tiny LLaVA, an RPN."""
    from tests.conftest import random_images

    proj = tmp_path_factory.mktemp("dist")
    (proj / "img").mkdir()
    rows = []
    for i, img in enumerate(random_images(10, seed=3)):
        img.save(proj / "img" / f"{i}.png")
        rows.append(
            {
                "sample_id": f"s{i}",
                "image": f"img/{i}.png",
                "question": "what is in the red box ?",
                "answer": "a",
                "box": [1, 2, 10, 12],
            }
        )
    (proj / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _ = build_manifest(records_from_table(proj / "records.jsonl"))
    write_parquet(table, proj / "manifest.parquet", "manifest")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(toy_dir), device="cpu", dtype="float32")
    params["decode"].update(batch_size=2, max_new_tokens=3)
    params["evaluate"].update(batch_size=2, max_new_tokens=3, raw_attention=False)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    RPN.from_base(adapter, B=1, R=2).save(proj / "rpn")
    return proj


def _decode(project: Path, out: str, **kwargs):
    res = _sdrpn(project, "decode", "manifest.parquet", out, "--work-dir", "work", **kwargs)
    return res


def test_decode_on_two_processes_writes_the_same_bytes(project):
    one = _decode(project, "one.parquet")
    assert one.returncode == 0, one.stderr
    two = _decode(project, "two.parquet", nproc=2)
    assert two.returncode == 0, two.stderr
    assert (project / "two.parquet").read_bytes() == (project / "one.parquet").read_bytes()
    assert not list((project / "work").glob("decode-*/part-*"))  # rank 0 cleaned up after assembling


def test_decode_rank_killed_then_rerun_gives_the_same_bytes(project):
    if not (project / "one.parquet").exists():
        assert _decode(project, "one.parquet").returncode == 0
    # rank 1 dies right after its first batch (1); rank 0 may have written 0, 2, 4 by then
    dead = _decode(
        project,
        "killed.parquet",
        nproc=2,
        module="tests.die_after",
        env={"SDRPN_DIE_RANK": "1", "SDRPN_DIE_AFTER": "1"},
    )
    assert dead.returncode != 0 and "rank 1: dying after parts [1]" in dead.stderr
    assert not (project / "killed.parquet").exists()
    parts = sorted(p.name for p in (project / "work").glob("decode-*/part-*.parquet"))
    assert "part-000000001.parquet" in parts and "part-000000003.parquet" not in parts
    again = _decode(project, "killed.parquet", nproc=2)
    assert again.returncode == 0, again.stderr
    assert f"decode: resuming, {len(parts)} finished batches" in again.stdout
    assert (project / "killed.parquet").read_bytes() == (project / "one.parquet").read_bytes()


def test_evaluate_on_two_processes_gives_the_same_predictions(project):
    args = ["manifest.parquet", "rpn"]
    for name, nproc in (("one", 1), ("two", 2)):
        res = _sdrpn(
            project,
            "evaluate",
            *args,
            f"eval-{name}.parquet",
            "--metrics",
            f"eval-{name}.json",
            "--plots",
            f"eval-{name}.csv",
            "--work-dir",
            "work",
            nproc=nproc,
        )
        assert res.returncode == 0, res.stderr
    assert (project / "eval-two.parquet").read_bytes() == (project / "eval-one.parquet").read_bytes()
    one, two = (json.loads((project / f"eval-{n}.json").read_text()) for n in ("one", "two"))
    for method in one:  # timings differ, everything else is the same
        assert {k: v for k, v in one[method].items() if "throughput" not in k} == {
            k: v for k, v in two[method].items() if "throughput" not in k
        }


def test_benchmarks_on_two_processes_give_the_same_artifacts(project):
    from benchmark_fixtures import write_fixture

    params = yaml.safe_load((project / "params.yaml").read_text())
    sets = {
        "textvqa": {"path": str(write_fixture("textvqa", "lmms_lab_parquet", project / "data", n=5))},
        "pope": {"path": str(write_fixture("pope", "lmms_lab_parquet", project / "data", n=6))},
    }
    params["benchmarks"].update(sets=sets, batch_size=2, max_new_tokens=3)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name, nproc in (("one", 1), ("two", 2)):
        res = _sdrpn(
            project,
            "benchmarks",
            "rpn",
            f"bench-{name}",
            "--metrics",
            f"bench-{name}.json",
            "--work-dir",
            f"work-{name}",
            "--image-dir",
            "images",
            nproc=nproc,
        )
        assert res.returncode == 0, res.stderr
    for bench in sets:
        for artifact in ("manifest.parquet", "manifest_skips.parquet", "predictions.parquet"):
            one, two = (project / f"bench-{n}" / bench / artifact for n in ("one", "two"))
            assert two.read_bytes() == one.read_bytes(), (bench, artifact)
    one, two = (json.loads((project / f"bench-{n}.json").read_text()) for n in ("one", "two"))
    strip = {"seconds", "throughput_vs_baseline"}
    assert {b: {m: {k: v for k, v in d.items() if k not in strip} for m, d in r.items()} for b, r in one.items()} == {
        b: {m: {k: v for k, v in d.items() if k not in strip} for m, d in r.items()} for b, r in two.items()
    }
