"""Import the SD-RPN authors' released pseudo-label pickle (``roi_pseudo``) into an attention store.

The file is a pickled list of dicts, one per sample, written by the authors' label scripts (see
docs/authors-label-rules.md for the exact origin of every field):

- ``question_id``: LLaVA: ``str`` of the entry's position in ``llava_v1_5_mix665k.json``; Qwen: as given.
- ``image`` (path relative to the authors' image folder), ``prompt`` (the question), ``text`` (the answer the
  model generated).
- ``grounding_attn_o2i``: the label map, answer->image attention of the selected (layer, head) maps, averaged
  over the answer rows, one value per visual token (LLaVA: 576 float16 (7B, sinks already zeroed) or float64
  (13B); Qwen: a (24, 24) float64 array).
- ``sink_attn``: the sink detector's map (same shape); a token is a sink when it is >= the sink threshold.
- ``grounding_attn_q2i`` (LLaVA-7B only): question->image attention of the label heads; kept, not used.

Reading it uses :class:`RestrictedUnpickler`, which resolves only the numpy and builtin names such a file
needs and refuses every other global, so a crafted file cannot run code. The store gets one pseudo-layer per
map (:data:`LAYER_FIELDS`); the ``label`` stage turns it into the authors' labels with ``layers: [0]``,
``sink_method: attention``, ``sink_attn_layer: 1`` and the reference thresholds (docs/authors-label-rules.md).
"""

from __future__ import annotations

import _codecs
import builtins
import json
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

from pipeline.io.attention_store import MIN_CHUNK_SAMPLES, AttentionStoreWriter

SOURCE_FORMAT = "authors_roi_pseudo"
# Pseudo-layer index in the store -> the record field it holds. The numbers are positions, not decoder layers:
# the authors' maps are already averaged over their (layer, head) selections.
GROUNDING_LAYER, SINK_LAYER, Q2I_LAYER = 0, 1, 2
LAYER_FIELDS = {GROUNDING_LAYER: "grounding_attn_o2i", SINK_LAYER: "sink_attn", Q2I_LAYER: "grounding_attn_q2i"}
TEXT_FIELDS = ("image", "prompt", "text")
REQUIRED_KEYS = ("question_id", *TEXT_FIELDS, "grounding_attn_o2i", "sink_attn")
OPTIONAL_MAP = "grounding_attn_q2i"  # the authors' LLaVA training loader reads it with .get()
MAX_LISTED = 20  # problems spelled out in an error message / the store attrs


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that a pseudo-label file has no business with."""


class AuthorsImportError(ValueError):
    """The file is not a usable pseudo-label file; the message names the file, record and field."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol <= 2 pickles store numpy's raw bytes as _codecs.encode(str, "latin1"); no other codec is needed.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}: only latin1 is allowed")
    return _codecs.encode(text, "latin1")


