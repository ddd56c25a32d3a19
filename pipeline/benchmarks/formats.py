"""Read the paper's benchmarks as they are distributed into benchmark documents (:data:`DOC_KEYS`).

Every benchmark is read from its lmms-lab Parquet release (one file, or a directory of
``<split>-0000k-of-0000n.parquet`` shards read in name order; a directory holding several splits is read at
lmms-eval's split) and from its original files; the format is told by the file (``.parquet``, ``.tsv``, else the
benchmark's original JSON / JSON Lines). The columns each format is read from:

========== ====================================================== ==============================================
benchmark  lmms-lab Parquet (lmms-eval's dataset)                  original release
========== ====================================================== ==============================================
textvqa    lmms-lab/textvqa validation: question_id, question,     TextVQA_0.5.1_val.json {"data": [...]}:
           answers (10), image                                     question_id, question, answers, image_id
                                                                   (image ``<image_root>/<image_id>.jpg``)
docvqa     lmms-lab/DocVQA DocVQA validation: questionId,          val_v1.0.json {"data": [...]}: questionId,
           question, answers, image                                question, answers, image ("documents/x.png")
infovqa    lmms-lab/DocVQA InfographicVQA validation: questionId,  infographicVQA_val_v1.0_withQT.json {"data":
           question, answers, image                                [...]}: questionId, question, answers,
                                                                   image_local_name
chartqa    lmms-lab/ChartQA test: type (human_test /               test/test_human.json, test_augmented.json
           augmented_test), question, answer, image                [{imgname, query, label}], images png/; the
                                                                   file name gives the type; ``path`` may be
                                                                   the test directory (human, then augmented)
ocrbench   echo840/OCRBench test: dataset, question,               OCRBench.json [{dataset_name, id,
           question_type, answer (list), image                     image_path, question, answers (str or
                                                                   list), type}]
pope       lmms-lab/POPE test: question_id, question, answer,      coco_pope_{adversarial,popular,random}.json,
           category, image                                         JSON Lines {question_id, image, text,
                                                                   label}; the file name gives the category;
                                                                   ``path`` may be their directory
vstar      lmms-lab/vstar-bench test: question_id, text, label,    test_questions.jsonl {image, text, category,
           category, image                                         question_id, label}
hrbench*   DreamMr/HR-Bench hr_bench_{4k,8k}.parquet: index,       hr_bench_{4k,8k}.tsv, the same columns
           question, answer, category, cycle_category, A-D,
           image (base64)
========== ====================================================== ==============================================

Ids: ``sample_id`` is the benchmark's question id where that is unique; POPE's repeats across its three
categories (``<category>-<question_id>``); ChartQA has none (``<type>-<k>``, the k-th question of that type, as
both releases list them); OCRBench's lmms-eval release has none (the record's position, 0-based). V* holds its
options in ``text`` ("<question>\\n(A) ...\\n(B) ...\\n<instruction>"); they become ``options`` and ``question``
keeps the text before "(A)". HR-Bench's options are the columns A, B, ... .

Images: embedded images (Parquet bytes, HR-Bench base64) are written once under ``image_dir`` as
``<sha256[:20]>.<format>`` (POPE's questions on one COCO image share one file), atomically, and never rewritten;
file references resolve under ``image_root`` (default: the file's directory) and may not leave it. Every image
is decoded in full, as ``prepare`` does.

As in :mod:`pipeline.io.manifest`, a bad record (missing or mistyped field, undecodable image, duplicate id)
becomes a skip row whose reason starts with its place (``row N`` of Parquet or TSV, ``item N`` of a JSON array,
0-based; ``line N`` of JSON Lines, 1-based; a shard's rows are prefixed by its file name) and names the field;
an input unusable as a whole raises :class:`~pipeline.io.manifest.InputError` naming the file.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import os
import re
import string
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from pipeline.benchmarks import BENCHMARKS
from pipeline.benchmarks.scorers import OCRBENCH_CATEGORIES
from pipeline.io.images import error_text, probe_image
from pipeline.io.manifest import (
    InputError,
    PrepareParams,
    Record,
    RecordError,
    _check_inside,
    _join,
    _jsonl_rows,
    _kind,
    _read_text,
    _reason,
    _sample_id,
    _text,
)

# What the last line of every released V* text says (lmms-eval appends the same words as its post_prompt).
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CHARTQA_TYPES = ("human_test", "augmented_test")
POPE_CATEGORIES = ("adversarial", "popular", "random")
OCRBENCH_TYPES = OCRBENCH_CATEGORIES  # the scorer's question types: a record of another type is skipped
# lmms-eval's split of each benchmark (test_split), as lmms-lab and HR-Bench name their Parquet files
SPLITS = {
    "textvqa": ("validation",),
    "docvqa": ("validation",),
    "infovqa": ("validation",),
    "chartqa": ("test",),
    "ocrbench": ("test",),
    "pope": ("test",),
    "vstar": ("test",),
    "hrbench4k": ("hrbench_4k", "hr_bench_4k"),
    "hrbench8k": ("hrbench_8k", "hr_bench_8k"),
}
_SHARD = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}$")
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
_BATCH = 64  # records whose images are checked together (bounds the embedded bytes held at once)


@dataclass(frozen=True)
class _Layout:
    """Where one distributed format keeps each document field (None: not in this format)."""

    id: str | None  # the question id; None: none (ChartQA, OCRBench)
    question: str
    image: str  # the embedded image column, or (image_ref set) the field naming the image file
    image_ref: str | None = None  # "{}.jpg": how that field becomes a path under the image root
    answer: str | None = None
    answers: str | None = None
    category: str | None = None  # None where the file name tells it (ChartQA, POPE originals)
    subset: str | None = None
    options: str | None = None  # "text": in the question text (V*); "letters": columns A, B, ... (HR-Bench)


_DATA_PARQUET = _Layout(id="questionId", question="question", answers="answers", image="image")
LAYOUTS: dict[tuple[str, str], _Layout] = {
    ("textvqa", "parquet"): _Layout(id="question_id", question="question", answers="answers", image="image"),
    ("textvqa", "json"): _Layout(
        id="question_id", question="question", answers="answers", image="image_id", image_ref="{}.jpg"
    ),
    ("docvqa", "parquet"): _DATA_PARQUET,
    ("docvqa", "json"): _Layout(id="questionId", question="question", answers="answers", image="image", image_ref="{}"),
    ("infovqa", "parquet"): _DATA_PARQUET,
    ("infovqa", "json"): _Layout(
        id="questionId", question="question", answers="answers", image="image_local_name", image_ref="{}"
    ),
    ("chartqa", "parquet"): _Layout(id=None, question="question", answer="answer", category="type", image="image"),
    ("chartqa", "json"): _Layout(id=None, question="query", answer="label", image="imgname", image_ref="png/{}"),
    ("ocrbench", "parquet"): _Layout(
        id=None, question="question", answers="answer", category="question_type", subset="dataset", image="image"
    ),
    ("ocrbench", "json"): _Layout(
        id=None,
        question="question",
        answers="answers",
        category="type",
        subset="dataset_name",
        image="image_path",
        image_ref="{}",
    ),
    ("pope", "parquet"): _Layout(
        id="question_id", question="question", answer="answer", category="category", image="image"
    ),
    ("pope", "jsonl"): _Layout(id="question_id", question="text", answer="label", image="image", image_ref="{}"),
    ("vstar", "parquet"): _Layout(
        id="question_id", question="text", answer="label", category="category", options="text", image="image"
    ),
    ("vstar", "jsonl"): _Layout(
        id="question_id",
        question="text",
        answer="label",
        category="category",
        options="text",
        image="image",
        image_ref="{}",
    ),
    ("hrbench", "parquet"): _Layout(
        id="index",
        question="question",
        answer="answer",
        category="category",
        subset="cycle_category",
        options="letters",
        image="image",
    ),
}
LAYOUTS["hrbench", "tsv"] = LAYOUTS["hrbench", "parquet"]
# how each original release is laid out: JSON object with a "data" array, JSON array, JSON Lines, TSV
_ORIGINAL = {
    "textvqa": "data",
    "docvqa": "data",
    "infovqa": "data",
    "chartqa": "array",
    "ocrbench": "array",
    "pope": "jsonl",
    "vstar": "jsonl",
    "hrbench": "tsv",
}


@dataclass
class _Source:
    """One input file: its format, how its records' places are named, and what its name tells."""

    path: Path
    kind: str  # parquet | tsv | json | jsonl
    prefix: str = ""  # a shard's file name, before "row N"
    category: str | None = None  # ChartQA's type or POPE's category, from the file name


