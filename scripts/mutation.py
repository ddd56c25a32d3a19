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
import os
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
        ],
    ),
    "roi": (["pipeline/inference/roi.py"], ["tests/test_roi.py", "tests/test_roi_defaults.py"]),
    "attention_capture": (
        ["pipeline/teacher/attention_capture.py", "pipeline/models/attention_math.py"],
        ["tests/test_attention_capture.py", "tests/test_dump_row_flags.py"],
    ),
    "dump": (["pipeline/teacher/dump.py"], ["tests/test_dump_row_flags.py", "tests/test_known_bg.py"]),
    "rpn": (["pipeline/student/rpn.py"], ["tests/test_rpn.py"]),
    "train": (["pipeline/student/train.py"], ["tests/test_train.py", "tests/test_train_step_math.py"]),
    "two_stage": (
        ["pipeline/inference/two_stage.py", "pipeline/inference/prefix_cache.py"],
        ["tests/test_two_stage.py", "tests/test_prefix_cache.py", "tests/test_padded_views.py"],
    ),
    "scoring": (
        ["pipeline/inference/scoring.py", "pipeline/benchmarks/scorers.py"],
        ["tests/test_scoring.py", "tests/test_benchmark_scorers.py", "tests/test_evaluate_soft_accuracy.py"],
    ),
    "manifest": (["pipeline/io/manifest.py"], ["tests/test_manifest.py", "tests/test_manifest_duplicates.py"]),
    "contracts": (["pipeline/io/contracts.py"], ["tests/test_contracts.py", "tests/test_contracts_full_read.py"]),
    "attention_store": (
        ["pipeline/io/attention_store.py"],
        ["tests/test_attention_store.py", "tests/test_faults_store.py"],
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
    lines = ["[mutmut]", "source_paths=pipeline", "only_mutate="]
    lines += [f"    {s}" for s in sources]
    lines += ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in tests]
    lines += ["also_copy="] + [f"    {d}" for d in ("stages", "schemas", "toymodels", "presets", "tests", "bench")]
    return "\n".join(lines) + "\n"


def run_group(name: str, jobs: int) -> dict:
    """One fresh ``mutmut run`` of group ``name``; returns its mutants' statuses and the wall time."""
    sources, tests = GROUPS[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _copy_tree(work)
    (work / "setup.cfg").write_text(_setup_cfg(sources, tests))
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    with open(work / "mutmut-run.log", "w") as log:
        rc = subprocess.run([mutmut, "run", "--max-children", str(jobs)], cwd=work, env=env, stdout=log, stderr=log)
    seconds = time.perf_counter() - start
    if rc.returncode != 0:
        raise SystemExit(f"{name}: mutmut run failed (exit {rc.returncode}); see {work / 'mutmut-run.log'}")
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=work, env=env, check=True, capture_output=True, text=True
    ).stdout
    statuses = {}
    for line in listing.splitlines():
        mutant, sep, status = line.strip().rpartition(": ")
        if sep and mutant.startswith("pipeline."):
            statuses[mutant] = status
    return {"seconds": round(seconds, 1), "statuses": statuses}


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
        "survivors": survivors,
    }


def _show(name: str, mutant: str) -> str:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    return subprocess.run([mutmut, "show", mutant], cwd=WORK / name, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    ap.add_argument("--diff", action="store_true", help="print each survivor's diff")
    args = ap.parse_args()
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        ap.error(f"unknown groups {unknown}; choose from {list(GROUPS)}")
    equivalent = equivalent_mutants()
    summary, total_start = {}, time.perf_counter()
    for name in args.groups or list(GROUPS):
        result = run_group(name, args.jobs)
        summary[name] = {"seconds": result["seconds"], **score(result["statuses"], equivalent)}
        stale = [m for m in equivalent if m.startswith(tuple(_prefixes(name))) and m not in result["statuses"]]
        summary[name]["stale_equivalents"] = stale
        s = summary[name]
        print(
            f"{name:18s} {s['killed']:4d} killed {s['survived']:4d} survived {s['equivalent']:3d} equivalent "
            f"of {s['mutants']:4d}  score {s['score']:.1%}  ({s['seconds']:.0f} s)",
            flush=True,
        )
        for mutant in s["survivors"]:
            print(f"    survived: {mutant}")
            if args.diff:
                print("      " + _show(name, mutant).replace("\n", "\n      "))
        for mutant in stale:
            print(f"    stale equivalent entry (no such mutant now): {mutant}")
    killed = sum(s["killed"] for s in summary.values())
    counted = killed + sum(s["survived"] for s in summary.values())
    print(
        f"OVERALL {killed} of {counted} non-equivalent mutants killed: {killed / max(counted, 1):.1%} "
        f"in {time.perf_counter() - total_start:.0f} s with {args.jobs} jobs"
    )
    WORK.mkdir(exist_ok=True)
    (WORK / "summary.json").write_text(json.dumps(summary, indent=1))


def _prefixes(name: str) -> list[str]:
    return [src.removesuffix(".py").replace("/", ".") + "." for src in GROUPS[name][0]]


if __name__ == "__main__":
    main()