# (module, name) -> object. Both numpy spellings: files written with numpy 1.x name numpy.core, 2.x numpy._core.
_NUMPY = {
    "_reconstruct": _multiarray._reconstruct,  # ndarray.__reduce__ (protocols 0-4)
    "scalar": _multiarray.scalar,  # numpy scalars
}
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{pkg}.multiarray", name): obj for pkg in ("numpy.core", "numpy._core") for name, obj in _NUMPY.items()},
    **{(f"{pkg}.numeric", "_frombuffer"): _numeric._frombuffer for pkg in ("numpy.core", "numpy._core")},  # protocol 5
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    # Containers that protocols <= 3 build by calling the type (``__builtin__`` is Python 2's / protocol 0-2's name).
    **{
        (mod, name): getattr(builtins, name)
        for mod in ("builtins", "__builtin__")
        for name in ("set", "frozenset", "bytearray", "complex")
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` and imports nothing.

    ``find_class`` is the only way a pickle reaches a callable (GLOBAL/STACK_GLOBAL/INST/OBJ/EXT* all go through
    it), so refusing every other name means no code named by the file can run.
    """

    def __init__(self, file: BinaryIO, source: str | os.PathLike = "<pickle>") -> None:
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle global '{module}.{name}': an authors' pseudo-label file may "
                "only hold numpy arrays/dtypes/scalars and builtin containers, strings and numbers "
                "(nothing from the file was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused persistent id {pid!r} (not part of a pseudo-label file)")


def load_restricted(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; other unreadable files raise AuthorsImportError."""
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # any other failure (truncated file, bad opcode, bad array state) = unreadable
            raise AuthorsImportError(f"{path}: not a readable pseudo-label pickle ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class RecordProblem:
    """Why record ``index`` cannot be imported: one bad ``field``."""

    index: int
    question_id: str | None
    field: str
    reason: str

    def describe(self) -> str:
        qid = "?" if self.question_id is None else repr(self.question_id)
        return f"record {self.index} (question_id {qid}): {self.field}: {self.reason}"


@dataclass
class Validation:
    """Outcome of :func:`validate_records`."""

    grid: tuple[int, int]
    has_q2i: bool  # whether the maps include grounding_attn_q2i (then every kept record has it)
    kept: list[int] = field(default_factory=list)  # record indices that pass every check
    problems: list[RecordProblem] = field(default_factory=list)
    dtypes: dict[str, list[str]] = field(default_factory=dict)  # map field -> dtypes seen (kept records)
    extra_keys: list[str] = field(default_factory=list)  # keys beyond the known ones (ignored)


def _question_id(value: Any) -> str | None:
    # bool is an int subclass but never an id; numpy integers come from files made with numpy ids.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return str(int(value))
    return None


def infer_grid(records: Sequence[Any]) -> tuple[int, int]:
    """The token grid from the first usable ``grounding_attn_o2i``: a 2-D array's shape, or a square 1-D length."""
    # Records whose map fits no grid are skipped here; validation then names them.
    for rec in records:
        a = rec.get("grounding_attn_o2i") if isinstance(rec, dict) else None
        if isinstance(a, np.ndarray) and a.ndim == 2 and min(a.shape) > 0:
            return int(a.shape[0]), int(a.shape[1])
        if isinstance(a, np.ndarray) and a.ndim == 1 and a.size > 0 and math.isqrt(a.size) ** 2 == a.size:
            return math.isqrt(a.size), math.isqrt(a.size)
    raise AuthorsImportError("no record has a 2-D or square-length grounding_attn_o2i to take the grid from; give it")


def _map_problem(value: Any, grid: tuple[int, int]) -> str | None:
    """Why ``value`` is not a valid map on ``grid`` (None: it is)."""
    h, w = grid
    if not isinstance(value, np.ndarray):
        return f"is a {type(value).__name__}, expected a numpy float array"
    if value.dtype.kind != "f":
        return f"has dtype {value.dtype}, expected float16/32/64"
    if value.shape not in ((h * w,), (h, w)):
        return f"has shape {value.shape}, expected ({h * w},) or ({h}, {w})"
    flat = value.reshape(-1)
    bad = np.flatnonzero(~np.isfinite(flat))
    if len(bad):
        return f"non-finite value {flat[bad[0]]} at token {int(bad[0])} ({len(bad)} non-finite in all)"
    neg = np.flatnonzero(flat < 0)
    if len(neg):
        return f"negative value {flat[neg[0]]} at token {int(neg[0])} (attention is >= 0)"
    return None


def validate_records(records: Any, grid: tuple[int, int] | None = None) -> Validation:
    """Check every record (keys, types, map shapes, finiteness, unique question_id); never drops one silently.

    A record with any problem is left out of ``kept`` and each of its problems is listed, naming the record's
    index, question_id and field; duplicates keep the first occurrence. ``grid`` None: :func:`infer_grid`.
    """
    if not isinstance(records, list):
        raise AuthorsImportError(f"the file holds a {type(records).__name__}, expected a list of dicts")
    if not records:
        raise AuthorsImportError("the file holds an empty list: no records to import")
    grid = tuple(int(x) for x in grid) if grid is not None else infer_grid(records)
    if len(grid) != 2 or min(grid) < 1:
        raise AuthorsImportError(f"grid must be two positive ints, got {grid}")
    # The optional q2i map is stored when any record has it; then a record without it is incomplete.
    has_q2i = any(isinstance(r, dict) and r.get(OPTIONAL_MAP) is not None for r in records)
    out = Validation(grid=grid, has_q2i=has_q2i)
    maps = ("grounding_attn_o2i", "sink_attn", *((OPTIONAL_MAP,) if has_q2i else ()))
    known = set(REQUIRED_KEYS) | {OPTIONAL_MAP}
    extra: set[str] = set()
    first_at: dict[str, int] = {}
    dtypes: dict[str, set[str]] = {m: set() for m in maps}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            out.problems.append(RecordProblem(i, None, "<record>", f"is a {type(rec).__name__}, expected a dict"))
            continue
        extra |= {str(k) for k in rec} - known
        qid = _question_id(rec.get("question_id"))
        problems = []
        for key in (*REQUIRED_KEYS, *((OPTIONAL_MAP,) if has_q2i else ())):
            if key not in rec or (key == OPTIONAL_MAP and rec[key] is None):
                problems.append((key, "missing" if key != OPTIONAL_MAP else "missing (other records carry it)"))
        missing = {k for k, _ in problems}
        if "question_id" not in missing and qid is None:
            problems.append(("question_id", f"{rec['question_id']!r} is not a non-empty string or an integer"))
        for key in TEXT_FIELDS:
            if key not in missing and not isinstance(rec[key], str):
                problems.append((key, f"is a {type(rec[key]).__name__}, expected a string"))
        if "image" not in missing and rec["image"] == "":
            problems.append(("image", "is empty"))
        for key in maps:
            if key not in missing and (why := _map_problem(rec[key], grid)):
                problems.append((key, why))
        # Every occurrence after the first is a duplicate, whether or not the first is valid: the id is ambiguous.
        if qid is not None and qid in first_at:
            problems.append(("question_id", f"duplicate {qid!r} (first at record {first_at[qid]})"))
        elif qid is not None:
            first_at[qid] = i
        if problems:
            out.problems.extend(RecordProblem(i, qid, k, why) for k, why in problems)
            continue
        out.kept.append(i)
        for key in maps:
            dtypes[key].add(str(rec[key].dtype))
    out.dtypes = {k: sorted(v) for k, v in dtypes.items()}
    out.extra_keys = sorted(extra)
    return out


def _problem_summary(problems: list[RecordProblem], n_records: int) -> str:
    lines = [p.describe() for p in problems[:MAX_LISTED]]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    n_bad = len({p.index for p in problems})
    return f"{n_bad} of {n_records} records are invalid:\n  " + "\n  ".join(lines) + more


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_authors_file` wrote."""

    store: Path
    n_records: int
    n_imported: int
    grid: tuple[int, int]
    layers: list[int]
    problems: list[RecordProblem]  # non-empty only with skip_invalid: the skipped records' problems


def import_authors_file(
    path: str | os.PathLike,
    store_out: str | os.PathLike,
    *,
    grid: tuple[int, int] | None = None,
    skip_invalid: bool = False,
    model_id: str = "",
    inputs: dict[str, str] | None = None,
    chunk_samples: int = MIN_CHUNK_SAMPLES,
    records_out: str | os.PathLike | None = None,
) -> ImportResult:
    """Validate the authors' pickle at ``path`` and write its maps to the attention store ``store_out``.

    Invalid records raise :class:`AuthorsImportError` listing them, or with ``skip_invalid`` are left out and
    returned in ``ImportResult.problems`` (their count and first few also go to the store attrs). The store is
    written only after the whole file has been read and checked. ``records_out`` (JSONL) gets one row per
    imported sample (sample_id, image, question, response, source) for ``prepare`` (format: records), so a
    manifest built from it has the store's sample ids.
    """
    records = load_restricted(path)
    try:
        check = validate_records(records, grid)
    except AuthorsImportError as e:
        raise AuthorsImportError(f"{path}: {e}") from None
    if check.problems and not skip_invalid:
        raise AuthorsImportError(f"{path}: {_problem_summary(check.problems, len(records))}")
    if not check.kept:
        raise AuthorsImportError(f"{path}: no valid record to import; {_problem_summary(check.problems, len(records))}")

    h, w = check.grid
    fields = [LAYER_FIELDS[GROUNDING_LAYER], LAYER_FIELDS[SINK_LAYER]] + ([OPTIONAL_MAP] if check.has_q2i else [])
    layers = list(range(len(fields)))
    attrs = {
        "model_id": model_id,
        "include_eos": False,  # the authors feed back every generated token except the last one
        "params": {"source_format": SOURCE_FORMAT, "grid": [h, w], "skip_invalid": skip_invalid},
        "inputs": dict(inputs or {}),
        "source": {
            "format": SOURCE_FORMAT,
            "file": str(path),
            "layer_fields": {str(k): f for k, f in zip(layers, fields, strict=True)},
            "dtypes": check.dtypes,
            "extra_keys": check.extra_keys,
            "n_records": len(records),
            "n_imported": len(check.kept),
            "n_skipped": len({p.index for p in check.problems}),
            "skipped": [asdict(p) for p in check.problems[:MAX_LISTED]],
            # Absent from the file: say so rather than let a zero or -1 pass for data.
            "hidden_norm": "absent from the file, stored as 0: use sink_method 'attention' (or 'none'), not 'norm'",
            "n_response": "absent from the file, stored as -1 (unknown)",
        },
    }
    writer = AttentionStoreWriter.create(
        store_out, n_samples=len(check.kept), layers=layers, max_visual=h * w, attrs=attrs, chunk_samples=chunk_samples
    )
    step = writer.chunk_samples
    for start in range(0, len(check.kept), step):
        rows = [records[i] for i in check.kept[start : start + step]]
        n = len(rows)
        # float16 widens to float32 exactly; float64 (13B / Qwen files) rounds to the store's float32.
        attention = np.stack([np.stack([r[f].reshape(-1) for f in fields]) for r in rows]).astype(np.float32)
        writer.write(
            start,
            [_question_id(r["question_id"]) for r in rows],
            np.tile(np.array([h, w], np.int32), (n, 1)),
            np.full(n, -1, np.int32),
            attention,
            np.zeros((n, len(layers), h * w), np.float32),
        )
    writer.finalize()
    if records_out is not None:
        write_records_jsonl([records[i] for i in check.kept], records_out)
    return ImportResult(Path(store_out), len(records), len(check.kept), (h, w), layers, check.problems)


def write_records_jsonl(records: Sequence[dict[str, Any]], out: str | os.PathLike) -> None:
    """One JSON line per record in the ``prepare`` records format (sample_id, image, question) plus the answer."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for r in records:
            image = r["image"]
            row = {
                "sample_id": _question_id(r["question_id"]),
                "image": image,
                "question": r["prompt"],
                "response": r["text"],  # the authors' model answer; prepare ignores it
                "source": PurePosixPath(image).parts[0] if PurePosixPath(image).parts else "",
            }
            fh.write(json.dumps(row) + "\n")


def write_problems_jsonl(problems: Sequence[RecordProblem], out: str | os.PathLike) -> None:
    """The skipped records' problems, one JSON line each (index, question_id, field, reason)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for p in problems:
            fh.write(json.dumps(asdict(p)) + "\n")