@dataclass
class _Parsed:
    """One record's document fields before its image is checked."""

    sample_id: str
    question_id: str
    question: str
    image: bytes | str  # embedded bytes, or the reference resolved against the image root
    answer: str | None
    answers: list[str] | None
    options: list[str] | None
    category: str | None
    subset: str | None


def _family(name: str) -> str:
    return "hrbench" if name.startswith("hrbench") else name


def read_benchmark(
    name: str,
    path: Path,
    image_dir: Path,
    image_root: Path | None = None,
    n: int | None = None,
    *,
    allow_outside_root: bool = False,
    workers: int = 8,
) -> tuple[list[dict], list[dict]]:
    """(documents, skips) of benchmark ``name`` read from ``path`` (a file or a directory), in the file's order.

    Documents have exactly :data:`DOC_KEYS`; skips are ``{"sample_id", "image", "reason"}`` rows. ``n`` keeps
    the first n records (skipped ones count, as in ``prepare``). Embedded images are written under
    ``image_dir``; file references resolve under ``image_root`` (default: the input's directory) and are
    refused when they leave it unless ``allow_outside_root``. Raises :class:`InputError` for an input that is
    unusable as a whole, ``ValueError`` for an unknown benchmark.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 or None, got {n}")
    path = Path(path)
    family = _family(name)
    sources = _sources(name, family, path)
    root = str(image_root) if image_root is not None else str(path if path.is_dir() else path.parent)
    counters: Counter[str] = Counter()
    docs: list[dict] = []
    skips: list[dict] = []
    seen: dict[str, str] = {}
    rows = islice(_rows(family, sources), n)
    any_rows = False
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = _Images(Path(image_dir), pool)
        while batch := list(islice(rows, _BATCH)):
            any_rows = True
            # each entry is a finished skip row or a record waiting for its image, kept in input order
            entries: list[dict | tuple[str, _Parsed]] = []
            for index, src, where, raw in batch:
                layout = LAYOUTS[family, src.kind]
                sample_id = ""  # the id a record that fails would have had, once it is known
                try:
                    if isinstance(raw, Exception):
                        raise raw
                    ident = _identify(name, layout, raw, src, index, counters)
                    sample_id = ident[0]
                    parsed = _parse(name, layout, raw, ident, root, allow_outside_root)
                except Exception as exc:
                    entries.append(_skip(sample_id, _raw_ref(layout, raw, root), where, _reason(exc)))
                    continue
                if parsed.sample_id in seen:
                    ref = parsed.image if isinstance(parsed.image, str) else ""
                    first = f"duplicate sample_id (first at {seen[parsed.sample_id]})"
                    entries.append(_skip(parsed.sample_id, ref, where, first))
                    continue
                seen[parsed.sample_id] = where
                entries.append((where, parsed))
            waiting = [e[1].image for e in entries if isinstance(e, tuple)]
            results = iter(images.resolve(waiting))
            for entry in entries:
                if isinstance(entry, dict):
                    skips.append(entry)
                    continue
                where, parsed = entry
                res = next(results)
                if isinstance(res, str):
                    skips.append(
                        _skip(parsed.sample_id, parsed.image if isinstance(parsed.image, str) else "", where, res)
                    )
                else:
                    docs.append(_document(name, parsed, *res))
    if not any_rows:
        raise InputError(f"{path}: no records (empty file)")
    return docs, skips


def benchmark_records(params: PrepareParams, image_dir: Path) -> list[Record]:
    """``prepare``'s records for a benchmark format (``params.format`` in BENCHMARKS), embedded images under
    ``image_dir``.

    The manifest keeps the raw question (no lmms-eval prompt: ``prompts.build_prompt`` builds it from the
    documents), ``answer`` / ``answers`` and the benchmark name as ``source``. V*'s and HR-Bench's options, the
    question id and the categories have no manifest column and are lost there: the benchmark stage reads the
    documents themselves (:func:`read_benchmark`).
    """
    docs, skips = read_benchmark(
        params.format,
        Path(params.input),
        image_dir,
        Path(params.image_root) if params.image_root is not None else None,
        params.n,
        allow_outside_root=params.allow_outside_root,
    )
    records = [
        Record(
            sample_id=d["sample_id"],
            image=d["image"],
            question=d["question"],
            source=d["source"],
            answer=d["answer"],
            answers=d["answers"],
        )
        for d in docs
    ]
    # a skip's reason already starts with its place, so the record carries no separate `where`
    records += [Record(s["sample_id"], s["image"], "", "", skip=s["reason"]) for s in skips]
    return records


def _skip(sample_id: str, image: str, where: str, reason: str) -> dict:
    return {"sample_id": sample_id, "image": image, "reason": f"{where}: {reason}"}


def _document(name: str, p: _Parsed, image: str, width: int, height: int) -> dict:
    return {
        "sample_id": p.sample_id,
        "question_id": p.question_id,
        "image": image,
        "width": width,
        "height": height,
        "question": p.question,
        "answer": p.answer,
        "answers": p.answers,
        "options": p.options,
        "category": p.category,
        "subset": p.subset,
        "source": name,
    }


# ---------------------------------------------------------------------------------------------------- inputs


def _sources(name: str, family: str, path: Path) -> list[_Source]:
    """The files to read, in order, with their format."""
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if shards:
            return [_Source(p, "parquet", prefix=f"{p.name} ") for p in _one_split(name, path, shards)]
        originals = _original_files(family, path)
        if not originals:
            what = {"chartqa": "test_human.json / test_augmented.json", "pope": "*_pope_<category>.json files"}
            raise InputError(
                f"{path}: no Parquet shards (*.parquet){' and no ' + what[family] if family in what else ''}"
            )
        return originals
    if not path.exists():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [_Source(path, "parquet")]
    original = _ORIGINAL[family]
    if (suffix == ".tsv") != (original == "tsv"):
        told = "a TSV file" if suffix == ".tsv" else f"a {suffix or 'suffix-less'} file"
        formats = ".parquet and .tsv" if original == "tsv" else "Parquet and its original JSON files"
        raise InputError(f"{path}: {name} is not read from {told} (it is read from {formats})")
    kind = "jsonl" if original == "jsonl" else "tsv" if original == "tsv" else "json"
    return [_Source(path, kind, category=_category_from_name(family, path))]


def _one_split(name: str, path: Path, shards: list[Path]) -> list[Path]:
    """The shards of one split: the only one, or lmms-eval's when the directory holds several."""
    splits: dict[str, list[Path]] = {}
    for shard in shards:
        m = _SHARD.match(shard.stem)
        splits.setdefault(m["split"] if m else shard.stem, []).append(shard)
    if len(splits) == 1:
        return shards
    for split in SPLITS[name]:
        if split in splits:
            return splits[split]
    raise InputError(f"{path}: Parquet shards of splits {sorted(splits)}; none is {name}'s split {SPLITS[name]}")


