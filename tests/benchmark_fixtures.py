"""Tiny, deterministic copies of the paper's benchmarks in each format they are distributed in.

:func:`write_fixture` writes ``n`` questions of one benchmark in one format (:data:`FIXTURE_FORMATS`) under
``root`` and returns what :func:`pipeline.benchmarks.formats.read_benchmark` reads (a file or a directory; file
references resolve under the default image root). :func:`expected_documents` gives the documents every format
of a benchmark must read into (``image`` None: its path depends on the format). The images are small solid
colours with a square, of varying non-square sizes; field values follow the real releases (ten TextVQA answers,
V* options inside the text, POPE yes/no over three categories sharing COCO images, ...).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.benchmarks import DOC_KEYS
from pipeline.benchmarks.formats import OCRBENCH_TYPES, POPE_CATEGORIES, VSTAR_INSTRUCTION

FIXTURE_FORMATS: dict[str, tuple[str, ...]] = {
    "textvqa": ("lmms_lab_parquet", "original_json"),
    "docvqa": ("lmms_lab_parquet", "original_json"),
    "infovqa": ("lmms_lab_parquet", "original_json"),
    "chartqa": ("lmms_lab_parquet", "original_json"),
    "ocrbench": ("lmms_lab_parquet", "original_json"),
    "pope": ("lmms_lab_parquet", "original_jsonl"),
    "vstar": ("lmms_lab_parquet", "original_jsonl"),
    "hrbench4k": ("parquet", "tsv"),
    "hrbench8k": ("parquet", "tsv"),
}
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

_TEXTVQA = [
    ("what is the brand of this camera?", "dakota"),
    ("what does the NYC sign say?", "stop"),
    ("what number is on the player's jersey?", "22"),
    ("what time does the clock show?", "5:40"),
    ("who is the author of this book?", "jane austen"),
    ("what word is written in red?", "exit"),
]
_DOCVQA = [
    ("What is the ‘actual’ value per 1000, during the year 1975?", ["0.28"]),
    ("What is the name of the company?", ["itc limited", "ITC Limited"]),
    ("Whose signature is at the bottom of the letter?", ["R. J. Reynolds"]),
    ("What is the date mentioned in this letter?", ["March 3, 1964", "3/3/64"]),
    ("What is the total amount?", ["$ 1,250"]),
    ("To whom is the memo addressed?", ["Dr. Shank"]),
]
_INFOVQA = [
    ("Which social platform has heavy female audience?", ["pinterest"]),
    ("What percentage of people use the internet daily?", ["62%", "62"]),
    ("How many countries are shown in the map?", ["7"]),
    ("Which year had the most visitors?", ["2019"]),
    ("What is the second most popular sport?", ["cricket"]),
    ("What colour represents women?", ["pink", "light pink"]),
]
_CHARTQA = [
    ("What's the value of the lowest bar?", "23"),
    ("Is the value of Favorable 38 in 2015?", "Yes"),
    ("Which party has the highest approval?", "Democrats"),
    ("What is the sum of the two smallest values?", "1.54"),
    ("In which year was the gap the largest?", "2016"),
    ("What percentage said neither?", "7%"),
]
_OCRBENCH = [
    ("IIIT5K", "what is written in the image?", ["Ready"]),
    ("HME100k", "Please write out the expression of the formula in the image using LaTeX format.", ["x^{2}+1"]),
    ("docVQA", "What is the title of the report? ", ["ANNUAL REPORT", "annual report"]),
    ("textVQA", "what brand is the beer?", ["heineken"]),
    ("FUNSD", "What is the value for the key 'DATE:'?", ["12/10/98"]),
    ("WordArt", "what is written in the image?", ["Sunday"]),
]
_OCRBENCH_TYPE = {
    "IIIT5K": "Regular Text Recognition",
    "HME100k": "Handwritten Mathematical Expression Recognition",
    "docVQA": "Doc-oriented VQA",
    "textVQA": "Scene Text-centric VQA",
    "FUNSD": "Key Information Extraction",
    "WordArt": "Artistic Text Recognition",
}
_POPE_OBJECTS = ["snowboard", "dining table", "car", "person", "handbag", "bottle"]
_VSTAR = [
    ("direct_attributes", "What is the material of the glove?", ["rubber", "cotton", "kevlar", "leather"], "A"),
    ("relative_position", "Is the dog on the left or right side of the bench?", ["left", "right"], "B"),
    ("direct_attributes", "What is the color of the dustpan?", ["purple", "red", "blue", "white"], "C"),
    ("relative_position", "Is the lamp on the left or right side of the sofa?", ["right", "left"], "A"),
    ("direct_attributes", "What is the breed of the dog?", ["husky", "poodle", "beagle", "corgi"], "D"),
    ("relative_position", "Is the cup on the left or right side of the laptop?", ["left", "right"], "A"),
]
_HRBENCH = [
    ('What is written on the "EXIT" sign?', ["EXIT", "ENTER", "STOP", "OPEN"], "A", "single"),
    ("What color is the car parked behind the tree?", ["red", "blue", "white", "black"], "C", "single"),
    ("How many windows does the second building have?", ["4", "6", "8", "10"], "B", "cross"),
    (
        "Which object is closer to the bench, the lamp or the bin?",
        ["the lamp", "the bin", "both", "neither"],
        "D",
        "cross",
    ),
    ("What is the number on the bus?", ["12", "21", "112", "211"], "A", "single"),
    ("What animal is on the flag?", ["eagle", "lion", "bear", "horse"], "B", "cross"),
]


def _size(i: int) -> tuple[int, int]:
    """Small, varied, never square."""
    return 40 + 6 * (i % 5), 30 + 4 * (i % 3)


def _image(i: int, seed: int) -> Image.Image:
    rng = random.Random(seed * 1000 + i)
    w, h = _size(i)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    side = min(w, h) // 2
    x, y = rng.randrange(w - side), rng.randrange(h - side)
    ImageDraw.Draw(img).rectangle([x, y, x + side - 1, y + side - 1], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _pick(table: list, i: int):
    return table[i % len(table)]


def _questions(name: str, n: int, seed: int) -> list[dict]:
    """Each question's fields in the releases' own words, plus its image index ("img") and document ("doc")."""
    rng = random.Random(seed)
    out = []
    per_category = math.ceil(n / 3)
    humans = math.ceil(n / 2)
    for i in range(n):
        q: dict = {"img": i}
        doc: dict = {"answer": None, "answers": None, "options": None, "category": None, "subset": None}
        if name == "textvqa":
            question, answer = _pick(_TEXTVQA, i)
            qid = 34602 + 3 * i
            answers = [answer] * 7 + [answer.upper(), "unanswerable", f"{answer} {i}"]
            q.update(question_id=qid, question=question, answers=answers, image_id=f"{rng.getrandbits(64):016x}")
            doc.update(sample_id=str(qid), question_id=str(qid), question=question, answers=answers)
        elif name in ("docvqa", "infovqa"):
            question, answers = _pick(_DOCVQA if name == "docvqa" else _INFOVQA, i)
            qid = (49153 if name == "docvqa" else 65718) + 7 * i
            q.update(questionId=qid, question=question, answers=answers)
            q["image"] = f"documents/{'pybv' if i % 2 else 'xnbl'}{rng.randrange(1000):04d}_{i}.png"
            q["image_local_name"] = f"{10002 + i}.jpeg"
            doc.update(sample_id=str(qid), question_id=str(qid), question=question, answers=answers)
        elif name == "chartqa":
            question, label = _pick(_CHARTQA, i)
            kind = "human_test" if i < humans else "augmented_test"
            k = i if i < humans else i - humans
            q.update(type=kind, query=question, label=label, imgname=f"{'multi_col_' if i % 2 else ''}{803 + i}.png")
            doc.update(sample_id=f"{kind}-{k}", question_id=f"{kind}-{k}", question=question, answer=label)
            doc["category"] = kind
        elif name == "ocrbench":
            dataset, question, answers = _pick(_OCRBENCH, i)
            qtype = _OCRBENCH_TYPE[dataset]
            assert qtype in OCRBENCH_TYPES
            q.update(dataset=dataset, question=question, answers=answers, type=qtype)
            q["image_path"] = f"{dataset}/{1002 + i}_{i % 3}.png"
            doc.update(sample_id=str(i), question_id=str(i), question=question, answers=answers)
            doc.update(category=qtype, subset=dataset)
        elif name == "pope":
            category = POPE_CATEGORIES[min(i // per_category, 2)]
            qid = i % per_category + 1
            q["img"] = i % per_category % 2  # two COCO images, asked about in every category
            obj = _pick(_POPE_OBJECTS, i)
            question = f"Is there a {obj} in the image?"
            answer = ("yes", "no")[(i + i // per_category) % 2]
            q.update(question_id=qid, question=question, answer=answer, category=category)
            q["image"] = f"COCO_val2014_{310196 + q['img']:012d}.jpg"
            doc.update(sample_id=f"{category}-{qid}", question_id=str(qid), question=question, answer=answer)
            doc["category"] = category
        elif name == "vstar":
            category, question, options, label = _pick(_VSTAR, i)
            lines = "\n".join(f"({letter}) {opt}" for letter, opt in zip("ABCD", options, strict=False))
            text = f"{question}\n{lines}\n{VSTAR_INSTRUCTION}"
            q.update(question_id=i, text=text, label=label, category=category, image=f"{category}/sa_{4690 + i}.jpg")
            doc.update(sample_id=str(i), question_id=str(i), question=question, answer=label, options=options)
            doc["category"] = category
        else:  # hrbench4k / hrbench8k
            question, options, answer, category = _pick(_HRBENCH, i)
            cycle = f"{category}_{i // 2}"
            q.update(index=i, question=question, answer=answer, category=category, cycle_category=cycle)
            q.update(zip("ABCD", options, strict=True))
            doc.update(sample_id=str(i), question_id=str(i), question=question, answer=answer, options=options)
            doc.update(category=category, subset=cycle)
        w, h = _size(q["img"])
        q["doc"] = {**doc, "width": w, "height": h, "source": name}
        out.append(q)
    return out


def expected_documents(name: str, n: int = 6, seed: int = 0) -> list[dict]:
    """The documents the fixtures of ``name`` read into, in order, with ``image`` None."""
    return [{k: q["doc"].get(k) for k in DOC_KEYS} for q in _questions(name, n, seed)]


def _struct(data: bytes) -> dict:
    return {"bytes": data, "path": None}


def _write_parquet(rows: list[dict], path: Path, image_column: str | None = "image") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if image_column is not None and image_column in table.column_names:
        i = table.column_names.index(image_column)
        table = table.set_column(i, image_column, pa.array(table.column(image_column).to_pylist(), IMAGE_STRUCT))
    pq.write_table(table, path)


def _shards(rows: list[dict], folder: Path, split: str, count: int) -> None:
    """``rows`` as ``count`` shards named as the Hugging Face hub names them."""
    size = math.ceil(len(rows) / count)
    for k in range(count):
        _write_parquet(rows[k * size : (k + 1) * size], folder / f"{split}-{k:05d}-of-{count:05d}.parquet")


def _save_images(questions: list[dict], root: Path, ref: str, seed: int, fmt: str) -> None:
    for q in questions:
        path = root / ref.format(**q)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _image(q["img"], seed).save(path, fmt)


def _json(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


def write_fixture(name: str, fmt: str, root: Path, n: int = 6, seed: int = 0) -> Path:
    """Write ``n`` questions of benchmark ``name`` in format ``fmt`` under ``root``; the path to read."""
    if fmt not in FIXTURE_FORMATS.get(name, ()):
        raise ValueError(f"no fixture format {fmt!r} for {name!r}; formats: {FIXTURE_FORMATS.get(name)}")
    qs = _questions(name, n, seed)
    base = Path(root) / f"{name}-{fmt}"
    jpeg = {i: _encode(_image(i, seed), "JPEG") for i in {q["img"] for q in qs}}
    png = {i: _encode(_image(i, seed), "PNG") for i in {q["img"] for q in qs}}
    if name == "textvqa":
        if fmt == "lmms_lab_parquet":
            rows = [
                {
                    "image_id": q["image_id"],
                    "question_id": q["question_id"],
                    "question": q["question"],
                    "question_tokens": q["question"].rstrip("?").split(),
                    "image": _struct(jpeg[q["img"]]),
                    "image_width": _size(q["img"])[0],
                    "image_height": _size(q["img"])[1],
                    "flickr_original_url": f"https://farm2.staticflickr.com/{q['image_id']}_o.jpg",
                    "flickr_300k_url": f"https://c4.staticflickr.com/{q['image_id']}_z.jpg",
                    "answers": q["answers"],
                    "image_classes": ["Camera", "Poster"],
                    "set_name": "val",
                    "ocr_tokens": ["OCR", "TOKENS", str(q["question_id"])],
                }
                for q in qs
            ]
            _shards(rows, base / "data", "validation", 2)
            # another split in the same folder: the reader takes lmms-eval's (validation)
            other = [{**r, "question_id": r["question_id"] + 1, "set_name": "train"} for r in rows[:2]]
            _shards(other, base / "data", "train", 1)
            return base / "data"
        data = [
            {
                "question": q["question"],
                "image_id": q["image_id"],
                "image_classes": ["Camera"],
                "flickr_original_url": "https://farm2.staticflickr.com/x_o.jpg",
                "flickr_300k_url": "https://c4.staticflickr.com/x_z.jpg",
                "image_width": _size(q["img"])[0],
                "image_height": _size(q["img"])[1],
                "answers": q["answers"],
                "question_tokens": q["question"].rstrip("?").split(),
                "question_id": q["question_id"],
                "set_name": "val",
            }
            for q in qs
        ]
        _save_images(qs, base, "{image_id}.jpg", seed, "JPEG")
        doc = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
        _json(doc, base / "TextVQA_0.5.1_val.json")
        return base / "TextVQA_0.5.1_val.json"
    if name == "docvqa":
        common = [
            {
                "question": q["question"],
                "question_types": ["handwritten", "form"],
                "docId": 14465 + q["img"],
                "ucsf_document_id": f"txpp{q['img']:04d}",
                "ucsf_document_page_no": "1",
                "answers": q["answers"],
                "data_split": "val",
            }
            for q in qs
        ]
        if fmt == "lmms_lab_parquet":
            rows = [
                {"questionId": str(q["questionId"]), **c, "image": _struct(png[q["img"]])}
                for q, c in zip(qs, common, strict=True)
            ]
            _shards(rows, base / "DocVQA", "validation", 1)
            return base / "DocVQA"
        _save_images(qs, base, "{image}", seed, "PNG")
        data = [{"questionId": q["questionId"], **c, "image": q["image"]} for q, c in zip(qs, common, strict=True)]
        _json(
            {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0", "data": data},
            base / "val_v1.0.json",
        )
        return base / "val_v1.0.json"
    if name == "infovqa":
        if fmt == "lmms_lab_parquet":
            rows = [
                {
                    "questionId": str(q["questionId"]),
                    "question": q["question"],
                    "answers": q["answers"],
                    "answer_type": ["single span"],
                    "image": _struct(jpeg[q["img"]]),
                    "image_url": f"https://example.org/{q['image_local_name']}",
                    "operation/reasoning": ["counting"],
                    "ocr": "[]",
                    "data_split": "val",
                }
                for q in qs
            ]
            _shards(rows, base / "InfographicVQA", "validation", 1)
            return base / "InfographicVQA"
        _save_images(qs, base, "{image_local_name}", seed, "JPEG")
        data = [
            {
                "questionId": q["questionId"],
                "question": q["question"],
                "image_local_name": q["image_local_name"],
                "image_url": f"https://example.org/{q['image_local_name']}",
                "ocr_output_file": f"{q['image_local_name'].split('.')[0]}.json",
                "answers": q["answers"],
                "data_split": "val",
                "answer_type": ["single span"],
                "evidence": ["Text"],
                "operation/reasoning": [],
                "question_type": "single",
            }
            for q in qs
        ]
        out = base / "infographicVQA_val_v1.0_withQT.json"
        _json({"dataset_name": "infographicVQA", "dataset_version": "1.0", "dataset_split": "val", "data": data}, out)
        return out
    if name == "chartqa":
        if fmt == "lmms_lab_parquet":
            rows = [
                {"type": q["type"], "question": q["query"], "answer": q["label"], "image": _struct(png[q["img"]])}
                for q in qs
            ]
            _shards(rows, base / "data", "test", 1)
            return base / "data"
        test = base / "test"
        _save_images(qs, test, "png/{imgname}", seed, "PNG")
        for kind, file in (("human_test", "test_human.json"), ("augmented_test", "test_augmented.json")):
            items = [
                {"imgname": q["imgname"], "query": q["query"], "label": q["label"]} for q in qs if q["type"] == kind
            ]
            _json(items, test / file)
        return test
    if name == "ocrbench":
        if fmt == "lmms_lab_parquet":
            rows = [
                {
                    "dataset": q["dataset"],
                    "question": q["question"],
                    "question_type": q["type"],
                    "answer": q["answers"],
                    "image": _struct(jpeg[q["img"]]),
                }
                for q in qs
            ]
            _shards(rows, base / "data", "test", 1)
            return base / "data"
        _save_images(qs, base, "{image_path}", seed, "PNG")
        items = [
            {
                "dataset_name": q["dataset"],
                "id": i,
                "image_path": q["image_path"],
                "question": q["question"],
                # the release gives a lone answer as a string
                "answers": q["answers"][0] if len(q["answers"]) == 1 else q["answers"],
                "type": q["type"],
            }
            for i, q in enumerate(qs)
        ]
        _json(items, base / "OCRBench.json")
        return base / "OCRBench.json"
    if name == "pope":
        if fmt == "lmms_lab_parquet":
            rows = [
                {
                    "id": str(i),
                    "question_id": str(q["question_id"]),
                    "question": q["question"],
                    "answer": q["answer"],
                    "image_source": q["image"].removesuffix(".jpg"),
                    "image": _struct(jpeg[q["img"]]),
                    "category": q["category"],
                }
                for i, q in enumerate(qs)
            ]
            _shards(rows, base / "data", "test", 2)
            return base / "data"
        _save_images(qs, base, "{image}", seed, "JPEG")
        for category in POPE_CATEGORIES:
            lines = [
                json.dumps(
                    {"question_id": q["question_id"], "image": q["image"], "text": q["question"], "label": q["answer"]}
                )
                for q in qs
                if q["category"] == category
            ]
            (base / f"coco_pope_{category}.json").write_text("".join(line + "\n" for line in lines))
        return base
    if name == "vstar":
        keys = ("question_id", "text", "label", "category")
        if fmt == "lmms_lab_parquet":
            rows = [{**{k: q[k] for k in keys}, "image": _struct(jpeg[q["img"]])} for q in qs]
            _shards(rows, base / "data", "test", 1)
            return base / "data"
        _save_images(qs, base, "{image}", seed, "JPEG")
        lines = [json.dumps({"image": q["image"], **{k: q[k] for k in keys}}) for q in qs]
        (base / "test_questions.jsonl").write_text("".join(line + "\n" for line in lines))
        return base / "test_questions.jsonl"
    # HR-Bench: the same columns in Parquet and TSV, the image as base64 text
    size = name.removeprefix("hrbench")
    keys = ("index", "question", "answer", "category", "cycle_category", "A", "B", "C", "D")
    rows = [{**{k: q[k] for k in keys}, "image": base64.b64encode(jpeg[q["img"]]).decode()} for q in qs]
    if fmt == "parquet":
        out = base / f"hr_bench_{size}.parquet"
        _write_parquet(rows, out, image_column=None)
        return out
    out = base / f"hr_bench_{size}.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        # as pandas' to_csv(sep="\t") writes it: fields with quotes or tabs are quoted
        writer = csv.DictWriter(fh, fieldnames=[*keys, "image"], delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out
