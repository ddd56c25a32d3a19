"""Zarr 3 I/O for the attention store (contract ``schemas/attention_store.v2.json``).

One row per sample, chunked along samples only. The writer buffers rows until a whole chunk is
present, writes the chunk to every array and only then records it in ``attrs["done_chunks"]``, with the
size and sha256 of each array's chunk file in ``attrs["chunk_checksums"]`` (one attrs write), so a crash
never leaves a half-written chunk marked done and a rerun can skip finished chunks.

Readers never take a missing chunk for zeros: at open every finished chunk's file must exist with its
recorded size, and the first read of each chunk checks its bytes against the recorded sha256; a missing,
truncated or altered chunk is a :class:`ChunkError` naming the store, the array, the chunk and its samples.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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
ARRAYS = ("sample_id", "grid", "n_response", "attention", "hidden_norm")
# Optional arrays: a store without them still reads (their Block field is None). known_bg (n, max_visual) bool:
# tokens known to show no image content (the padding of a square view), written when the adapter knows them.
OPTIONAL_ARRAYS = ("known_bg",)
# Every array's chunks are written even when equal to the fill value (zarr skips those by default), so a
# finished chunk always has a file and a missing file is always an error.
_WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


class ChunkError(ContractError):
    """A finished chunk of the store is missing, truncated or altered; the message names store, array, samples."""


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


def _merge_ranges(chunks: Sequence[int], chunk_samples: int, n_samples: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for c in sorted(chunks):
        start, stop = c * chunk_samples, min((c + 1) * chunk_samples, n_samples)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def _chunk_key(arr: zarr.Array, c: int) -> str:
    """Store key of sample-chunk ``c`` of ``arr`` (every array has one chunk along its other dims)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))}"


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _describe(path: str | os.PathLike, name: str, c: int, chunk_samples: int, n: int, ids: Any = None) -> str:
    """``<store>: array 'x' chunk c (samples a..b, ids 'first'..'last')``; ids only when known."""
    a, b = c * chunk_samples, min((c + 1) * chunk_samples, n) - 1
    named = f", ids {str(ids[a])!r}..{str(ids[b])!r}" if ids is not None and name != "sample_id" else ""
    return f"{path}: array {name!r} chunk {c} (samples {a}..{b}{named})"