def _original_files(family: str, path: Path) -> list[_Source]:
    if family == "chartqa":
        # lmms-lab's ChartQA lists the human-written questions first
        files = [path / "test_human.json", path / "test_augmented.json"]
    elif family == "pope":
        files = [p for p in sorted(path.glob("*.json")) if _pope_category(p) is not None]
    else:
        return []
    return [
        _Source(p, "json" if family == "chartqa" else "jsonl", category=_category_from_name(family, p))
        for p in files
        if p.is_file()
    ]


def _pope_category(path: Path) -> str | None:
    return next((c for c in POPE_CATEGORIES if c in path.stem.lower()), None)


def _category_from_name(family: str, path: Path) -> str | None:
    """ChartQA's type and POPE's category, which the original releases give only in the file name."""
    if family == "pope":
        category = _pope_category(path)
        if category is None:
            raise InputError(f"{path}: the file name names no POPE category ({', '.join(POPE_CATEGORIES)})")
        return category
    if family == "chartqa":
        stem = path.stem.lower()
        found = [t for t in CHARTQA_TYPES if t.split("_")[0] in stem]
        if len(found) != 1:
            raise InputError(f"{path}: the file name does not tell human from augmented (test_human.json, ...)")
        return found[0]
    return None


def _rows(family: str, sources: list[_Source]) -> Iterator[tuple[int, _Source, str, Any]]:
    """(index over all sources, source, place, record or the RecordError it failed with), lazily."""
    index = 0
    for src in sources:
        if src.kind == "parquet":
            rows = _parquet_stream(src, LAYOUTS[family, "parquet"])
        elif src.kind == "tsv":
            rows = _tsv_stream(src.path)
        elif src.kind == "jsonl":
            rows = _jsonl_records(src.path)
        else:
            rows = _json_items(src.path, _ORIGINAL[family])
        for where, raw in rows:
            yield index, src, where, raw
            index += 1


