"""Build the sample manifest from LLaVA-1.5's instruction mix or from plain JSONL / Parquet records.

Nothing is dropped silently and one bad record never stops the others: a record that cannot be used (malformed
line, wrong field type, empty question, bad box, image missing, undecodable or outside the image root) becomes
a row of the skips table whose reason starts with where the record is in the input (``line N`` of a JSONL file,
1-based as editors count; ``row N`` of a Parquet file and ``item N`` of a LLaVA mix, 0-based) and names the
field. An input that is unusable as a whole (missing, empty, not JSON, no record left) raises
:class:`InputError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import random
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.benchmarks import BENCHMARKS
from pipeline.io.images import error_text, probe_image

MANIFEST_COLUMNS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("box_x0", pa.float64()),
        ("box_y0", pa.float64()),
        ("box_x1", pa.float64()),
        ("box_y1", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
    ]
)
SKIP_COLUMNS = pa.schema([("sample_id", pa.string()), ("image", pa.string()), ("reason", pa.string())])

_IMAGE_TAG = re.compile(r"\s*<image>\s*")
# A box may overhang the image by this many pixels (annotations rounded after a resize) and is then clipped to
# it; beyond that it names the wrong place and the record is skipped.
BOX_TOLERANCE = 1.0


class InputError(ValueError):
    """The input file as a whole is unusable (missing, empty, not JSON, no usable record); names the file."""


class RecordError(ValueError):
    """One record cannot be used; the message names the field (the caller adds where the record is)."""


@dataclass
class Record:
    """One candidate sample before its image is checked; ``skip`` says why it cannot be one, if so."""

    sample_id: str
    image: str
    question: str
    source: str
    answer: str | None = None
    answers: list[str] | None = None
    box: tuple[float, float, float, float] | None = None
    where: str = ""  # its place in the input ("line 3", "row 2", "item 5"); skip reasons start with it
    skip: str | None = None  # why it cannot be a sample, naming the field; set for records that failed parsing


@dataclass
class PrepareParams:
    """params.yaml ``prepare`` / ``prepare_eval``: which records become the manifest."""

    # records: JSONL/Parquet; llava_mix: LLaVA's mix665k JSON; a benchmark name (docvqa, pope, ...): its lmms-lab
    # Parquet or original files (pipeline.benchmarks.formats.benchmark_records, which the stage calls)
    format: Literal[("records", "llava_mix", *BENCHMARKS)] = "records"  # type: ignore[valid-type]
    input: str = ""
    image_root: str | None = None  # relative image paths resolve here (records default: the file's own dir)
    sources: list[str] | None = None  # llava_mix: keep these image sources, e.g. [gqa, ocr_vqa]
    n: int | None = None  # keep the first n (llava_mix: after a seeded shuffle; benchmarks: records, skips included)
    seed: int = 42
    allow_outside_root: bool = False  # accept image paths that leave the image root ('..', absolute paths, URLs)

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input: name the records file (JSONL/Parquet) or LLaVA mix JSON")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1 or null, got {self.n}")
        if self.sources is not None and self.format != "llava_mix":
            raise ValueError("sources applies to format llava_mix only")


def records_from_params(params: PrepareParams) -> list[Record]:
    """The candidate records that ``params`` names, before their images are checked."""
    if params.format in BENCHMARKS:
        # benchmarks write their embedded images somewhere: the stage names the place (benchmark_records)
        raise ValueError(f"format {params.format!r}: read it with pipeline.benchmarks.formats.benchmark_records")
    if params.format == "llava_mix":
        return records_from_llava_mix(
            params.input, params.image_root, params.sources, params.n, params.seed, params.allow_outside_root
        )
    records = records_from_table(params.input, params.image_root, params.allow_outside_root)
    return records[: params.n] if params.n else records


def _join(root: str | None, ref: str) -> str:
    if root is None or "://" in ref or Path(ref).is_absolute():
        return ref
    return root.rstrip("/") + "/" + ref


def _inside(root: str, path: str) -> bool:
    """Whether ``path`` lies under ``root``, compared lexically ('..' collapsed, symlinks not followed)."""
    if "://" in root or "://" in path:
        root_scheme, _, root_rest = root.partition("://")
        scheme, _, rest = path.partition("://")
        if "://" not in root or "://" not in path or scheme != root_scheme:
            return False
        root_norm, norm = posixpath.normpath(root_rest), posixpath.normpath(rest)
        return norm == root_norm or norm.startswith(root_norm.rstrip("/") + "/")
    root_abs, path_abs = os.path.abspath(root), os.path.abspath(path)
    return os.path.commonpath([root_abs, path_abs]) == root_abs


def _kind(value: Any) -> str:
    """A value's type in JSON's words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _text(r: dict, field: str, required: bool) -> str | None:
    """Field ``field`` of ``r`` as a string: required ones must be present and not blank."""
    value = r.get(field)
    if value is None:
        if required:
            raise RecordError(f"{field!r} is missing" if field not in r else f"{field!r} is null")
        return None
    if not isinstance(value, str):
        raise RecordError(f"{field!r} must be a string, got {_kind(value)}")
    if required and not value.strip():
        raise RecordError(f"{field!r} is empty")
    return value


