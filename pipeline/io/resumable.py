"""Crash-safe work in parts: a long job writes one part per batch and skips finished parts on rerun.

Parts live under ``work_dir/<key>/``; ``key`` hashes everything that determines the result
(inputs and parameters), so a rerun with other inputs never reuses stale parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def job_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable job parameters and input fingerprints."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class PartStore:
    """Numbered Parquet parts of one job; each part is written atomically."""

    def __init__(self, work_dir: str | os.PathLike, name: str, key: str):
        self.dir = Path(work_dir) / f"{name}-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.dir / f"part-{index:09d}.parquet"

    def done(self, index: int) -> bool:
        return self._path(index).is_file()

    def n_done(self) -> int:
        return len(list(self.dir.glob("part-*.parquet")))

    def write(self, index: int, table: pa.Table) -> None:
        tmp = self._path(index).with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self._path(index))

    def collect(self) -> pa.Table:
        """All parts concatenated in index order."""
        parts = sorted(self.dir.glob("part-*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts])

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