def _columns(layout: _Layout) -> list[str]:
    fields = (layout.id, layout.question, layout.image, layout.answer, layout.answers, layout.category, layout.subset)
    return [f for f in fields if f is not None]


def _parquet_stream(src: _Source, layout: _Layout) -> Iterator[tuple[str, Any]]:
    """(place, row) of a Parquet file in batches, reading only the columns a document needs."""
    try:
        file = pq.ParquetFile(src.path)
    except Exception as exc:  # pyarrow raises several types for files that are not Parquet
        raise InputError(f"{src.path}: not a readable Parquet file: {error_text(exc)}") from None
    have = file.schema_arrow.names
    needed = _columns(layout) + (["A", "B"] if layout.options == "letters" else [])
    missing = [c for c in needed if c not in have]
    if missing:
        raise InputError(f"{src.path}: no column(s) {missing}; its columns: {have}")
    letters = [c for c in string.ascii_uppercase if c in have] if layout.options == "letters" else []
    i = 0
    for batch in file.iter_batches(batch_size=_BATCH, columns=list(dict.fromkeys(_columns(layout) + letters))):
        for row in batch.to_pylist():
            yield f"{src.prefix}row {i}", row
            i += 1


def _tsv_stream(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, row as a dict of strings) of a TSV file with a header line (HR-Bench's, written by pandas)."""
    # base64 images are far longer than csv's default field limit (128 KiB)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: no records (empty file)")
            for i, fields in enumerate(reader):
                if len(fields) != len(header):
                    yield f"row {i}", RecordError(f"has {len(fields)} fields, the header {len(header)}")
                else:
                    yield f"row {i}", dict(zip(header, fields, strict=True))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {error_text(exc)}") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable TSV file: {error_text(exc)}") from None


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    rows = _jsonl_rows(path)
    if rows and all(isinstance(r, RecordError) for _, r in rows):
        where, first = rows[0]
        raise InputError(f"{path}: not JSON Lines: no line parses as JSON ({where}: {first})")
    return rows


