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

from pipeline.io.locks import atomic_path, output_lock


def job_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable job parameters and input fingerprints."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class PartStore:
    """Numbered Parquet parts of one job; each part is written atomically.

    Opening one takes the exclusive lock of its directory (``work_dir/.<name>-<key>.lock``) until
    :meth:`close` or :meth:`cleanup`: a second process on the same job fails at once with ``OutputLocked``
    naming the directory, instead of the two overwriting and deleting each other's parts. Use it as a
    context manager, or let process exit release the lock.
    """

    def __init__(self, work_dir: str | os.PathLike, name: str, key: str):
        self.dir = Path(work_dir) / f"{name}-{key}"
        self._lock = output_lock(self.dir, kind="work dir")
        self._lock.__enter__()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".part-*.tmp"):  # left by a killed writer; ours alone while we hold the lock
                stale.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PartStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, index: int) -> Path:
        return self.dir / f"part-{index:09d}.parquet"

    def done(self, index: int) -> bool:
        return self._path(index).is_file()

    def n_done(self) -> int:
        return len(list(self.dir.glob("part-*.parquet")))

    def write(self, index: int, table: pa.Table) -> None:
        """Write part ``index`` through a unique temp name (the directory's lock covers it)."""
        with atomic_path(self._path(index), lock=False) as tmp:
            pq.write_table(table, tmp)

    def collect(self) -> pa.Table:
        """All parts concatenated in index order."""
        parts = sorted(self.dir.glob("part-*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts])

    def close(self) -> None:
        """Release the directory's lock (idempotent); the parts stay for a later run."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def cleanup(self) -> None:
        """Delete the parts (the job is done) and release the lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.close()
