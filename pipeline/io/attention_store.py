"""Zarr 3 I/O for the attention store (contract ``schemas/attention_store.v1.json``).

One row per sample, chunked along samples only. The writer buffers rows until a whole chunk is
present, writes the chunk to every array and only then records it in ``attrs["done_chunks"]``, so a
crash never leaves a half-written chunk marked done and a rerun can skip finished chunks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.io.contracts import ContractError, load_schema

SCHEMA_NAME = "attention_store"
MIN_CHUNK_SAMPLES = 256
ARRAYS = ("sample_id", "grid", "n_response", "attention", "hidden_norm")
# Optional arrays: a store without them still reads (their Block field is None). known_bg (n, max_visual) bool:
# tokens known to show no image content (the padding of a square view), written when the adapter knows them.
OPTIONAL_ARRAYS = ("known_bg",)


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
        self._arrays = {name: group[name] for name in (*ARRAYS, *OPTIONAL_ARRAYS) if name in group}
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
        """
        if n_samples < 1 or max_visual < 1 or not layers:
            raise ValueError("n_samples, max_visual and layers must be non-empty")
        # Fewer, larger chunks keep DVC hashing fast (SPEC 6); a store smaller than one chunk is one chunk.
        chunk_samples = min(max(int(chunk_samples), MIN_CHUNK_SAMPLES), n_samples)
        n_layers = len(layers)
        per_head = heads is not None
        att_shape = (n_samples, n_layers, len(heads), max_visual) if per_head else (n_samples, n_layers, max_visual)
        group = zarr.open_group(str(path), mode="w")
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
        )
        group.attrs.update(meta)
        return cls(group, Path(path))

    @classmethod
    def open_existing(cls, path: str | os.PathLike) -> AttentionStoreWriter:
        """Reopen a store to resume writing; finished chunks are listed by :meth:`pending_ranges`."""
        group = zarr.open_group(str(path), mode="r+")
        _check_header(dict(group.attrs), path)
        return cls(group, Path(path))

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
        # Recorded only after every array holds the chunk: this is the crash-safety point.
        self._done.add(c)
        self._group.attrs["done_chunks"] = sorted(self._done)

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
    if attrs.get("version") != _schema_version():
        raise ContractError(
            f"{path}: {SCHEMA_NAME} schema version {attrs.get('version')} but this code reads v{_schema_version()}; "
            "rerun the stage that makes it"
        )


class AttentionStore:
    """A validated, read-only attention store; open with :func:`open_attention_store`."""

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
        self.grid: np.ndarray = self._arrays["grid"][:]

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

    @cached_property
    def sample_ids(self) -> np.ndarray:
        """All sample ids, read once (per-chunk reads of small arrays cost more in zarr overhead than data)."""
        return np.asarray(self._arrays["sample_id"][:])

    @cached_property
    def n_response(self) -> np.ndarray:
        return self._arrays["n_response"][:]

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
    """Open and validate a store: schema/version, completeness, array shapes/dtypes and grids."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise ContractError(f"{path}: not a zarr attention store ({e})") from e
    attrs = dict(group.attrs)
    _check_header(attrs, path)
    if require_complete and attrs.get("complete") is not True:
        chunks = int(attrs.get("chunk_samples", 1))
        n = int(group["grid"].shape[0]) if "grid" in group else 0
        todo = [c for c in range(-(-n // chunks)) if c not in set(attrs.get("done_chunks", []))]
        missing = _merge_ranges(todo, chunks, n)[:5]
        raise ContractError(f"{path}: incomplete store (dump not finished); unwritten sample ranges {missing}")
    for key in ("layers", "per_head", "heads"):
        if key not in attrs:
            raise ContractError(f"{path}: attrs lack {key!r}")
    for name in ARRAYS:
        if name not in group:
            raise ContractError(f"{path}: missing array {name!r}")
    _check_arrays(group, attrs, path)
    return AttentionStore(group, Path(path))


def _check_arrays(group: zarr.Group, attrs: dict[str, Any], path: str | os.PathLike) -> None:
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
    grid = arrs["grid"][:].astype(np.int64)
    bad = (grid < 1).any(axis=1) | (grid[:, 0] * grid[:, 1] > v)
    if bad.any():
        ids = np.asarray(arrs["sample_id"][:])[bad][:5]
        raise ContractError(f"{path}: array 'grid' has grid_h*grid_w outside 1..max_visual={v} for samples {list(ids)}")
