"""Mutation testing of the core modules with mutmut, one module group and its own tests at a time.

Each group gets a fresh copy of the working tree under ``.mutation/<group>/`` (tracked and untracked, not ignored
files), a ``setup.cfg`` that limits mutmut to the group's sources and tests, and one ``mutmut run``. The script
prints, per group, the mutants killed / survived / equivalent and the score (killed over non-equivalent), lists
the survivors (``--diff`` shows each one's change) and writes ``.mutation/summary.json``.

Equivalent mutants (no behaviour a user can see changes) are listed with their reason in
``scripts/mutation_equivalent.toml``; an entry whose mutant no longer exists is reported as stale.

    bash scripts/mutation.sh                      # every group (README: Development, for the run time)
    bash scripts/mutation.sh labels roi --diff    # two groups, with each survivor's diff
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.toml"

# group: (sources mutated, the tests that own them). Tests that spawn processes (DVC, torchrun) are left out:
# a mutant lives in the forked test process only, and they cost minutes per mutant.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "labels": (
        ["pipeline/teacher/labels.py", "pipeline/teacher/label_presets.py"],
        [
            "tests/test_labels.py",
            "tests/test_label_presets.py",
            "tests/test_authors_labels.py",
            "tests/test_label_consistency.py",
            "tests/test_known_bg.py",
            "tests/test_label_report.py",
            "tests/test_label_roi_edges.py",
            "tests/test_params_fields.py",
        ],
    ),
    "roi": (
        ["pipeline/inference/roi.py"],
        [
            "tests/test_roi.py",
            "tests/test_roi_defaults.py",
            "tests/test_label_roi_edges.py",
            "tests/test_params_fields.py",
        ],
    ),
    "attention_capture": (
        ["pipeline/teacher/attention_capture.py", "pipeline/models/attention_math.py"],
        ["tests/test_attention_capture.py", "tests/test_dump_row_flags.py", "tests/test_attention_math.py"],
    ),
    "dump": (
        ["pipeline/teacher/dump.py"],
        ["tests/test_dump_row_flags.py", "tests/test_known_bg.py", "tests/test_dump_selection.py"],
    ),
    "rpn": (["pipeline/student/rpn.py"], ["tests/test_rpn.py", "tests/test_rpn_edges.py"]),
    "train": (
        ["pipeline/student/train.py"],
        ["tests/test_train.py", "tests/test_train_step_math.py", "tests/test_params_fields.py"],
    ),
    "two_stage": (
        ["pipeline/inference/two_stage.py", "pipeline/inference/prefix_cache.py"],
        [
            "tests/test_two_stage.py",
            "tests/test_prefix_cache.py",
            "tests/test_padded_views.py",
            "tests/test_qwen_two_stage.py",
            "tests/test_masked_keep.py",
        ],
    ),
    "scoring": (
        ["pipeline/inference/scoring.py", "pipeline/benchmarks/scorers.py"],
        [
            "tests/test_scoring.py",
            "tests/test_benchmark_scorers.py",
            "tests/test_evaluate_soft_accuracy.py",
            "tests/test_scorer_records.py",
        ],
    ),
    "manifest": (
        ["pipeline/io/manifest.py"],
        [
            "tests/test_manifest.py",
            "tests/test_manifest_duplicates.py",
            "tests/test_faults_inputs.py",
            "tests/test_manifest_boxes.py",
            "tests/test_manifest_sources.py",
            "-k",
            "not inspect",  # inspect needs the embedded model, which mutmut's copy of the tree has not
        ],
    ),
    "contracts": (
        ["pipeline/io/contracts.py"],
        ["tests/test_contracts.py", "tests/test_contracts_full_read.py", "tests/test_contract_details.py"],
    ),
    "attention_store": (
        ["pipeline/io/attention_store.py"],
        ["tests/test_attention_store.py", "tests/test_faults_store.py", "tests/test_attention_store_edges.py"],
    ),
}
# mutmut's statuses: found by the tests, not found, and neither (left out of the score)
KILLED = {"killed", "caught by type check", "timeout", "segfault"}
NOT_KILLED = {"survived", "no tests", "suspicious"}


def equivalent_mutants(path: Path = EQUIVALENT) -> dict[str, str]:
    """Mutant name -> why it cannot change what a user sees."""
    if not path.is_file():
        return {}
    return {name: entry["reason"] for name, entry in tomllib.loads(path.read_text()).items()}


def _copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked plus untracked, ignored files left out) into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for raw in files:
        rel = raw.decode()
        if not rel or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)


def _setup_cfg(sources: list[str], tests: list[str]) -> str:
    # forkserver: mutmut's main process has run the tests (zarr's IO thread, torch's pools), and a child forked
    # from it hangs on the first zarr read; a clean server process forks the mutants' test runs instead
    lines = ["[mutmut]", "source_paths=pipeline", "process_isolation=forkserver", "only_mutate="]
    lines += [f"    {s}" for s in sources]
    lines += ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in tests]
    # mutmut runs the tests in its own copy (mutants/), which holds only the sources and these
    also = ("stages", "schemas", "toymodels", "presets", "tests", "bench", "selection", "params.yaml", "dvc.yaml")
    lines += ["also_copy="] + [f"    {d}" for d in (*also, "README.md", "pyproject.toml", ".dvcignore")]
    return "\n".join(lines) + "\n"


def _mutmut(work: Path, *args: str, log: Path | None = None, check: bool = True) -> str:
    """``mutmut <args>`` in ``work``; the run's noisy progress goes to ``log``, other output is returned."""
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    # one thread each: --jobs test processes share the cores
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if log is None:
        return subprocess.run([mutmut, *args], cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    with open(log, "a") as fh:
        rc = subprocess.run([mutmut, *args], cwd=work, env=env, stdout=fh, stderr=fh).returncode
    if rc != 0 and check:
        raise SystemExit(f"{work.name}: mutmut {args[0]} failed (exit {rc}); see {log}")
    return ""


def _statuses(work: Path) -> dict[str, str]:
    statuses = {}
    for line in _mutmut(work, "results", "--all", "true").splitlines():
        mutant, sep, status = line.strip().rpartition(": ")
        if sep and mutant.startswith("pipeline."):
            statuses[mutant] = status
    return statuses


def run_group(name: str, jobs: int, sample: int = 0, seed: int = 0, only: list[str] | None = None) -> dict:
    """One fresh mutmut run of group ``name``: every mutant, a seeded uniform ``sample`` of them, or the ``only``
    ones (a recheck of earlier survivors); returns the tested mutants' statuses and the wall time."""
    sources, tests = GROUPS[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _copy_tree(work)
    (work / "setup.cfg").write_text(_setup_cfg(sources, tests))
    log = work / "mutmut-run.log"
    start = time.perf_counter()
    population = None
    if only is not None:
        chosen = set(only)
        if not chosen:  # nothing survived before: nothing to test, and mutmut made no mutants to list
            return {"seconds": 0.0, "statuses": {}, "population": 0}
        _mutmut(work, "run", "--max-children", str(jobs), *sorted(chosen), log=log)
    elif sample:
        # mutmut generates every mutant (and collects which tests cover what) before it filters by name: a filter
        # that matches nothing stops it right there with the full list written, to draw the sample from
        _mutmut(work, "run", "--max-children", str(jobs), "list-only-no-such-mutant", log=log, check=False)
        everything = sorted(_statuses(work))
        if not everything:
            raise SystemExit(f"{name}: mutmut generated no mutants; see {log}")
        population = len(everything)
        chosen = set(random.Random(f"{seed}:{name}").sample(everything, min(sample, len(everything))))
        _mutmut(work, "run", "--max-children", str(jobs), *sorted(chosen), log=log)
    else:
        _mutmut(work, "run", "--max-children", str(jobs), log=log)
        chosen = None
    statuses = _statuses(work)
    if chosen is not None:
        statuses = {m: s for m, s in statuses.items() if m in chosen}
    population = population or len(statuses)
    return {"seconds": round(time.perf_counter() - start, 1), "statuses": statuses, "population": population}


def score(statuses: dict[str, str], equivalent: dict[str, str]) -> dict:
    """Counts and the score: killed over the mutants that are neither equivalent nor skipped."""
    counted = {m: s for m, s in statuses.items() if m not in equivalent and (s in KILLED or s in NOT_KILLED)}
    killed = sum(s in KILLED for s in counted.values())
    survivors = sorted(m for m, s in counted.items() if s in NOT_KILLED)
    return {
        "mutants": len(statuses),
        "equivalent": sum(m in equivalent for m in statuses),
        "killed": killed,
        "survived": len(survivors),
        "score": killed / len(counted) if counted else float("nan"),
        "interval": wilson(killed, len(counted)),
        "survivors": survivors,
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k / n (what a sampled score says about the whole group)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (centre - half, centre + half)


def _show(name: str, mutant: str) -> str:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    return subprocess.run([mutmut, "show", mutant], cwd=WORK / name, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    ap.add_argument("--sample", type=int, default=0, help="test a seeded uniform sample of N mutants per group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recheck", type=Path, help="a summary.json: test only its survivors again (after new tests)")
    ap.add_argument("--out", type=Path, default=WORK / "summary.json", help="where the summary JSON goes")
    ap.add_argument("--diff", action="store_true", help="print each survivor's diff")
    args = ap.parse_args()
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        ap.error(f"unknown groups {unknown}; choose from {list(GROUPS)}")
    before = json.loads(args.recheck.read_text()) if args.recheck else None
    groups = args.groups or (list(before) if before else list(GROUPS))
    equivalent = equivalent_mutants()
    summary, total_start = {}, time.perf_counter()
    for name in groups:
        only = before[name]["survivors"] if before else None
        try:
            result = run_group(name, args.jobs, sample=args.sample, seed=args.seed, only=only)
        except SystemExit as exc:  # one group's failure (its log says why) does not lose the others' results
            print(f"{name:18s} FAILED: {exc}", flush=True)
            continue
        s = {"seconds": result["seconds"], "population": result["population"]}
        s |= score(result["statuses"], equivalent)
        if before:  # the earlier run's killed stay killed: tests were only added
            s["killed"] += before[name]["killed"]
            s["equivalent"] += before[name]["equivalent"]
            s["mutants"] = before[name]["mutants"]
            s["population"] = before[name]["population"]
            s["score"] = s["killed"] / max(s["killed"] + s["survived"], 1)
            s["interval"] = wilson(s["killed"], s["killed"] + s["survived"])
        full = not args.sample and not before
        s["stale_equivalents"] = (
            [m for m in equivalent if m.startswith(tuple(_prefixes(name))) and m not in result["statuses"]]
            if full
            else []
        )
        summary[name] = s
        lo, hi = s["interval"]
        print(
            f"{name:18s} {s['killed']:4d} killed {s['survived']:4d} survived {s['equivalent']:3d} equivalent "
            f"of {s['mutants']:4d} tested ({s['population']} in all)  score {s['score']:.1%} "
            f"[{lo:.1%}, {hi:.1%}]  ({s['seconds']:.0f} s)",
            flush=True,
        )
        for mutant in s["survivors"]:
            print(f"    survived: {mutant}")
            if args.diff:
                print("      " + _show(name, mutant).replace("\n", "\n      "))
        for mutant in s["stale_equivalents"]:
            print(f"    stale equivalent entry (no such mutant now): {mutant}")
    killed = sum(s["killed"] for s in summary.values())
    counted = killed + sum(s["survived"] for s in summary.values())
    # a sample per group: weight each group's score by its size to estimate the whole core's
    weighted = sum(s["score"] * s["population"] for s in summary.values()) / max(
        sum(s["population"] for s in summary.values()), 1
    )
    print(
        f"OVERALL {killed} of {counted} tested non-equivalent mutants killed: {killed / max(counted, 1):.1%} "
        f"(weighted by group size: {weighted:.1%}) in {time.perf_counter() - total_start:.0f} s with {args.jobs} jobs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


def _prefixes(name: str) -> list[str]:
    return [src.removesuffix(".py").replace("/", ".") + "." for src in GROUPS[name][0]]


if __name__ == "__main__":
    main()