def _json_items(path: Path, layout: str) -> list[tuple[str, Any]]:
    """(place, item) of a JSON array, or of the "data" array of a JSON object (TextVQA, DocVQA, InfoVQA)."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not JSON: {error_text(exc)}") from None
    if layout == "data":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            got = f"a JSON {_kind(data)}" if not isinstance(data, dict) else f"its 'data' is {_kind(data.get('data'))}"
            raise InputError(f"{path}: expected a JSON object with a 'data' array, got {got}")
        data = data["data"]
    elif not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of questions, got a JSON {_kind(data)}")
    return [(f"item {i}", item) for i, item in enumerate(data)]


# --------------------------------------------------------------------------------------------------- records


def _value(r: dict, field: str) -> Any:
    if r.get(field) is None:
        raise RecordError(f"{field!r} is missing" if field not in r else f"{field!r} is null")
    return r[field]


def _required(r: dict, field: str) -> str:
    value = _text(r, field, required=True)
    assert value is not None  # required fields are never None
    return value


def _id(r: dict, field: str) -> str:
    _value(r, field)
    return _sample_id(r, field, 0)


def _strings(r: dict, field: str, allow_str: bool = False) -> list[str]:
    """A non-empty array of strings (OCRBench's original gives a lone answer as a string)."""
    value = _value(r, field)
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise RecordError(f"{field!r} must be an array of strings, got {_kind(value)}")
    bad = next((j for j, a in enumerate(value) if not isinstance(a, str)), None)
    if bad is not None:
        raise RecordError(f"{field!r} item {bad} must be a string, got {_kind(value[bad])}")
    if not value:
        raise RecordError(f"{field!r} is empty")
    return list(value)


def _embedded(r: dict, field: str) -> bytes:
    """The image bytes of a Parquet image struct {bytes, path}, a binary column or a base64 string."""
    value = _value(r, field)
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            where = f" (it names {value['path']!r})" if value.get("path") else ""
            raise RecordError(f"{field!r} holds no image bytes{where}")
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value)
        except (binascii.Error, ValueError) as exc:
            raise RecordError(f"{field!r} is not base64: {error_text(exc)}") from None
    elif isinstance(value, bytes):
        data = value
    else:
        raise RecordError(f"{field!r} must be an image (bytes or base64), got {_kind(value)}")
    if not data:
        raise RecordError(f"{field!r} is empty")
    return data


