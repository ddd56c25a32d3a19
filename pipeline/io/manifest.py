"""Build the sample manifest from LLaVA-1.5's instruction mix or from plain JSONL / Parquet records.

Images that are missing or unreadable are reported by sample id in a skips table, never dropped
silently.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.images import probe_image

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


@dataclass
class Record:
    """One candidate sample before its image is checked."""

    sample_id: str
    image: str
    question: str
    source: str
    answer: str | None = None
    answers: list[str] | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class PrepareParams:
    """params.yaml ``prepare`` / ``prepare_eval``: which records become the manifest."""

    format: Literal["records", "llava_mix"] = "records"  # records: JSONL/Parquet; llava_mix: LLaVA's mix665k JSON
    input: str = ""
    image_root: str | None = None  # relative image paths resolve here (records default: the file's own dir)
    sources: list[str] | None = None  # llava_mix: keep these image sources, e.g. [gqa, ocr_vqa]
    n: int | None = None  # keep the first n (llava_mix: after a seeded shuffle)
    seed: int = 42

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input: name the records file (JSONL/Parquet) or LLaVA mix JSON")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1 or null, got {self.n}")
        if self.sources is not None and self.format != "llava_mix":
            raise ValueError("sources applies to format llava_mix only")


def records_from_params(params: PrepareParams) -> list[Record]:
    """The candidate records that ``params`` names, before their images are checked."""
    if params.format == "llava_mix":
        return records_from_llava_mix(params.input, params.image_root, params.sources, params.n, params.seed)
    records = records_from_table(params.input, params.image_root)
    return records[: params.n] if params.n else records


def _join(root: str | None, ref: str) -> str:
    if root is None or "://" in ref or Path(ref).is_absolute():
        return ref
    return root.rstrip("/") + "/" + ref


def records_from_llava_mix(
    path: str | Path, image_root: str | None, sources: list[str] | None, n: int | None, seed: int = 42
) -> list[Record]:
    """First QA turn of each image in a LLaVA-1.5 mix JSON (e.g. llava_v1_5_mix665k.json).

    Keeps entries whose image path starts with one of ``sources`` (gqa, ocr_vqa, ...), shuffles with
    ``seed`` and keeps the first ``n`` (SPEC 2: subsets are shuffle(seed 42)[:N]).
    """
    entries = json.loads(Path(path).read_text())
    out: list[Record] = []
    for i, e in enumerate(entries):
        image = e.get("image")
        if not image:
            continue  # text-only conversations have no image to localise in
        source = PurePosixPath(image).parts[0]
        if sources and source not in sources:
            continue
        conv = e.get("conversations") or []
        human = next((t for t in conv if t.get("from") == "human"), None)
        gpt = next((t for t in conv if t.get("from") == "gpt"), None)
        if human is None:
            raise ValueError(f"{path}: entry {i} (id {e.get('id')}) has no human turn")
        question = _IMAGE_TAG.sub(" ", human["value"]).strip()
        out.append(
            Record(
                sample_id=str(e.get("id", i)),
                image=_join(image_root, image),
                question=question,
                source=source,
                answer=gpt["value"].strip() if gpt else None,
            )
        )
    random.Random(seed).shuffle(out)
    return out[:n] if n else out


def records_from_table(path: str | Path, image_root: str | None = None) -> list[Record]:
    """Plain records from JSONL or Parquet: image, question, optional sample_id/answer/answers/box/source.

    Relative image paths resolve against ``image_root``, or else against the file's own directory.
    """
    path = Path(path)
    rows = (
        pq.read_table(path).to_pylist()
        if path.suffix == ".parquet"
        else [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    )
    root = image_root if image_root is not None else str(path.parent)
    out = []
    for i, r in enumerate(rows):
        for field in ("image", "question"):
            if not r.get(field):
                raise ValueError(f"{path}: record {i} (sample {r.get('sample_id', i)}) has no {field!r}")
        box = r.get("box")
        if box is not None and len(box) != 4:
            raise ValueError(f"{path}: sample {r.get('sample_id', i)}: 'box' must be [x0, y0, x1, y1], got {box}")
        out.append(
            Record(
                sample_id=str(r.get("sample_id", i)),
                image=_join(root, r["image"]),
                question=r["question"],
                source=r.get("source") or path.stem,
                answer=r.get("answer"),
                answers=r.get("answers"),
                box=tuple(float(v) for v in box) if box is not None else None,
            )
        )
    return out


def build_manifest(records: Iterable[Record], workers: int = 8) -> tuple[pa.Table, pa.Table]:
    """Check every image and return (manifest, skips); duplicate ids and bad images become skips."""
    records = list(records)

    def check(rec: Record) -> tuple[int, int] | str:
        try:
            return probe_image(rec.image)
        except FileNotFoundError:
            return "image not found"
        except Exception as exc:  # corrupt or unsupported files raise many types
            return f"unreadable image: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(check, records))
    rows, skips, seen = [], [], set()
    for rec, res in zip(records, checks, strict=True):
        if rec.sample_id in seen:
            skips.append({"sample_id": rec.sample_id, "image": rec.image, "reason": "duplicate sample_id"})
            continue
        seen.add(rec.sample_id)
        if isinstance(res, str):
            skips.append({"sample_id": rec.sample_id, "image": rec.image, "reason": res})
            continue
        width, height = res
        x0, y0, x1, y1 = rec.box if rec.box is not None else (None,) * 4
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