def _sample_id(r: dict, field: str, default: int) -> str:
    """The record's own id (a string or an integer) or, when it names none, its index."""
    if field not in r:
        return str(default)
    value = r[field]
    if value is None:
        raise RecordError(f"{field!r} is null")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError(f"{field!r} must be a string or an integer, got {_kind(value)}")
    if isinstance(value, str) and not value.strip():
        raise RecordError(f"{field!r} is empty")
    return str(value)


def _fmt_box(box: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _box(value: Any) -> tuple[float, float, float, float] | None:
    """A ground-truth box: 4 finite numbers with x0 < x1 and y0 < y1 (its fit to the image is checked later)."""
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 4
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value)
    ):
        shown = json.dumps(value) if isinstance(value, list | tuple) else _kind(value)
        raise RecordError(f"'box' must be [x0, y0, x1, y1], four numbers; got {shown}")
    box = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in box):
        raise RecordError(f"'box' {_fmt_box(box)} has a non-finite value")
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise RecordError(f"'box' {_fmt_box(box)} is empty or inverted (needs x0 < x1 and y0 < y1)")
    return box


def _check_inside(ref: str, root: str, allow_outside_root: bool) -> None:
    """An image reference that resolves outside ``root`` is a record error unless allowed."""
    if not allow_outside_root and not _inside(root, _join(root, ref)):
        raise RecordError(f"'image' {ref!r} lies outside the image root {root!r} (allow_outside_root is false)")


def _skipped(where: str, exc: Exception, raw: Any, id_field: str, index: int, image: str) -> Record:
    """A record that failed parsing, with the id it would have had ('' if unreadable) and its image reference."""
    try:
        sample_id = _sample_id(raw, id_field, index) if isinstance(raw, dict) else ""
    except RecordError:
        sample_id = ""
    return Record(sample_id=sample_id, image=image, question="", source="", where=where, skip=_reason(exc))


def _reason(exc: Exception) -> str:
    # a RecordError's message names the field; anything else escaped validation and is named by its class, so
    # one odd record is still a recorded skip rather than an abort of the whole stage
    return str(exc) if isinstance(exc, RecordError) else error_text(exc)


def records_from_llava_mix(
    path: str | Path,
    image_root: str | None,
    sources: list[str] | None,
    n: int | None,
    seed: int = 42,
    allow_outside_root: bool = False,
) -> list[Record]:
    """First QA turn of each image in a LLaVA-1.5 mix JSON (e.g. llava_v1_5_mix665k.json).

    Keeps entries whose image path starts with one of ``sources`` (gqa, ocr_vqa, ...), shuffles with
    ``seed`` and keeps the first ``n`` (SPEC 2: subsets are shuffle(seed 42)[:N]). Entries without an image
    (text-only) are not samples; a malformed entry becomes a skipped record ``item N`` (0-based).
    """
    text = _read_text(path)
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not JSON: {error_text(exc)}") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: a LLaVA mix is a JSON array of conversations, got a JSON {_kind(entries)}")
    if not entries:
        raise InputError(f"{path}: no entries (an empty JSON array)")
    # relative paths without an image_root resolve against the working directory, as they always have
    root = image_root if image_root is not None else "."
    out: list[Record] = []
    for i, e in enumerate(entries):
        where = f"item {i}"
        try:
            if not isinstance(e, dict):
                raise RecordError(f"not a JSON object (got {_kind(e)})")
            image = e.get("image")
            if image is None or image == "":
                continue  # text-only conversations have no image to localise in
            if not isinstance(image, str):
                raise RecordError(f"'image' must be a string, got {_kind(image)}")
            source = PurePosixPath(image).parts[0]
            if sources and source not in sources:
                continue
            out.append(_llava_record(e, i, where, image, source, root, image_root, allow_outside_root))
        except Exception as exc:
            img = e.get("image") if isinstance(e, dict) else None
            out.append(_skipped(where, exc, e, "id", i, _join(image_root, img) if isinstance(img, str) else ""))
    if not out:
        which = f" from sources {sources}" if sources else ""
        raise InputError(f"{path}: none of its {len(entries)} entries has an image{which}")
    random.Random(seed).shuffle(out)
    return out[:n] if n else out