def _reference(layout: _Layout, r: dict, root: str, allow_outside_root: bool) -> str:
    ref = (layout.image_ref or "{}").format(_required(r, layout.image))
    _check_inside(ref, root, allow_outside_root)
    return _join(root, ref)


def _vstar_options(text: str, field: str) -> tuple[str, list[str]]:
    """(question, options) of a V* text "<question>\\n(A) ...\\n(B) ...[\\n<instruction>]"."""
    start = text.find("(A)")
    if start < 0:
        raise RecordError(f"{field!r} lists no options ('(A) ...')")
    parts = re.split(r"\s*\(([A-Z])\)[ \t]*", text[start:])
    letters, bodies = parts[1::2], parts[2::2]
    # the released texts end with V*'s instruction on its own line after the last option
    last, _, trailer = bodies[-1].partition("\n")
    bodies[-1] = last
    options = [b.strip() for b in bodies]
    if letters != list(string.ascii_uppercase[: len(letters)]) or len(letters) < 2:
        raise RecordError(f"{field!r} options are not (A), (B), ... in order: {''.join(letters)}")
    if not all(options):
        raise RecordError(f"{field!r} has an empty option")
    if trailer.strip() not in ("", VSTAR_INSTRUCTION):
        raise RecordError(f"{field!r} ends with {trailer.strip()!r} after its options, not V*'s instruction")
    return text[:start].strip(), options


def _letter_options(r: dict) -> list[str]:
    """HR-Bench's options: columns A, B, ... up to the first empty one, all strings, none after a gap."""
    options: list[str] = []
    for letter in string.ascii_uppercase:
        value = r.get(letter)
        if value is None or value == "":
            if any(r.get(after) not in (None, "") for after in string.ascii_uppercase[len(options) + 1 :]):
                raise RecordError(f"{letter!r} is empty but a later option is not")
            break
        if not isinstance(value, str):
            raise RecordError(f"{letter!r} must be a string, got {_kind(value)}")
        options.append(value)
    if len(options) < 2:
        raise RecordError(f"needs options 'A' and 'B', has {len(options)}")
    return options


def _identify(
    name: str, layout: _Layout, r: Any, src: _Source, index: int, counters: Counter[str]
) -> tuple[str, str, str | None]:
    """(sample_id, question_id, category) of a record: what names it, checked before its other fields."""
    if not isinstance(r, dict):
        raise RecordError(f"not a JSON object (got {_kind(r)})")
    family = _family(name)
    category = _required(r, layout.category) if layout.category else src.category
    if family == "chartqa":
        if category not in CHARTQA_TYPES:
            raise RecordError(f"'type' must be one of {list(CHARTQA_TYPES)}, got {category!r}")
        # counted before the rest is checked, so one bad record does not shift the ids after it
        question_id = f"{category}-{counters[category]}"
        counters[category] += 1
    else:
        question_id = _id(r, layout.id) if layout.id else str(index)
    return (f"{category}-{question_id}" if family == "pope" else question_id), question_id, category


