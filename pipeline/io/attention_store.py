"""Zarr 3 I/O for the attention store (contract ``schemas/attention_store.v3.json``).

One row per sample. Every array is chunked along samples only (``chunk_samples`` rows, the unit a reader
decodes) and sharded (zarr 3 ``shards=``): ``shard_samples`` rows, a whole number of chunks, live in one
file per array. A shard is also the unit of writing: the writer buffers rows until a whole shard is present,
writes the shard to every array, then records it done in its own small file next to the store
(``.<store>.done/<shard>.json``, with the size and sha256 of each array's shard file). Writers of different
shards (the ranks of a distributed dump) never touch the same file, a crash never leaves a half-written
shard marked done, and a rerun skips the finished shards. :meth:`AttentionStoreWriter.finalize` checks every
shard's files against its record, moves the records into the store's attrs (``done_shards``,
``shard_checksums``) in one write, marks the store complete and removes the record folder.

Readers never take a missing shard for zeros: at open every finished shard's file must exist with its
recorded size, and the first read of each shard checks its bytes against the recorded sha256; a missing,
truncated or altered shard is a :class:`ChunkError` naming the store, the array, the shard and its samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.codecs import BloscCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from pipeline.io.contracts import ContractError, load_schema

SCHEMA_NAME = "attention_store"
MIN_CHUNK_SAMPLES = 256
# A shard holds as many chunks as fit this many bytes of its largest array (uncompressed), at most
# MAX_SHARD_CHUNKS: the writer buffers one shard, and a store of 152K samples stays a few hundred files
# (bench/bench_dump_scale.py) while leaving enough shards to spread over the ranks of a distributed dump.
SHARD_BYTES = 512 * 2**20
MAX_SHARD_CHUNKS = 16
ARRAYS = ("sample_id", "grid", "n_response", "attention", "hidden_norm")
# Optional arrays: a store without them still reads (their Block field is None). known_bg (n, max_visual) bool:
# tokens known to show no image content (the padding of a square view), written when the adapter knows them.
OPTIONAL_ARRAYS = ("known_bg",)
# A shard of at most this many bytes (decoded, every numeric array) is read whole by iter_chunks: one file read
# per array instead of an index read and a range read per chunk (bench/bench_label.py: 1.7 s vs 3.2 s of reads)
READ_BYTES = 64 * 2**20
# Every shard is written even when equal to the fill value (zarr skips those by default), so a finished
# shard always has a file and a missing file is always an error.
_WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


class ChunkError(ContractError):
    """A finished shard of the store is missing, truncated or altered; the message names store, array, samples."""


class Block(NamedTuple):
    """Rows ``start:stop`` of the store as numpy arrays."""

    start: int
    stop: int
    sample_ids: np.ndarray  # (n,) str
    grid: np.ndarray  # (n, 2) int32
    n_response: np.ndarray  # (n,) int32
    attention: np.ndarray  # (n, L, V) or (n, L, H, V) float32
    hidden_norm: np.ndarray  # (n, L, V) float32
    known_bg: np.ndarray | None = None  # (n, V) bool when the store has it: padding of the view, not image content


def _compressor() -> BloscCodec:
    # Byte shuffle groups float exponents together, which is most of the gain on attention maps.
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _schema_version() -> int:
    return load_schema(SCHEMA_NAME).version


def records_dir(path: str | os.PathLike) -> Path:
    """Folder of the per-shard completion records of the store at ``path``: ``<folder>/.<name>.done``."""
    p = Path(os.path.abspath(path))
    return p.parent / f".{p.name}.done"


def shard_samples_for(chunk_samples: int, row_bytes: int, n_samples: int) -> int:
    """Samples per shard: whole chunks, at most SHARD_BYTES of the largest array (``row_bytes`` a sample)."""
    k = max(1, min(MAX_SHARD_CHUNKS, SHARD_BYTES // max(1, chunk_samples * row_bytes)))
    n_chunks = -(-n_samples // chunk_samples)
    return min(k, n_chunks) * chunk_samples


def _merge_ranges(units: Sequence[int], unit_samples: int, n_samples: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for u in sorted(units):
        start, stop = u * unit_samples, min((u + 1) * unit_samples, n_samples)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def _shard_key(arr: zarr.Array, s: int) -> str:
    """Store key of sample-shard ``s`` of ``arr`` (every array has one shard along its other dims)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))}"


