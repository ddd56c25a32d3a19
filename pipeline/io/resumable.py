"""Crash-safe work in parts: a long job writes one part per batch and skips finished parts on rerun.

Parts live under ``work_dir/<key>/``; ``key`` hashes everything that determines the result
(inputs and parameters), so a rerun with other inputs never reuses stale parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

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

    Under torchrun the ranks of one job share the directory: rank ``r`` of ``world`` writes the parts it owns
    (index % world == r) and locks ``.<name>-<key>.rank<r>.lock`` (rank 0 the plain one), so a second job with
    the same key still fails at once on every rank.
    """

    def __init__(self, work_dir: str | os.PathLike, name: str, key: str, rank: int = 0, world: int = 1):
        self.dir = Path(work_dir) / f"{name}-{key}"
        self.rank, self.world = rank, world
        lock_target = self.dir if rank == 0 else self.dir.with_name(f"{self.dir.name}.rank{rank}")
        self._lock = output_lock(lock_target, kind="work dir")
        self._lock.__enter__()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # temps left by a killed writer; only this rank writes the parts it owns, so their temps are ours
            for stale in self.dir.glob(".part-*.tmp"):
                if self.owns(int(stale.name.split("-")[1].split(".")[0])):
                    stale.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def owns(self, index: int) -> bool:
        """Whether part ``index`` is this rank's to write."""
        return index % self.world == self.rank

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

    def collect(self, n_parts: int | None = None) -> pa.Table:
        """All parts concatenated in index order; with ``n_parts``, first check that parts 0..n_parts-1 all exist
        (a rank that died leaves a gap: the error names the missing parts)."""
        if n_parts is not None:
            missing = [i for i in range(n_parts) if not self.done(i)]
            if missing:
                raise RuntimeError(f"{self.dir}: parts {missing[:5]} of {n_parts} missing ({len(missing)}); rerun")
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


def run_parts(
    parts: PartStore,
    n_parts: int,
    make: Callable[[int], pa.Table],
    size: Callable[[int], int],
    desc: str,
    progress: bool = True,
    poll_seconds: float = 1.0,
) -> bool:
    """Write every part this rank owns and has not finished (``make(i)`` builds part ``i``); returns whether this
    rank is the one to assemble the result (rank 0, once every rank's parts exist).

    Rank 0 shows one progress bar for the whole job: ``size(i)`` samples per finished part, whoever wrote it (so
    samples/s and the ETA are the job's), and after its own parts waits for the others' (a rank that dies takes the
    job down with it under torchrun, so the wait ends). Other ranks return False when their own parts are written.
    """
    bar = tqdm(total=sum(size(i) for i in range(n_parts)), desc=desc, unit="sample", disable=not progress or parts.rank)
    counted: set[int] = set()

    def refresh() -> None:
        done = {i for i in range(n_parts) if i not in counted and parts.done(i)}
        counted.update(done)
        bar.update(sum(size(i) for i in done))

    for i in range(n_parts):
        if parts.owns(i) and not parts.done(i):
            parts.write(i, make(i))
        refresh()
    if parts.rank != 0:
        bar.close()
        return False
    while len(counted) < n_parts:
        time.sleep(poll_seconds)
        refresh()
    bar.close()
    return True