def _llava_record(
    e: dict,
    i: int,
    where: str,
    image: str,
    source: str,
    root: str,
    image_root: str | None,
    allow_outside_root: bool,
) -> Record:
    sample_id = _sample_id(e, "id", i)
    conv = e.get("conversations")
    if not isinstance(conv, list):
        raise RecordError(f"'conversations' must be an array, got {_kind(conv)}")
    turns = [t for t in conv if isinstance(t, dict)]
    if len(turns) != len(conv):
        raise RecordError("'conversations' holds a turn that is not an object")
    human = next((t for t in turns if t.get("from") == "human"), None)
    gpt = next((t for t in turns if t.get("from") == "gpt"), None)
    if human is None:
        raise RecordError("'conversations' has no human turn")
    value = human.get("value")
    if not isinstance(value, str):
        raise RecordError(f"'conversations' human turn 'value' must be a string, got {_kind(value)}")
    question = _IMAGE_TAG.sub(" ", value).strip()
    if not question:
        raise RecordError("'conversations' human turn has no question besides <image>")
    answer = None
    if gpt is not None:
        if not isinstance(gpt.get("value"), str):
            raise RecordError(f"'conversations' gpt turn 'value' must be a string, got {_kind(gpt.get('value'))}")
        answer = gpt["value"].strip()
    _check_inside(image, root, allow_outside_root)
    return Record(
        sample_id=sample_id,
        image=_join(image_root, image),
        question=question,
        source=source,
        answer=answer,
        where=where,
    )


