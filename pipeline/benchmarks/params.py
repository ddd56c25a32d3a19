"""params.yaml ``benchmarks``: which of the paper's benchmarks to run, from which local files (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.benchmarks import BENCHMARKS
from pipeline.config import FieldError, check_min

SET_KEYS = ("path", "image_root", "n")


@dataclass
class BenchmarkSet:
    """One configured benchmark: its distributed file or directory, where its relative image paths resolve,
    and how many of its questions to keep (``None``: all)."""

    name: str
    path: str
    image_root: str | None = None
    n: int | None = None


@dataclass
class BenchmarksParams:
    """The ``benchmarks`` section. ``sets`` maps a benchmark name to ``{path, image_root, n}``; empty: the
    benchmarks stage runs nothing and writes an empty table."""

    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: each task's lmms-eval value; a number caps it (CPU runs, tests)

    def __post_init__(self) -> None:
        check_min("batch_size", self.batch_size)
        check_min("max_new_tokens", self.max_new_tokens, optional=True)
        for name, spec in (self.sets or {}).items():
            where = f"sets.{name}"
            if name not in BENCHMARKS:
                raise FieldError(where, f"unknown benchmark; known: {list(BENCHMARKS)}")
            unknown = sorted(set(spec) - set(SET_KEYS))
            if unknown:
                raise FieldError(f"{where}.{unknown[0]}", f"unknown key; known: {list(SET_KEYS)}")
            path = spec.get("path")
            if not isinstance(path, str) or not path.strip():
                raise FieldError(f"{where}.path", "name the benchmark's local file or directory")
            if not Path(path).exists():
                raise FieldError(f"{where}.path", f"{path} does not exist")
            root = spec.get("image_root")
            if root is not None and not (isinstance(root, str) and Path(root).is_dir()):
                raise FieldError(f"{where}.image_root", f"{root!r} is not a directory")
            check_min(f"{where}.n", spec.get("n"), optional=True)

    def selected(self) -> list[BenchmarkSet]:
        """The configured benchmarks in the paper's order (Table 1, then Table 2)."""
        sets = self.sets or {}
        return [BenchmarkSet(name, **sets[name]) for name in BENCHMARKS if name in sets]