def _file_checksum(path: Path) -> str | None:
    """``"<bytes>:<sha256>"`` of a file, None when it does not exist; streamed, so a shard is never held whole."""
    try:
        with open(path, "rb") as fh:
            return _checksum_entry(os.fstat(fh.fileno()).st_size, hashlib.file_digest(fh, "sha256").hexdigest())
    except FileNotFoundError:
        return None


def _describe(path: str | os.PathLike, name: str, s: int, shard_samples: int, n: int, ids: Any = None) -> str:
    """``<store>: array 'x' shard s (samples a..b, ids 'first'..'last')``; ids only when known."""
    a, b = s * shard_samples, min((s + 1) * shard_samples, n) - 1
    named = f", ids {str(ids[a])!r}..{str(ids[b])!r}" if ids is not None and name != "sample_id" else ""
    return f"{path}: array {name!r} shard {s} (samples {a}..{b}{named})"


class _VerifiedStore(WrapperStore):
    """Checks each finished shard's bytes against its recorded size and sha256 the first time zarr reads it.

    ``expected`` maps a shard's store key to (array, shard, bytes, sha256); other keys (metadata, shards not
    finished) pass through. Zarr reads a shard in byte ranges (its index, then each chunk): before the first
    of them the whole file is hashed once, streamed from disk (the page cache then serves zarr's reads).
    """

    def __init__(self, store: LocalStore, state: dict[str, Any] | None = None) -> None:
        super().__init__(store)
        # shared with copies zarr makes through _with_store
        self.state = state if state is not None else {"expected": {}, "verified": set(), "describe": None}

    def _with_store(self, store: LocalStore) -> _VerifiedStore:
        return type(self)(store, self.state)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        want = self.state["expected"].get(key)
        if want is None or key in self.state["verified"]:
            return await self._store.get(key, prototype, byte_range)
        name, s, size, digest = want
        where = self.state["describe"](name, s)
        entry = _file_checksum(Path(self._store.root) / key)  # the whole file: the checksum covers all of it
        if entry is None:
            raise ChunkError(f"{where} is missing: {key} is not in the store")
        got_size, _, got_digest = entry.partition(":")
        if int(got_size) != size:
            raise ChunkError(f"{where} is truncated or altered ({got_size} bytes on disk, {size} recorded)")
        if got_digest != digest:
            raise ChunkError(f"{where} is corrupt: its bytes do not match the sha256 recorded when it was written")
        self.state["verified"].add(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def _creating_dirs(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.creating-*"))


def _remove_orphans(path: Path) -> None:
    """Remove half-created stores of ``path`` whose creating process is gone (killed during create)."""
    for tmp in _creating_dirs(path):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _record_name(s: int) -> str:
    return f"{s:06d}.json"


def _write_record(folder: Path, s: int, samples: tuple[int, int], checksums: dict[str, str]) -> None:
    """Record shard ``s`` done: its own file, written under a unique temp name and renamed (atomic)."""
    tmp = folder / f".{_record_name(s)}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.write_text(json.dumps({"shard": s, "samples": list(samples), "checksums": checksums}, sort_keys=True))
    os.replace(tmp, folder / _record_name(s))


def _read_records(folder: Path, n_shards: int) -> dict[int, dict[str, str]]:
    """``{shard: {array: "<bytes>:<sha256>"}}`` of the records in ``folder``; unreadable ones are not done."""
    out: dict[int, dict[str, str]] = {}
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
            s = int(rec["shard"])
            sums = {str(k): str(v) for k, v in rec["checksums"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a record is renamed into place whole; anything else is not ours
        if f.name == _record_name(s) and 0 <= s < n_shards:
            out[s] = sums
    return out


class AttentionStoreWriter:
    """Shard-aligned, resumable writer; use :meth:`create` or :meth:`open_existing`.

    Several processes may write one store at once, each its own shards (:meth:`pending_units`,
    :meth:`unit_range`), after one of them created it; one process then calls :meth:`finalize`.
    """

    def __init__(self, group: zarr.Group, path: Path) -> None:
        self.path = path
        self._group = group
        attrs = dict(group.attrs)
        self.n_samples = int(group["grid"].shape[0])
        self.chunk_samples = int(attrs["chunk_samples"])
        self.shard_samples = int(attrs["shard_samples"])
        self.layers = list(attrs["layers"])
        self.per_head = bool(attrs["per_head"])
        self.max_visual = int(group["attention"].shape[-1])
        self.n_shards = -(-self.n_samples // self.shard_samples)
        self._arrays = {
            name: group[name].with_config(_WRITE_EVERY_CHUNK) for name in (*ARRAYS, *OPTIONAL_ARRAYS) if name in group
        }
        self.has_known_bg = "known_bg" in self._arrays
        self._records = records_dir(path)
        self._load_records()
        # shard index -> (row buffers, filled mask) for shards that are only partly supplied so far
        self._pending: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        n_samples: int,
        layers: Sequence[int],
        max_visual: int,
        heads: Sequence[int] | None = None,
        attrs: dict[str, Any] | None = None,
        chunk_samples: int = MIN_CHUNK_SAMPLES,
        known_bg: bool = False,
        shard_samples: int | None = None,
    ) -> AttentionStoreWriter:
        """Create an empty store (overwriting ``path``); ``heads=None`` stores the head-mean.

        ``known_bg`` adds the optional (n, max_visual) bool array of tokens known to be padding of the view.
        ``shard_samples`` (rounded up to whole chunks) defaults to :func:`shard_samples_for`. The store is built
        in a hidden sibling folder and renamed to ``path`` when whole, so a process killed during creation
        leaves no ``path`` that a rerun would try to resume.
        """
        if n_samples < 1 or max_visual < 1 or not layers:
            raise ValueError("n_samples, max_visual and layers must be non-empty")
        # Larger chunks keep the reader's per-chunk overhead low; a store smaller than one chunk is one chunk.
        chunk_samples = min(max(int(chunk_samples), MIN_CHUNK_SAMPLES), n_samples)
        n_layers = len(layers)
        per_head = heads is not None
        att_shape = (n_samples, n_layers, len(heads), max_visual) if per_head else (n_samples, n_layers, max_visual)
        if shard_samples is None:
            shard_samples = shard_samples_for(chunk_samples, 4 * int(np.prod(att_shape[1:])), n_samples)
        n_chunks = -(-n_samples // chunk_samples)
        shard_samples = min(-(-max(int(shard_samples), 1) // chunk_samples), n_chunks) * chunk_samples
        path = Path(path)
        _remove_orphans(path)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        group = zarr.open_group(str(tmp), mode="w")

        def add(name: str, shape: tuple[int, ...], dtype: Any, **kw: Any) -> None:
            rest = shape[1:]
            group.create_array(
                name, shape=shape, chunks=(chunk_samples, *rest), shards=(shard_samples, *rest), dtype=dtype, **kw
            )

        common = {"fill_value": 0, "compressors": _compressor()}
        add("sample_id", (n_samples,), str, fill_value="")
        add("grid", (n_samples, 2), "int32", **common)
        add("n_response", (n_samples,), "int32", **common)
        add("attention", att_shape, "float32", **common)
        add("hidden_norm", (n_samples, n_layers, max_visual), "float32", **common)
        if known_bg:
            add("known_bg", (n_samples, max_visual), "bool", fill_value=False, compressors=_compressor())
        n_shards = -(-n_samples // shard_samples)
        meta = dict(attrs or {})
        meta.setdefault("model_id", "")
        meta.setdefault("include_eos", False)
        meta.setdefault("params", {})
        meta.setdefault("inputs", {})
        meta.update(
            schema=SCHEMA_NAME,
            version=_schema_version(),
            layers=[int(x) for x in layers],
            heads=[int(h) for h in heads] if per_head else "mean",
            per_head=per_head,
            chunk_samples=chunk_samples,
            shard_samples=shard_samples,
            complete=False,
            done_shards=[],
            # {array: one "<bytes>:<sha256 hex>" per shard}, None until finalize moves the records here
            shard_checksums={name: [None] * n_shards for name in sorted(group.array_keys())},
        )
        group.update_attributes(meta)
        # records of an older store at this path must not mark shards of the new one done
        shutil.rmtree(records_dir(path), ignore_errors=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        records_dir(path).mkdir()
        return cls(zarr.open_group(str(path), mode="r+"), path)

    @classmethod
    def open_existing(cls, path: str | os.PathLike, check: bool = True) -> AttentionStoreWriter:
        """Reopen a store to resume writing; finished shards are listed by :meth:`pending_units`.

        ``check`` (one process, before any other writes): delete the temp files of writes cut short by a kill,
        and check every finished shard against its checksums; one that is missing, truncated or altered is
        dropped from the finished list (with a warning) and written again by the resumed run. The other
        processes of a distributed dump open the store with ``check=False`` once that is done.
        """
        try:
            group = zarr.open_group(str(path), mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise ContractError(f"{path}: not a zarr attention store, cannot resume ({e})") from e
        _check_header(dict(group.attrs), path)
        writer = cls(group, Path(path))
        if check:
            # temps of shard or record writes cut short by a kill: never read, but they would change the hash
            for stray in [*Path(path).rglob("*.partial"), *writer._records.glob(".*.tmp")]:
                stray.unlink(missing_ok=True)
            writer._records.mkdir(exist_ok=True)
            writer._recheck_done()
        return writer

    @staticmethod
    def resumable(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a store of this schema version (an older layout cannot be resumed)."""
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return False
        return attrs.get("schema") == SCHEMA_NAME and attrs.get("version") == _schema_version()

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    def unit_range(self, s: int) -> tuple[int, int]:
        """Half-open sample range of shard ``s`` (the unit a process writes and a rerun redoes)."""
        return s * self.shard_samples, min((s + 1) * self.shard_samples, self.n_samples)

    def pending_units(self) -> list[int]:
        """Shards not yet recorded done (by this process or, as of opening, by any other)."""
        return [s for s in range(self.n_shards) if s not in self._checksums]

    def pending_ranges(self) -> list[tuple[int, int]]:
        """Half-open sample ranges whose shards are not yet completely written."""
        return _merge_ranges(self.pending_units(), self.shard_samples, self.n_samples)

    def write(
        self,
        start: int,
        sample_ids: Sequence[str] | np.ndarray,
        grid: np.ndarray,
        n_response: np.ndarray,
        attention: np.ndarray,
        hidden_norm: np.ndarray,
        known_bg: np.ndarray | None = None,
    ) -> None:
        """Write rows ``start : start + len(sample_ids)``; the last axis may be shorter than max_visual (0-padded).

        Rows are buffered until their shard is whole, then the shard is written and recorded. ``known_bg``
        (n, <=max_visual) bool goes to the store's optional array (all False when omitted); a store created
        without it refuses one.
        """
        rows = self._check_block(start, sample_ids, grid, n_response, attention, hidden_norm, known_bg)
        n = len(rows["sample_id"])
        first, last = start // self.shard_samples, (start + n - 1) // self.shard_samples
        for s in range(first, last + 1):
            s0, s1 = self.unit_range(s)
            lo, hi = max(s0, start), min(s1, start + n)
            part = {k: v[lo - start : hi - start] for k, v in rows.items()}
            if lo == s0 and hi == s1 and s not in self._pending:
                self._flush(s, part)
                continue
            bufs, filled = self._pending.get(s) or self._new_buffer(s1 - s0)
            for k, v in part.items():
                bufs[k][lo - s0 : hi - s0] = v
            filled[lo - s0 : hi - s0] = True
            self._pending[s] = (bufs, filled)
            if filled.all():
                del self._pending[s]
                self._flush(s, bufs)

    def finalize(self) -> None:
        """Check every shard against its record and mark the store complete; raises if any is missing or bad.

        Reads the records of every process first. A shard whose files do not match its record loses the
        record (a rerun writes it again) and is a :class:`ChunkError` naming it.
        """
        self._load_records()
        missing = self.pending_ranges()
        if missing:
            raise ContractError(f"{self.path}: cannot finalize, sample ranges not written: {missing[:5]}")
        bad = self._bad_shards(sorted(self._checksums))
        if bad:
            self._drop(bad)
            what = ", ".join(f"shard {s} {_samples(s, self.shard_samples, self.n_samples)}" for s in bad[:5])
            raise ChunkError(
                f"{self.path}: finished {what} missing, truncated or altered on disk; rerun to write them again"
            )
        sums = {k: [self._checksums[s][k] for s in range(self.n_shards)] for k in sorted(self._arrays)}
        self._group.update_attributes(
            {"done_shards": list(range(self.n_shards)), "shard_checksums": sums, "complete": True}
        )
        shutil.rmtree(self._records, ignore_errors=True)

    def _load_records(self) -> None:
        """``self._checksums``: {shard: {array: entry}} from the store's attrs and the record folder."""
        attrs = dict(self._group.attrs)
        recorded = attrs.get("shard_checksums") or {}
        self._checksums: dict[int, dict[str, str]] = {}
        for s in attrs.get("done_shards", []):
            entries = {k: (recorded.get(k) or [None] * self.n_shards)[s] for k in self._arrays}
            if all(isinstance(v, str) for v in entries.values()):
                self._checksums[int(s)] = entries
        for s, sums in _read_records(self._records, self.n_shards).items():
            if set(sums) == set(self._arrays):
                self._checksums[s] = sums

    def _new_buffer(self, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        bufs = {
            k: (np.empty(n, dtype=object) if k == "sample_id" else np.zeros((n, *a.shape[1:]), dtype=a.dtype))
            for k, a in self._arrays.items()
        }
        return bufs, np.zeros(n, dtype=bool)

    def _flush(self, s: int, rows: dict[str, np.ndarray]) -> None:
        s0, s1 = self.unit_range(s)
        for k, arr in self._arrays.items():
            arr[s0:s1] = rows[k]
        self._record(s)

    def _shard_file(self, name: str, s: int) -> Path:
        return self.path / _shard_key(self._arrays[name], s)

    def _record(self, s: int) -> None:
        """Mark shard ``s`` done with the size and sha256 of each array's shard file, in its own record file."""
        sums = {}
        for name in sorted(self._arrays):
            entry = _file_checksum(self._shard_file(name, s))
            if entry is None:
                raise ContractError(f"{self.path}: array {name!r} shard {s} was written but has no file")
            sums[name] = entry
        # Recorded only after every array holds the shard: this is the crash-safety point.
        _write_record(self._records, s, self.unit_range(s), sums)
        self._checksums[s] = sums

    def _bad_shards(self, shards: Sequence[int]) -> list[int]:
        """The shards among ``shards`` whose files do not have their recorded size and sha256."""
        jobs = [(s, k) for s in shards for k in sorted(self._arrays)]
        # hashlib releases the GIL on large buffers: a few threads read and hash shards side by side
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            got = list(pool.map(lambda job: _file_checksum(self._shard_file(job[1], job[0])), jobs))
        return sorted({s for (s, k), entry in zip(jobs, got, strict=True) if entry != self._checksums[s][k]})

    def _drop(self, shards: Sequence[int]) -> None:
        """Forget that ``shards`` are done: their records go, and so does the store's claim to be complete."""
        for s in shards:
            (self._records / _record_name(s)).unlink(missing_ok=True)
            self._checksums.pop(s, None)
        attrs = dict(self._group.attrs)
        if attrs.get("done_shards"):
            self._records.mkdir(exist_ok=True)
            for s in attrs["done_shards"]:  # the finished store's other shards stay done, as records
                if s in self._checksums:
                    _write_record(self._records, s, self.unit_range(s), self._checksums[s])
            self._group.update_attributes(
                {
                    "done_shards": [],
                    "shard_checksums": {k: [None] * self.n_shards for k in sorted(self._arrays)},
                    "complete": False,
                }
            )

    def _recheck_done(self) -> None:
        bad = self._bad_shards(sorted(self._checksums))
        if bad:
            what = ", ".join(f"shard {s} {_samples(s, self.shard_samples, self.n_samples)}" for s in bad)
            warnings.warn(
                f"{self.path}: finished {what} missing, truncated or altered on disk; will be written again",
                stacklevel=3,
            )
            self._drop(bad)

    def _check_block(
        self, start, sample_ids, grid, n_response, attention, hidden_norm, known_bg=None
    ) -> dict[str, np.ndarray]:
        n = len(sample_ids)
        if n == 0 or start < 0 or start + n > self.n_samples:
            raise ValueError(f"rows {start}:{start + n} outside the store's {self.n_samples} samples")
        ids = np.asarray(sample_ids, dtype=object)
        grid = np.asarray(grid, dtype=np.int32).reshape(n, 2)
        n_response = np.asarray(n_response, dtype=np.int32).reshape(n)
        att_ndim = 4 if self.per_head else 3
        att_shape = self._arrays["attention"].shape[1:-1]
        attention, hidden_norm = np.asarray(attention, np.float32), np.asarray(hidden_norm, np.float32)
        if attention.ndim != att_ndim or attention.shape[0] != n or attention.shape[1:-1] != att_shape:
            raise ValueError(f"attention block shape {attention.shape}, store wants ({n}, {att_shape}, <=V)")
        if hidden_norm.shape[:2] != (n, len(self.layers)):
            raise ValueError(f"hidden_norm block shape {hidden_norm.shape}, store wants ({n}, {len(self.layers)}, <=V)")
        area = grid[:, 0].astype(np.int64) * grid[:, 1]
        if (grid < 1).any() or (area > self.max_visual).any():
            bad = ids[(area > self.max_visual) | (grid < 1).any(axis=1)][:5]
            raise ValueError(f"grid_h*grid_w outside 1..max_visual={self.max_visual} for samples {list(bad)}")
        rows = {
            "sample_id": ids,
            "grid": grid,
            "n_response": n_response,
            "attention": self._pad(attention),
            "hidden_norm": self._pad(hidden_norm),
        }
        if known_bg is not None and not self.has_known_bg:
            raise ValueError(f"{self.path}: store was created without known_bg (create it with known_bg=True)")
        if self.has_known_bg:
            kb = np.zeros((n, self.max_visual), bool) if known_bg is None else self._pad(np.asarray(known_bg, bool))
            if kb.shape != (n, self.max_visual):
                raise ValueError(f"known_bg block shape {np.shape(known_bg)}, store wants ({n}, <=V)")
            past = kb & (np.arange(self.max_visual) >= area[:, None])
            if past.any():
                bad = ids[past.any(axis=1)][:5]
                raise ValueError(f"known_bg marks tokens past grid_h*grid_w for samples {list(bad)}")
            rows["known_bg"] = kb
        return rows

    def _pad(self, x: np.ndarray) -> np.ndarray:
        extra = self.max_visual - x.shape[-1]
        if extra < 0:
            raise ValueError(f"last axis {x.shape[-1]} exceeds max_visual {self.max_visual}")
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def _check_header(attrs: dict[str, Any], path: str | os.PathLike) -> None:
    if attrs.get("schema") != SCHEMA_NAME:
        raise ContractError(f"{path}: is a {attrs.get('schema')!r} artifact, expected {SCHEMA_NAME!r}")
    if attrs.get("version") in (1, 2) and _schema_version() == 3:
        raise ContractError(
            f"{path}: written with one file per chunk (attention_store v{attrs.get('version')}); this code reads "
            "the sharded layout (v3), where each file holds many chunks; delete it and rerun dump"
        )
    if attrs.get("version") != _schema_version():
        raise ContractError(
            f"{path}: {SCHEMA_NAME} schema version {attrs.get('version')} but this code reads v{_schema_version()}; "
            "rerun the stage that makes it"
        )


class AttentionStore:
    """A validated, read-only attention store; open with :func:`open_attention_store`.

    Every finished shard is checked against its recorded sha256 the first time it is read (once per store
    object); reads of a damaged shard raise :class:`ChunkError`.
    """

    def __init__(self, group: zarr.Group, path: Path) -> None:
        self.path = path
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.layers: list[int] = [int(x) for x in self.attrs["layers"]]
        self.per_head: bool = bool(self.attrs["per_head"])
        self.heads: list[int] | None = [int(h) for h in self.attrs["heads"]] if self.per_head else None
        self.model_id: str = str(self.attrs.get("model_id", ""))
        self._arrays = {name: group[name] for name in (*ARRAYS, *OPTIONAL_ARRAYS) if name in group}
        self.has_known_bg: bool = "known_bg" in self._arrays
        self.n_samples: int = int(self._arrays["grid"].shape[0])
        self.max_visual: int = int(self._arrays["attention"].shape[-1])
        self.chunk_samples: int = int(self._arrays["attention"].chunks[0])
        self.shard_samples: int = int(self.attrs["shard_samples"])
        # All sample ids and the small per-sample arrays, read once (per-chunk reads of small arrays cost more
        # in zarr overhead than data); the ids first, so later shard errors can name the samples.
        self.sample_ids: np.ndarray = np.asarray(self._arrays["sample_id"][:])
        if isinstance(group.store, _VerifiedStore):
            ids = self.sample_ids
            group.store.state["describe"] = lambda name, s: _describe(
                path, name, s, self.shard_samples, self.n_samples, ids
            )
        self.grid: np.ndarray = self._arrays["grid"][:]
        self.n_response: np.ndarray = self._arrays["n_response"][:]

    def __len__(self) -> int:
        return self.n_samples

    def read(self, start: int, stop: int) -> Block:
        """Rows ``start:stop`` (any range; chunk-aligned ranges avoid decoding a chunk twice)."""
        a = self._arrays
        return Block(
            start,
            stop,
            self.sample_ids[start:stop],
            self.grid[start:stop],
            self.n_response[start:stop],
            a["attention"][start:stop],
            a["hidden_norm"][start:stop],
            a["known_bg"][start:stop] if self.has_known_bg else None,
        )

    def chunk_ranges(self) -> list[tuple[int, int]]:
        step = self.chunk_samples
        return [(s, min(s + step, self.n_samples)) for s in range(0, self.n_samples, step)]

    def _read_step(self) -> int:
        """Samples read at once by :meth:`iter_chunks`: a whole shard when it is small, else one chunk."""
        row = sum(a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in self._arrays.values() if a.dtype.kind != "T")
        return self.shard_samples if self.shard_samples * row <= READ_BYTES else self.chunk_samples

    def iter_chunks(self, prefetch: bool = True) -> Iterator[Block]:
        """Yield one :class:`Block` per zarr chunk; ``prefetch`` decodes the next read on a thread meanwhile.

        A shard of at most READ_BYTES is read whole (one file read per array) and cut into its chunks.
        """
        step = self._read_step()
        reads = [(s, min(s + step, self.n_samples)) for s in range(0, self.n_samples, step)]
        for block in self._reads(reads, prefetch):
            for a in range(block.start, block.stop, self.chunk_samples):
                yield _cut(block, a, min(a + self.chunk_samples, block.stop))

    def _reads(self, ranges: list[tuple[int, int]], prefetch: bool) -> Iterator[Block]:
        if not prefetch:
            for s, e in ranges:
                yield self.read(s, e)
            return
        # Blosc and numpy release the GIL, so decoding read k+1 overlaps the caller's work on read k.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self.read, *ranges[0]) if ranges else None
            for k in range(len(ranges)):
                block = future.result()
                if k + 1 < len(ranges):
                    future = pool.submit(self.read, *ranges[k + 1])
                yield block


def _cut(block: Block, start: int, stop: int) -> Block:
    """Rows ``start:stop`` of ``block`` (views, no copy)."""
    if (start, stop) == (block.start, block.stop):
        return block
    a, b = start - block.start, stop - block.start
    return Block(start, stop, *(None if x is None else x[a:b] for x in block[2:]))


def open_attention_store(path: str | os.PathLike, require_complete: bool = True) -> AttentionStore:
    """Open and validate a store: schema/version, completeness, array shapes/dtypes, shard files and grids.

    ``require_complete=False`` also opens a store whose dump has not finished; its finished shards (recorded
    in attrs or in the record folder next to it) are checked as usual, the others read as zeros.
    """
    store = _VerifiedStore(LocalStore(str(path), read_only=True))
    try:
        group = zarr.open_group(store=store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise ContractError(f"{path}: not a zarr attention store ({e})") from e
    attrs = dict(group.attrs)
    _check_header(attrs, path)
    shard = int(attrs.get("shard_samples", 1))
    n = int(group["grid"].shape[0]) if "grid" in group else 0
    n_shards = -(-n // shard)
    done = {int(s) for s in attrs.get("done_shards", [])}
    records = _read_records(records_dir(path), n_shards)
    if require_complete and attrs.get("complete") is not True:
        missing = _merge_ranges([s for s in range(n_shards) if s not in done | set(records)], shard, n)[:5]
        raise ContractError(f"{path}: incomplete store (dump not finished); unwritten sample ranges {missing}")
    for key in ("layers", "per_head", "heads"):
        if key not in attrs:
            raise ContractError(f"{path}: attrs lack {key!r}")
    for name in ARRAYS:
        if name not in group:
            raise ContractError(f"{path}: missing array {name!r}")
    arrays = _check_arrays(group, attrs, path)
    expected = _expected_shards(arrays, attrs, done, records, path, require_complete)
    store.state["expected"] = expected
    store.state["describe"] = lambda name, s: _describe(path, name, s, shard, n)
    # sample_id first: reading it (AttentionStore does) lets every later shard error name its samples' ids.
    first = {k: v for k, v in expected.items() if v[0] == "sample_id"}
    _check_shard_files(first, Path(path), store.state["describe"])
    opened = AttentionStore(group, Path(path))
    rest = {k: v for k, v in expected.items() if k not in first}
    _check_shard_files(rest, Path(path), store.state["describe"])
    _check_grid(opened, path)
    return opened


def _check_arrays(group: zarr.Group, attrs: dict[str, Any], path: str | os.PathLike) -> dict[str, zarr.Array]:
    """Shapes, dtypes, chunking and sharding of every array against the contract (metadata only)."""
    arrs = {name: group[name] for name in ARRAYS}
    n = arrs["grid"].shape[0]
    n_layers = len(attrs["layers"])
    att = arrs["attention"]
    v = att.shape[-1]
    att_shape = (n, n_layers, len(attrs["heads"]), v) if attrs["per_head"] else (n, n_layers, v)
    want = {
        "sample_id": ((n,), None),
        "grid": ((n, 2), np.dtype("int32")),
        "n_response": ((n,), np.dtype("int32")),
        "attention": (att_shape, np.dtype("float32")),
        "hidden_norm": ((n, n_layers, v), np.dtype("float32")),
    }
    if "known_bg" in group:
        arrs["known_bg"] = group["known_bg"]
        want["known_bg"] = ((n, v), np.dtype("bool"))
    shard = attrs.get("shard_samples")
    for name, (shape, dtype) in want.items():
        a = arrs[name]
        if tuple(a.shape) != shape:
            raise ContractError(f"{path}: array {name!r} has shape {tuple(a.shape)}, contract wants {shape}")
        if dtype is not None and a.dtype != dtype:
            raise ContractError(f"{path}: array {name!r} has dtype {a.dtype}, contract wants {dtype}")
        if a.chunks[0] != att.chunks[0] or tuple(a.chunks[1:]) != tuple(a.shape[1:]):
            raise ContractError(f"{path}: array {name!r} chunks {a.chunks} are not (chunk_samples, full dims)")
        if a.shards is None or a.shards[0] != shard or tuple(a.shards[1:]) != tuple(a.shape[1:]):
            raise ContractError(f"{path}: array {name!r} shards {a.shards} are not (shard_samples={shard}, full dims)")
    if arrs["sample_id"].dtype.kind not in "TUO":
        raise ContractError(f"{path}: array 'sample_id' has dtype {arrs['sample_id'].dtype}, contract wants string")
    if attrs.get("chunk_samples") != att.chunks[0]:
        raise ContractError(
            f"{path}: attrs say chunk_samples {attrs.get('chunk_samples')}, arrays have {att.chunks[0]}"
        )
    return arrs


def _expected_shards(
    arrays: dict[str, zarr.Array],
    attrs: dict[str, Any],
    done: set[int],
    records: dict[int, dict[str, str]],
    path: str | os.PathLike,
    complete: bool,
) -> dict[str, tuple[str, int, int, str]]:
    """``{store key: (array, shard, bytes, sha256)}`` of every finished shard; the claims must hold together."""
    shard = int(attrs["shard_samples"])
    n = arrays["grid"].shape[0]
    n_shards = -(-n // shard)
    sums = attrs.get("shard_checksums", {})
    extra = sorted(s for s in done if not 0 <= s < n_shards)
    if extra:
        raise ContractError(f"{path}: attrs claim shard {extra[0]} finished but the store has shards 0..{n_shards - 1}")
    if complete:
        for s in range(n_shards):
            if s not in done:
                raise ContractError(f"{path}: complete but shard {s} {_samples(s, shard, n)} is not finished")
    expected = {}
    for s in sorted(done | set(records)):
        for name, arr in arrays.items():
            entries = sums.get(name) or []
            entry = entries[s] if s in done and len(entries) == n_shards else None
            if entry is None and s in records:  # finished while dump still runs: its record, not attrs yet
                entry = records[s].get(name)
            size, _, digest = str(entry).partition(":")
            if entry is None or not size.isdigit() or len(digest) != 64:
                raise ContractError(
                    f"{path}: attrs claim shard {s} {_samples(s, shard, n)} finished but record no checksum of "
                    f"array {name!r} for it"
                )
            expected[_shard_key(arr, s)] = (name, s, int(size), digest)
    return expected


def _checksum_entry(size: int, digest: str) -> str:
    # One string per shard and array keeps the attrs JSON small.
    return f"{size}:{digest}"


def _samples(s: int, shard_samples: int, n: int) -> str:
    return f"(samples {s * shard_samples}..{min((s + 1) * shard_samples, n) - 1})"


def _check_shard_files(expected: dict[str, tuple[str, int, int, str]], root: Path, describe) -> None:
    """Every finished shard's file exists with its recorded size (one stat each; hashes are checked on read)."""
    for key, (name, s, size, _) in expected.items():
        try:
            got = (root / key).stat().st_size
        except FileNotFoundError:
            raise ChunkError(f"{describe(name, s)} is missing: {root / key} does not exist") from None
        if got != size:
            raise ChunkError(f"{describe(name, s)} is truncated or altered ({got} bytes on disk, {size} recorded)")


def _check_grid(store: AttentionStore, path: str | os.PathLike) -> None:
    grid = store.grid.astype(np.int64)
    v = store.max_visual
    bad = (grid < 1).any(axis=1) | (grid[:, 0] * grid[:, 1] > v)
    if bad.any():
        ids = store.sample_ids[bad][:5]
        raise ContractError(f"{path}: array 'grid' has grid_h*grid_w outside 1..max_visual={v} for samples {list(ids)}")