def _read_text(path: str | Path) -> str:
    """The whole input file as text, or an :class:`InputError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {error_text(exc)}") from None
    except OSError as exc:
        raise InputError(f"{path}: unreadable: {error_text(exc)}") from None


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, parsed value or RecordError) per non-blank line of a JSONL file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: unreadable: {error_text(exc)}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the first record
    rows: list[tuple[str, Any]] = []
    # JSON Lines separates records by "\n" only; str.splitlines would also split inside strings at U+2028
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append((where, RecordError(f"not UTF-8: {error_text(exc)}")))
            continue
        if not line.strip():
            continue
        try:
            rows.append((where, json.loads(line)))
        except (ValueError, RecursionError) as exc:
            rows.append((where, RecordError(f"malformed JSON: {error_text(exc)}")))
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) per row of a Parquet file."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for files that are not Parquet
        raise InputError(f"{path}: not a readable Parquet file: {error_text(exc)}") from None
    return [(f"row {i}", r) for i, r in enumerate(table.to_pylist())]


def records_from_table(
    path: str | Path, image_root: str | None = None, allow_outside_root: bool = False
) -> list[Record]:
    """Plain records from JSONL or Parquet: image, question, optional sample_id/answer/answers/box/source.

    Relative image paths resolve against ``image_root``, or else against the file's own directory; a path
    that leaves that root ('..', absolute, a URL) is skipped unless ``allow_outside_root``. A record that
    cannot be used is returned with ``skip`` set; a file with no records, or none that parses, raises
    :class:`InputError`.
    """
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    if not rows:
        raise InputError(f"{path}: no records (empty file)")
    if all(isinstance(r, RecordError) for _, r in rows):
        where, first = rows[0]
        raise InputError(f"{path}: not JSON Lines: no line parses as JSON ({where}: {first})")
    root = image_root if image_root is not None else str(path.parent)
    out = []
    for i, (where, r) in enumerate(rows):
        try:
            if isinstance(r, RecordError):
                raise r
            out.append(_table_record(r, i, where, root, path.stem, allow_outside_root))
        except Exception as exc:
            img = r.get("image") if isinstance(r, dict) else None
            out.append(_skipped(where, exc, r, "sample_id", i, _join(root, img) if isinstance(img, str) else ""))
    return out


def _table_record(r: Any, i: int, where: str, root: str, stem: str, allow_outside_root: bool) -> Record:
    if not isinstance(r, dict):
        raise RecordError(f"not a JSON object (got {_kind(r)})")
    sample_id = _sample_id(r, "sample_id", i)
    image = _text(r, "image", required=True)
    question = _text(r, "question", required=True)
    answer = _text(r, "answer", required=False)
    answers = r.get("answers")
    if answers is not None:
        if not isinstance(answers, list | tuple):
            raise RecordError(f"'answers' must be an array of strings, got {_kind(answers)}")
        bad = next((j for j, a in enumerate(answers) if not isinstance(a, str)), None)
        if bad is not None:
            raise RecordError(f"'answers' item {bad} must be a string, got {_kind(answers[bad])}")
    source = _text(r, "source", required=False)
    box = _box(r.get("box"))
    _check_inside(image, root, allow_outside_root)
    return Record(
        sample_id=sample_id,
        image=_join(root, image),
        question=question,
        source=source or stem,
        answer=answer,
        answers=list(answers) if answers is not None else None,
        box=box,
        where=where,
    )


def _fit_box(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float] | str:
    """``box`` clipped to the image, or why it cannot be (more than BOX_TOLERANCE px outside, or nothing inside)."""
    x0, y0, x1, y1 = box
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return f"'box' {_fmt_box(box)} lies outside the {width}x{height} image"
    fitted = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if not (fitted[0] < fitted[2] and fitted[1] < fitted[3]):
        return f"'box' {_fmt_box(box)} lies outside the {width}x{height} image"
    return fitted


def build_manifest(records: Iterable[Record], workers: int = 8) -> tuple[pa.Table, pa.Table]:
    """Decode every image and return (manifest, skips); bad records and images, duplicate ids and boxes that do
    not fit their image become skips, in input order."""
    records = list(records)

    def check(rec: Record) -> tuple[int, int] | str:
        if rec.skip is not None:
            return rec.skip
        try:
            return probe_image(rec.image)
        except FileNotFoundError:
            return "image not found"
        except Exception as exc:  # corrupt or unsupported files raise many types
            return f"unreadable image: {error_text(exc)}"

    # each worker holds one decoded image at a time: memory stays at `workers` images whatever the input size
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(check, records))
    rows, skips, seen = [], [], {}

    def skip(rec: Record, reason: str) -> None:
        where = f"{rec.where}: " if rec.where else ""
        skips.append({"sample_id": rec.sample_id, "image": rec.image, "reason": where + reason})

    for rec, res in zip(records, checks, strict=True):
        if rec.skip is not None:
            skip(rec, rec.skip)
            continue
        if rec.sample_id in seen:
            first = seen[rec.sample_id]
            skip(rec, "duplicate sample_id" + (f" (first at {first})" if first else ""))
            continue
        seen[rec.sample_id] = rec.where
        if isinstance(res, str):
            skip(rec, res)
            continue
        width, height = res
        x0, y0, x1, y1 = (None,) * 4
        if rec.box is not None:
            fitted = _fit_box(rec.box, width, height)
            if isinstance(fitted, str):
                skip(rec, fitted)
                continue
            x0, y0, x1, y1 = fitted
        rows.append(
            {
                "sample_id": rec.sample_id,
                "image": rec.image,
                "question": rec.question,
                "answer": rec.answer,
                "answers": rec.answers,
                "box_x0": x0,
                "box_y0": y0,
                "box_x1": x1,
                "box_y1": y1,
                "width": width,
                "height": height,
                "source": rec.source,
            }
        )
    return (
        pa.Table.from_pylist(rows, schema=MANIFEST_COLUMNS),
        pa.Table.from_pylist(skips, schema=SKIP_COLUMNS),
    )