def _parse(
    name: str, layout: _Layout, r: dict, ident: tuple[str, str, str | None], root: str, allow_outside_root: bool
) -> _Parsed:
    """The document fields of record ``r`` (identified by :func:`_identify`); RecordError naming the field."""
    family = _family(name)
    sample_id, question_id, category = ident
    question = _required(r, layout.question)
    options = None
    if layout.options == "text":
        question, options = _vstar_options(question, layout.question)
    elif layout.options == "letters":
        options = _letter_options(r)
    answer = _required(r, layout.answer) if layout.answer else None
    if answer is not None and family == "pope" and answer.strip().lower() not in ("yes", "no"):
        raise RecordError(f"{layout.answer!r} must be yes or no, got {answer!r}")
    if answer is not None and options is not None:
        letters = string.ascii_uppercase[: len(options)]
        answer = answer.strip().upper()
        if answer not in letters:
            raise RecordError(f"{layout.answer!r} {answer!r} is not an option letter ({', '.join(letters)})")
    answers = _strings(r, layout.answers, allow_str=family == "ocrbench") if layout.answers else None
    if family == "ocrbench" and category not in OCRBENCH_TYPES:
        raise RecordError(f"{layout.category!r} {category!r} is not one of OCRBench's question types")
    subset = _required(r, layout.subset) if layout.subset else None
    if layout.image_ref is None:
        image: bytes | str = _embedded(r, layout.image)
    else:
        image = _reference(layout, r, root, allow_outside_root)
    return _Parsed(sample_id, question_id, question, image, answer, answers, options, category, subset)


def _raw_ref(layout: _Layout, raw: Any, root: str) -> str:
    """The image reference of a record that failed parsing, resolved against the root ('' if none)."""
    if layout.image_ref is None or not isinstance(raw, dict) or not isinstance(raw.get(layout.image), str):
        return ""
    return _join(root, layout.image_ref.format(raw[layout.image]))


# ---------------------------------------------------------------------------------------------------- images


class _Images:
    """Each record's image as (local path, width, height), or why it cannot be used; embedded images are
    written once under ``image_dir``. Results are kept per image, so POPE's repeats are decoded once."""

    def __init__(self, image_dir: Path, pool: ThreadPoolExecutor) -> None:
        self.dir = image_dir
        self.pool = pool
        self.done: dict[str, tuple[str, int, int] | str] = {}

    def resolve(self, images: list[bytes | str]) -> list[tuple[str, int, int] | str]:
        keys = [hashlib.sha256(x).hexdigest() if isinstance(x, bytes) else "ref:" + x for x in images]
        todo = dict(zip(keys, images, strict=True))
        todo = {k: x for k, x in todo.items() if k not in self.done}
        self.done.update(zip(todo, self.pool.map(self._one, todo.values(), todo.keys()), strict=True))
        return [self.done[k] for k in keys]

    def _one(self, image: bytes | str, key: str) -> tuple[str, int, int] | str:
        if isinstance(image, str):
            size = _probe(image)
            return size if isinstance(size, str) else (image, *size)
        try:
            with Image.open(io.BytesIO(image)) as img:
                fmt = img.format or "img"
        except Exception as exc:  # PIL raises many types for bytes that are no image
            return f"unreadable image: {error_text(exc)}"
        path = self.dir / f"{key[:20]}.{_EXTENSIONS.get(fmt, fmt.lower())}"
        if path.exists():  # content-addressed: the same name holds the same bytes
            size = _probe(str(path))
            return size if isinstance(size, str) else (str(path), *size)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(image)
            # decoded in full before it gets its name, so a file under a final name is always a usable image
            size = _probe(tmp)
            if isinstance(size, str):
                return size
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return (str(path), *size)


def _probe(ref: str) -> tuple[int, int] | str:
    """(width, height) of an image decoded in full, or the skip reason ``prepare`` gives."""
    try:
        return probe_image(ref)
    except FileNotFoundError:
        return "image not found"
    except Exception as exc:  # corrupt or unsupported files raise many types
        return f"unreadable image: {error_text(exc)}"