class _VerifiedStore(WrapperStore):
    """Checks each finished chunk's bytes against its recorded size and sha256 the first time zarr reads it.

    ``expected`` maps a chunk's store key to (array, chunk, bytes, sha256); other keys (metadata, chunks not
    finished) pass through. Hashing the encoded bytes that zarr decodes anyway costs no second read.
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
        buf = await self._store.get(key, prototype)  # the whole object: the checksum covers all of it
        name, c, size, digest = want
        where = self.state["describe"](name, c)
        if buf is None:
            raise ChunkError(f"{where} is missing: {key} is not in the store")
        data = buf.as_numpy_array()
        if len(data) != size:
            raise ChunkError(f"{where} is truncated or altered ({len(data)} bytes on disk, {size} recorded)")
        if _sha256(data) != digest:
            raise ChunkError(f"{where} is corrupt: its bytes do not match the sha256 recorded when it was written")
        self.state["verified"].add(key)
        return buf if byte_range is None else await self._store.get(key, prototype, byte_range)

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


class AttentionStoreWriter:
    """Chunk-aligned, resumable writer; use :meth:`create` or :meth:`open_existing`."""

    def __init__(self, group: zarr.Group, path: Path) -> None:
        self.path = path
        self._group = group
        attrs = dict(group.attrs)
        self.n_samples = int(group["grid"].shape[0])
        self.chunk_samples = int(attrs["chunk_samples"])
        self.layers = list(attrs["layers"])
        self.per_head = bool(attrs["per_head"])
        self.max_visual = int(group["attention"].shape[-1])
        self.n_chunks = -(-self.n_samples // self.chunk_samples)
        self._done: set[int] = set(attrs.get("done_chunks", []))
        self._arrays = {
            name: group[name].with_config(_WRITE_EVERY_CHUNK) for name in (*ARRAYS, *OPTIONAL_ARRAYS) if name in group
        }
        # {array: ["<bytes>:<sha256 hex>" or None per chunk]}
        recorded = attrs.get("chunk_checksums", {})
        self._checksums: dict[str, list[str | None]] = {}
        for name in self._arrays:
            entries = list(recorded.get(name) or [])
            self._checksums[name] = entries if len(entries) == self.n_chunks else [None] * self.n_chunks
        self.has_known_bg = "known_bg" in self._arrays
        # chunk index -> (row buffers, filled mask) for chunks that are only partly supplied so far
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
    ) -> AttentionStoreWriter:
        """Create an empty store (overwriting ``path``); ``heads=None`` stores the head-mean.

        ``known_bg`` adds the optional (n, max_visual) bool array of tokens known to be padding of the view.
        The store is built in a hidden sibling folder and renamed to ``path`` when whole, so a process killed
        during creation leaves no ``path`` that a rerun would try to resume.
        """
        if n_samples < 1 or max_visual < 1 or not layers:
            raise ValueError("n_samples, max_visual and layers must be non-empty")
        # Fewer, larger chunks keep DVC hashing fast (SPEC 6); a store smaller than one chunk is one chunk.
        chunk_samples = min(max(int(chunk_samples), MIN_CHUNK_SAMPLES), n_samples)
        n_layers = len(layers)
        per_head = heads is not None
        att_shape = (n_samples, n_layers, len(heads), max_visual) if per_head else (n_samples, n_layers, max_visual)
        path = Path(path)
        _remove_orphans(path)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        group = zarr.open_group(str(tmp), mode="w")
        common = {"fill_value": 0, "compressors": _compressor()}
        group.create_array("sample_id", shape=(n_samples,), chunks=(chunk_samples,), dtype=str, fill_value="")
        group.create_array("grid", shape=(n_samples, 2), chunks=(chunk_samples, 2), dtype="int32", **common)
        group.create_array("n_response", shape=(n_samples,), chunks=(chunk_samples,), dtype="int32", **common)
        norm_shape = (n_samples, n_layers, max_visual)
        for name, shape in (("attention", att_shape), ("hidden_norm", norm_shape)):
            group.create_array(name, shape=shape, chunks=(chunk_samples, *shape[1:]), dtype="float32", **common)
        if known_bg:
            group.create_array(
                "known_bg",
                shape=(n_samples, max_visual),
                chunks=(chunk_samples, max_visual),
                dtype="bool",
                fill_value=False,
                compressors=_compressor(),
            )
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
            complete=False,
            done_chunks=[],
            # {array: one "<bytes>:<sha256 hex>" per chunk}, None until the chunk is finished (_record_chunk)
            chunk_checksums={name: [None] * -(-n_samples // chunk_samples) for name in group.array_keys()},
        )
        group.update_attributes(meta)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return cls(zarr.open_group(str(path), mode="r+"), path)

    @classmethod
    def open_existing(cls, path: str | os.PathLike) -> AttentionStoreWriter:
        """Reopen a store to resume writing; finished chunks are listed by :meth:`pending_ranges`.

        Every finished chunk is checked against its checksums first; one that is missing, truncated or altered
        is dropped from the finished list (with a warning) and written again by the resumed run.
        """
        try:
            group = zarr.open_group(str(path), mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise ContractError(f"{path}: not a zarr attention store, cannot resume ({e})") from e
        _check_header(dict(group.attrs), path)
        # Temp files of chunk writes cut short by a kill: never read, but they would change the store's hash.
        for stray in Path(path).rglob("*.partial"):
            stray.unlink(missing_ok=True)
        writer = cls(group, Path(path))
        writer._recheck_done()
        return writer

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    def pending_ranges(self) -> list[tuple[int, int]]:
        """Half-open sample ranges whose chunks are not yet completely written."""
        todo = [c for c in range(self.n_chunks) if c not in self._done]
        return _merge_ranges(todo, self.chunk_samples, self.n_samples)

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

        ``known_bg`` (n, <=max_visual) bool goes to the store's optional array (all False when omitted); a store
        created without it refuses one.
        """
        rows = self._check_block(start, sample_ids, grid, n_response, attention, hidden_norm, known_bg)
        n = len(rows["sample_id"])
        first, last = start // self.chunk_samples, (start + n - 1) // self.chunk_samples
        for c in range(first, last + 1):
            c0, c1 = c * self.chunk_samples, min((c + 1) * self.chunk_samples, self.n_samples)
            lo, hi = max(c0, start), min(c1, start + n)
            part = {k: v[lo - start : hi - start] for k, v in rows.items()}
            if lo == c0 and hi == c1 and c not in self._pending:
                self._flush(c, part)
                continue
            bufs, filled = self._pending.get(c) or self._new_buffer(c1 - c0)
            for k, v in part.items():
                bufs[k][lo - c0 : hi - c0] = v
            filled[lo - c0 : hi - c0] = True
            self._pending[c] = (bufs, filled)
            if filled.all():
                del self._pending[c]
                self._flush(c, bufs)

    def finalize(self) -> None:
        """Mark the store complete; raises if any chunk is unwritten."""
        missing = self.pending_ranges()
        if missing:
            raise ContractError(f"{self.path}: cannot finalize, sample ranges not written: {missing[:5]}")
        self._group.attrs["complete"] = True

    def _new_buffer(self, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        bufs = {
            k: (np.empty(n, dtype=object) if k == "sample_id" else np.zeros((n, *a.shape[1:]), dtype=a.dtype))
            for k, a in self._arrays.items()
        }
        return bufs, np.zeros(n, dtype=bool)

    def _flush(self, c: int, rows: dict[str, np.ndarray]) -> None:
        c0 = c * self.chunk_samples
        c1 = c0 + len(rows["sample_id"])
        for k, arr in self._arrays.items():
            arr[c0:c1] = rows[k]
        self._record_chunk(c)

    def _chunk_file(self, name: str, c: int) -> Path:
        return self.path / _chunk_key(self._arrays[name], c)

    def _file_checksum(self, name: str, c: int) -> str | None:
        try:
            data = self._chunk_file(name, c).read_bytes()
        except FileNotFoundError:
            return None
        return _checksum_entry(len(data), _sha256(data))

    def _record_chunk(self, c: int) -> None:
        """Mark chunk ``c`` done with the size and sha256 of each array's chunk file, in one attrs write."""
        for name in self._arrays:
            entry = self._file_checksum(name, c)
            if entry is None:
                raise ContractError(f"{self.path}: array {name!r} chunk {c} was written but has no file")
            self._checksums[name][c] = entry
        # Recorded only after every array holds the chunk: this is the crash-safety point.
        self._done.add(c)
        self._group.update_attributes({"done_chunks": sorted(self._done), "chunk_checksums": self._checksums})

    def _intact(self, c: int) -> bool:
        """Whether every array's file of chunk ``c`` has the size and sha256 recorded for it."""
        return c < self.n_chunks and all(
            (want := self._checksums[k][c]) is not None and want == self._file_checksum(k, c) for k in self._arrays
        )

    def _recheck_done(self) -> None:
        bad = [c for c in sorted(self._done) if not self._intact(c)]
        if bad:
            what = ", ".join(f"chunk {c} {_samples(c, self.chunk_samples, self.n_samples)}" for c in bad)
            warnings.warn(
                f"{self.path}: finished {what} missing, truncated or altered on disk; will be written again",
                stacklevel=3,
            )
            self._done -= set(bad)
            for entries in self._checksums.values():
                for c in bad:
                    if c < self.n_chunks:
                        entries[c] = None
            self._group.update_attributes(
                {"done_chunks": sorted(self._done), "chunk_checksums": self._checksums, "complete": False}
            )

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
    if attrs.get("version") == 1 and _schema_version() == 2:
        raise ContractError(
            f"{path}: written before chunk checksums (attention_store v1), so a missing or damaged chunk would read "
            "as zeros; delete it and rerun dump"
        )
    if attrs.get("version") != _schema_version():
        raise ContractError(
            f"{path}: {SCHEMA_NAME} schema version {attrs.get('version')} but this code reads v{_schema_version()}; "
            "rerun the stage that makes it"
        )


class AttentionStore:
    """A validated, read-only attention store; open with :func:`open_attention_store`.

    Every finished chunk is checked against its recorded sha256 the first time it is read (once per store
    object); reads of a damaged chunk raise :class:`ChunkError`.
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
        # All sample ids and the small per-sample arrays, read once (per-chunk reads of small arrays cost more
        # in zarr overhead than data); the ids first, so later chunk errors can name the samples.
        self.sample_ids: np.ndarray = np.asarray(self._arrays["sample_id"][:])
        if isinstance(group.store, _VerifiedStore):
            ids = self.sample_ids
            group.store.state["describe"] = lambda name, c: _describe(
                path, name, c, self.chunk_samples, self.n_samples, ids
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

    def iter_chunks(self, prefetch: bool = True) -> Iterator[Block]:
        """Yield one :class:`Block` per zarr chunk; ``prefetch`` decodes the next chunk on a thread meanwhile."""
        ranges = self.chunk_ranges()
        if not prefetch:
            for s, e in ranges:
                yield self.read(s, e)
            return
        # Blosc and numpy release the GIL, so decoding chunk k+1 overlaps the caller's work on chunk k.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self.read, *ranges[0]) if ranges else None
            for k in range(len(ranges)):
                block = future.result()
                if k + 1 < len(ranges):
                    future = pool.submit(self.read, *ranges[k + 1])
                yield block


def open_attention_store(path: str | os.PathLike, require_complete: bool = True) -> AttentionStore:
    """Open and validate a store: schema/version, completeness, array shapes/dtypes, chunk files and grids.

    ``require_complete=False`` also opens a store whose dump has not finished; its finished chunks are checked
    as usual, the others read as zeros.
    """
    store = _VerifiedStore(LocalStore(str(path), read_only=True))
    try:
        group = zarr.open_group(store=store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise ContractError(f"{path}: not a zarr attention store ({e})") from e
    attrs = dict(group.attrs)
    _check_header(attrs, path)
    chunks = int(attrs.get("chunk_samples", 1))
    n = int(group["grid"].shape[0]) if "grid" in group else 0
    n_chunks = -(-n // chunks)
    done = {int(c) for c in attrs.get("done_chunks", [])}
    if require_complete and attrs.get("complete") is not True:
        missing = _merge_ranges([c for c in range(n_chunks) if c not in done], chunks, n)[:5]
        raise ContractError(f"{path}: incomplete store (dump not finished); unwritten sample ranges {missing}")
    for key in ("layers", "per_head", "heads"):
        if key not in attrs:
            raise ContractError(f"{path}: attrs lack {key!r}")
    for name in ARRAYS:
        if name not in group:
            raise ContractError(f"{path}: missing array {name!r}")
    arrays = _check_arrays(group, attrs, path)
    expected = _expected_chunks(arrays, attrs, done, path, require_complete)
    store.state["expected"] = expected
    store.state["describe"] = lambda name, c: _describe(path, name, c, chunks, n)
    # sample_id first: reading it (AttentionStore does) lets every later chunk error name its samples' ids.
    first = {k: v for k, v in expected.items() if v[0] == "sample_id"}
    _check_chunk_files(first, Path(path), store.state["describe"])
    opened = AttentionStore(group, Path(path))
    rest = {k: v for k, v in expected.items() if k not in first}
    _check_chunk_files(rest, Path(path), store.state["describe"])
    _check_grid(opened, path)
    return opened


def _check_arrays(group: zarr.Group, attrs: dict[str, Any], path: str | os.PathLike) -> dict[str, zarr.Array]:
    """Shapes, dtypes and chunking of every array against the contract (metadata only, no chunk is read)."""
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
    for name, (shape, dtype) in want.items():
        a = arrs[name]
        if tuple(a.shape) != shape:
            raise ContractError(f"{path}: array {name!r} has shape {tuple(a.shape)}, contract wants {shape}")
        if dtype is not None and a.dtype != dtype:
            raise ContractError(f"{path}: array {name!r} has dtype {a.dtype}, contract wants {dtype}")
        if a.chunks[0] != att.chunks[0] or tuple(a.chunks[1:]) != tuple(a.shape[1:]):
            raise ContractError(f"{path}: array {name!r} chunks {a.chunks} are not (chunk_samples, full dims)")
    if arrs["sample_id"].dtype.kind not in "TUO":
        raise ContractError(f"{path}: array 'sample_id' has dtype {arrs['sample_id'].dtype}, contract wants string")
    if attrs.get("chunk_samples") != att.chunks[0]:
        # chunk numbers in done_chunks and chunk_checksums count chunks of this size
        raise ContractError(
            f"{path}: attrs say chunk_samples {attrs.get('chunk_samples')}, arrays have {att.chunks[0]}"
        )
    return arrs


def _expected_chunks(
    arrays: dict[str, zarr.Array], attrs: dict[str, Any], done: set[int], path: str | os.PathLike, complete: bool
) -> dict[str, tuple[str, int, int, str]]:
    """``{store key: (array, chunk, bytes, sha256)}`` of every finished chunk; the claims must hold together."""
    chunks = int(attrs["chunk_samples"])
    n = arrays["grid"].shape[0]
    n_chunks = -(-n // chunks)
    sums = attrs.get("chunk_checksums", {})
    extra = sorted(c for c in done if not 0 <= c < n_chunks)
    if extra:
        raise ContractError(f"{path}: attrs claim chunk {extra[0]} finished but the store has chunks 0..{n_chunks - 1}")
    if complete:
        for c in range(n_chunks):
            if c not in done:
                raise ContractError(f"{path}: complete but chunk {c} {_samples(c, chunks, n)} is not finished")
    expected = {}
    for c in sorted(done):
        for name, arr in arrays.items():
            entries = sums.get(name) or []
            entry = entries[c] if len(entries) == n_chunks else None
            size, _, digest = str(entry).partition(":")
            if entry is None or not size.isdigit() or len(digest) != 64:
                raise ContractError(
                    f"{path}: attrs claim chunk {c} {_samples(c, chunks, n)} finished but record no checksum of "
                    f"array {name!r} for it"
                )
            expected[_chunk_key(arr, c)] = (name, c, int(size), digest)
    return expected


def _checksum_entry(size: int, digest: str) -> str:
    # One string per chunk and array keeps the attrs JSON small: it is rewritten after every finished chunk.
    return f"{size}:{digest}"


def _samples(c: int, chunk_samples: int, n: int) -> str:
    return f"(samples {c * chunk_samples}..{min((c + 1) * chunk_samples, n) - 1})"


def _check_chunk_files(expected: dict[str, tuple[str, int, int, str]], root: Path, describe) -> None:
    """Every finished chunk's file exists with its recorded size (one stat each; hashes are checked on read)."""
    for key, (name, c, size, _) in expected.items():
        try:
            got = (root / key).stat().st_size
        except FileNotFoundError:
            raise ChunkError(f"{describe(name, c)} is missing: {root / key} does not exist") from None
        if got != size:
            raise ChunkError(f"{describe(name, c)} is truncated or altered ({got} bytes on disk, {size} recorded)")


def _check_grid(store: AttentionStore, path: str | os.PathLike) -> None:
    grid = store.grid.astype(np.int64)
    v = store.max_visual
    bad = (grid < 1).any(axis=1) | (grid[:, 0] * grid[:, 1] > v)
    if bad.any():
        ids = store.sample_ids[bad][:5]
        raise ContractError(f"{path}: array 'grid' has grid_h*grid_w outside 1..max_visual={v} for samples {list(ids)}")
