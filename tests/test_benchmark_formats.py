"""Benchmarks as distributed: every format of a benchmark reads into the same documents, a bad record is a skip
naming its place and field, embedded images are written once, `prepare` takes a benchmark format, and the
prompts are lmms-eval's text."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.benchmarks import BENCHMARKS, DOC_KEYS
from pipeline.benchmarks.formats import read_benchmark
from pipeline.benchmarks.prompts import FAMILIES, build_prompt, generation_kwargs, prompt_kwargs
from pipeline.io.contracts import read_parquet
from pipeline.io.manifest import InputError, PrepareParams, records_from_params
from stages.cli import main
from tests.benchmark_fixtures import FIXTURE_FORMATS, expected_documents, write_fixture

CASES = [(name, fmt) for name, fmts in FIXTURE_FORMATS.items() for fmt in fmts]
EMBEDDED = {"lmms_lab_parquet", "parquet", "tsv"}


def _read(name: str, path: Path, image_dir: Path, **kw) -> tuple[list[dict], list[tuple[str, str]]]:
    docs, skips = read_benchmark(name, path, image_dir, **kw)
    assert all(set(s) == {"sample_id", "image", "reason"} for s in skips)
    return docs, [(s["sample_id"], s["reason"]) for s in skips]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of every file, hidden ones included."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} if folder.exists() else {}


def test_fixtures_cover_every_benchmark():
    assert set(FIXTURE_FORMATS) == set(BENCHMARKS)


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_every_format_reads_into_the_benchmark_documents(tmp_path, name, fmt):
    path = write_fixture(name, fmt, tmp_path)
    docs, skips = _read(name, path, tmp_path / "images")
    assert skips == []
    assert all(tuple(d) == DOC_KEYS for d in docs)
    assert [{**d, "image": None} for d in docs] == expected_documents(name)
    for d in docs:
        assert Image.open(d["image"]).size == (d["width"], d["height"])
        home = tmp_path / "images" if fmt in EMBEDDED else tmp_path / f"{name}-{fmt}"
        assert Path(d["image"]).is_relative_to(home)


@pytest.mark.parametrize("name", [n for n in FIXTURE_FORMATS if n != "hrbench8k"])
def test_parquet_and_original_release_give_the_same_documents(tmp_path, name):
    first, second = (
        [
            {k: v for k, v in d.items() if k != "image"}
            for d in _read(name, write_fixture(name, fmt, tmp_path), tmp_path / fmt)[0]
        ]
        for fmt in FIXTURE_FORMATS[name]
    )
    assert first == second and len(first) == 6


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_field_values_follow_the_release(tmp_path, name, fmt):
    """Hand-checked values of the fixtures' records (independent of expected_documents)."""
    docs, _ = _read(name, write_fixture(name, fmt, tmp_path), tmp_path / "images")
    d0, d1 = docs[0], docs[1]
    if name == "textvqa":
        assert (d1["sample_id"], d1["question_id"], d1["question"]) == ("34605", "34605", "what does the NYC sign say?")
        assert len(d1["answers"]) == 10 and d1["answers"][:7] == ["stop"] * 7 and d1["answer"] is None
    elif name == "docvqa":  # questionId is a string in lmms-lab's Parquet, an integer in val_v1.0.json
        assert d0["question_id"] == "49153" and d1["answers"] == ["itc limited", "ITC Limited"]
    elif name == "infovqa":
        assert d0["question_id"] == "65718" and d1["answers"] == ["62%", "62"]
    elif name == "chartqa":
        assert [d["sample_id"] for d in docs] == [f"human_test-{k}" for k in range(3)] + [
            f"augmented_test-{k}" for k in range(3)
        ]
        assert (d0["answer"], d0["category"], d0["answers"]) == ("23", "human_test", None)
    elif name == "ocrbench":  # OCRBench.json gives a lone answer as a string: the document has a list
        assert (d0["answers"], d0["category"], d0["subset"]) == (["Ready"], "Regular Text Recognition", "IIIT5K")
        assert [d["sample_id"] for d in docs] == [str(i) for i in range(6)]
    elif name == "pope":  # question ids repeat across the categories; the sample ids do not
        assert [d["sample_id"] for d in docs] == [
            f"{c}-{q}" for c in ("adversarial", "popular", "random") for q in (1, 2)
        ]
        assert [d["question_id"] for d in docs] == ["1", "2"] * 3
        assert {d["answer"] for d in docs} == {"yes", "no"}
        assert len({d["image"] for d in docs}) == 2  # two COCO images, six questions
    elif name == "vstar":  # the options live in the text; the question keeps what precedes "(A)"
        assert d0["question"] == "What is the material of the glove?"
        assert (d0["options"], d0["answer"], d0["category"]) == (
            ["rubber", "cotton", "kevlar", "leather"],
            "A",
            "direct_attributes",
        )
        assert (d1["options"], d1["answer"], d1["category"]) == (["left", "right"], "B", "relative_position")
    else:
        assert d0["question"] == 'What is written on the "EXIT" sign?'  # quoted in the TSV
        assert (d0["options"], d0["answer"], d0["category"], d0["subset"]) == (
            ["EXIT", "ENTER", "STOP", "OPEN"],
            "A",
            "single",
            "single_0",
        )


def test_embedded_images_are_written_once_content_addressed(tmp_path):
    path = write_fixture("pope", "lmms_lab_parquet", tmp_path)
    image_dir = tmp_path / "images"
    docs, _ = _read("pope", path, image_dir)
    names = sorted(_files(image_dir))
    assert len(names) == 2 and all(n.endswith(".jpg") and len(n) == 24 for n in names)  # <sha256[:20]>.jpg
    assert {Path(d["image"]).name for d in docs} == set(names)
    before = _files(image_dir)
    again, _ = _read("pope", path, image_dir)
    assert _files(image_dir) == before  # nothing rewritten, no temporary file left
    assert again == docs
    # the same bytes from another benchmark land on the same file
    _read("hrbench4k", write_fixture("hrbench4k", "tsv", tmp_path), image_dir)
    assert set(before) <= set(_files(image_dir))


def test_png_images_keep_their_format(tmp_path):
    docs, _ = _read("docvqa", write_fixture("docvqa", "lmms_lab_parquet", tmp_path), tmp_path / "images")
    assert all(d["image"].endswith(".png") for d in docs)


# ------------------------------------------------------------------------------------------------ bad records


def _edit(path: Path, fmt: str, index: int, edit) -> str:
    """Apply ``edit`` (record -> record) to record ``index`` of the fixture at ``path``; that record's place."""
    if fmt in ("lmms_lab_parquet", "parquet"):
        # the fixtures' only second split is TextVQA's train, which the reader leaves aside
        shards = (
            [s for s in sorted(path.glob("*.parquet")) if not s.name.startswith("train")] if path.is_dir() else [path]
        )
        for shard in shards:
            table = pq.read_table(shard)
            if index < table.num_rows:
                rows = table.to_pylist()
                rows[index] = edit(rows[index])
                pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
                return (f"{shard.name} " if path.is_dir() else "") + f"row {index}"
            index -= table.num_rows
        raise IndexError(index)
    if fmt == "tsv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        rows[index] = edit(rows[index])
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return f"row {index}"
    if fmt == "original_jsonl":
        file = path / "coco_pope_adversarial.json" if path.is_dir() else path
        lines = file.read_text().splitlines()
        lines[index] = json.dumps(edit(json.loads(lines[index])))
        file.write_text("\n".join(lines) + "\n")
        return f"line {index + 1}"
    file = path / "test_human.json" if path.is_dir() else path
    data = json.loads(file.read_text())
    items = data["data"] if isinstance(data, dict) else data
    items[index] = edit(items[index])
    file.write_text(json.dumps(data))
    return f"item {index}"


def _set(**fields):
    return lambda r: {**r, **fields}


# (benchmark, format, the edit of record 1, the skipped sample_id, the reason after its place)
BAD_RECORDS = [
    ("textvqa", "lmms_lab_parquet", _set(question=None), "34605", "'question' is null"),
    ("textvqa", "original_json", _set(answers="stop"), "34605", "'answers' must be an array of strings, got string"),
    (
        "docvqa",
        "lmms_lab_parquet",
        _set(image={"bytes": b"not an image", "path": None}),
        "49160",
        "unreadable image: UnidentifiedImageError: cannot identify image file",
    ),
    ("docvqa", "original_json", _set(answers=["ok", 3]), "49160", "'answers' item 1 must be a string, got integer"),
    (
        "infovqa",
        "lmms_lab_parquet",
        _set(image={"bytes": None, "path": "10003.jpeg"}),
        "65725",
        "'image' holds no image bytes (it names '10003.jpeg')",
    ),
    ("infovqa", "original_json", _set(image_local_name=7), "65725", "'image_local_name' must be a string, got integer"),
    (
        "chartqa",
        "lmms_lab_parquet",
        _set(type="train"),
        "",
        "'type' must be one of ['human_test', 'augmented_test'], got 'train'",
    ),
    ("chartqa", "original_json", _set(label=5), "human_test-1", "'label' must be a string, got integer"),
    ("ocrbench", "lmms_lab_parquet", _set(answer=[]), "1", "'answer' is empty"),
    ("ocrbench", "original_json", _set(type="Nope"), "1", "'type' 'Nope' is not one of OCRBench's question types"),
    ("pope", "lmms_lab_parquet", _set(question_id=None), "", "'question_id' is null"),
    ("pope", "original_jsonl", _set(label="maybe"), "adversarial-2", "'label' must be yes or no, got 'maybe'"),
    ("vstar", "lmms_lab_parquet", _set(label="C"), "1", "'label' 'C' is not an option letter (A, B)"),
    ("vstar", "original_jsonl", _set(text="Where is it?"), "1", "'text' lists no options ('(A) ...')"),
    ("hrbench4k", "parquet", _set(C=None), "1", "'C' is empty but a later option is not"),
    ("hrbench8k", "tsv", _set(image="abc"), "1", "'image' is not base64: Error: Incorrect padding"),
]


@pytest.mark.parametrize(
    ("name", "fmt", "edit", "sample_id", "reason"), BAD_RECORDS, ids=[f"{c[0]}-{c[1]}" for c in BAD_RECORDS]
)
def test_a_bad_record_is_a_skip_naming_its_place_and_field(tmp_path, name, fmt, edit, sample_id, reason):
    path = write_fixture(name, fmt, tmp_path)
    where = _edit(path, fmt, 1, edit)
    docs, skips = _read(name, path, tmp_path / "images")
    assert skips == [(sample_id, f"{where}: {reason}")]
    assert len(docs) == 5


@pytest.mark.parametrize(("name", "fmt"), [c for c in CASES if c[1] not in EMBEDDED])
def test_a_missing_image_file_is_a_skip(tmp_path, name, fmt):
    path = write_fixture(name, fmt, tmp_path)
    docs, _ = _read(name, path, tmp_path / "images")
    Path(docs[1]["image"]).unlink()
    _, skips = _read(name, path, tmp_path / "images")
    # every question on that image (POPE asks several) is a skip of its own
    gone = [d["sample_id"] for d in docs if d["image"] == docs[1]["image"]]
    assert [(s, r.split(": ", 1)[1]) for s, r in skips] == [(g, "image not found") for g in gone]
    assert len(gone) == (3 if name == "pope" else 1)


def test_duplicate_ids_and_images_outside_the_root(tmp_path):
    path = write_fixture("docvqa", "original_json", tmp_path)
    _edit(path, "original_json", 2, _set(questionId=49153))
    _edit(path, "original_json", 3, _set(image="../outside.png"))
    docs, skips = _read("docvqa", path, tmp_path / "images")
    root = str(path.parent)
    assert skips == [
        ("49153", "item 2: duplicate sample_id (first at item 0)"),
        (
            "49174",
            f"item 3: 'image' '../outside.png' lies outside the image root {root!r} (allow_outside_root is false)",
        ),
    ]
    shutil.copy(docs[0]["image"], tmp_path / "docvqa-original_json" / ".." / "outside.png")
    docs, skips = _read("docvqa", path, tmp_path / "images", allow_outside_root=True)
    assert len(docs) == 5 and [s for s, _ in skips] == ["49153"]


def test_image_root_and_first_n(tmp_path):
    path = write_fixture("pope", "original_jsonl", tmp_path)
    coco = tmp_path / "coco" / "val2014"
    coco.mkdir(parents=True)
    for jpg in path.glob("*.jpg"):
        jpg.rename(coco / jpg.name)
    docs, skips = _read("pope", path, tmp_path / "images", image_root=coco, n=4)
    assert skips == [] and [d["sample_id"] for d in docs] == [
        "adversarial-1",
        "adversarial-2",
        "popular-1",
        "popular-2",
    ]
    assert all(Path(d["image"]).parent == coco for d in docs)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("textvqa", lambda root: root / "absent.json", "{path}: no such file"),
        (
            "docvqa",
            lambda root: write_fixture("textvqa", "lmms_lab_parquet", root) / "validation-00000-of-00002.parquet",
            "{path}: no column(s) ['questionId']; its columns: ",
        ),
        (
            "textvqa",
            lambda root: _text(root / "val.json", "[]"),
            "{path}: expected a JSON object with a 'data' array, got a JSON array",
        ),
        (
            "chartqa",
            lambda root: _text(root / "test_human.json", "{}"),
            "{path}: expected a JSON array of questions, got a JSON object",
        ),
        (
            "pope",
            lambda root: _text(root / "coco_pope_all.json", "{}\n"),
            "{path}: the file name names no POPE category",
        ),
        ("vstar", lambda root: _text(root / "q.jsonl", ""), "{path}: no records (empty file)"),
        ("docvqa", lambda root: _text(root / "d.tsv", "a\tb\n"), "{path}: docvqa is not read from a TSV file"),
        ("hrbench4k", lambda root: _text(root / "h.json", "[]"), "{path}: hrbench4k is not read from a .json file"),
        (
            "chartqa",
            lambda root: _mkdir(root / "empty"),
            "{path}: no Parquet shards (*.parquet) and no test_human.json",
        ),
        ("textvqa", lambda root: _two_splits(root), "{path}: Parquet shards of splits ['test', 'train']; none is"),
    ],
)
def test_an_unusable_input_raises_naming_the_file(tmp_path, name, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        read_benchmark(name, path, tmp_path / "images")
    assert str(err.value).startswith(message.format(path=path))


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _two_splits(root: Path) -> Path:
    data = write_fixture("textvqa", "lmms_lab_parquet", root)
    for shard in data.glob("validation-*"):
        shard.rename(shard.with_name(shard.name.replace("validation", "test")))
    return data


# ------------------------------------------------------------------------------------------------------ prepare


def test_prepare_writes_a_manifest_from_a_benchmark_release(tmp_path):
    path = write_fixture("vstar", "lmms_lab_parquet", tmp_path)
    _edit(path, "lmms_lab_parquet", 5, _set(label="Z"))
    section = {"format": "vstar", "input": str(path), "image_root": None, "sources": None, "n": None}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare_eval": {**section, "seed": 42, "allow_outside_root": False}}))
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        main,
        [
            "prepare",
            str(out / "manifest.parquet"),
            str(out / "skips.parquet"),
            "--params",
            str(params),
            "--section",
            "prepare_eval",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = read_parquet(out / "manifest.parquet", "manifest").to_pylist()  # checks the manifest v1 contract
    skips = read_parquet(out / "skips.parquet", "manifest_skips").to_pylist()
    expected = expected_documents("vstar")[:5]
    assert [r["sample_id"] for r in rows] == [d["sample_id"] for d in expected]
    assert [(r["question"], r["answer"], r["answers"]) for r in rows] == [
        (d["question"], d["answer"], None) for d in expected
    ]
    assert {r["source"] for r in rows} == {"vstar"}
    assert all(r[k] is None for r in rows for k in ("box_x0", "box_y0", "box_x1", "box_y1"))
    assert all(Path(r["image"]).parent == out / "images" and Path(r["image"]).exists() for r in rows)
    assert [(s["sample_id"], s["reason"]) for s in skips] == [
        ("5", "test-00000-of-00001.parquet row 5: 'label' 'Z' is not an option letter (A, B)")
    ]


def test_records_from_params_leaves_benchmarks_to_the_stage():
    with pytest.raises(ValueError, match="benchmark_records"):
        records_from_params(PrepareParams(format="pope", input="x"))


# ------------------------------------------------------------------------------------------------------ prompts

ANSWER_WORD_OR_PHRASE = "\nAnswer the question using a single word or phrase."
VSTAR_LINE = "Answer with the option's letter from the given choices directly."
# (benchmark, document fields, lmms-eval's text: the same for every family, as no task has an entry for them)
PROMPTS = [
    # textvqa/_default_template_textvqa_yaml default + utils.textvqa_doc_to_text: question.capitalize(), no OCR
    ("textvqa", {"question": "what does the NYC sign say?"}, "What does the nyc sign say?" + ANSWER_WORD_OR_PHRASE),
    # docvqa/_default_template_docvqa_yaml default + utils.docvqa_doc_to_text: the question as is
    (
        "docvqa",
        {"question": "What is the ‘actual’ value per 1000?"},
        "What is the ‘actual’ value per 1000?" + ANSWER_WORD_OR_PHRASE,
    ),
    # infovqa/_default_template_infovqa_yaml default + utils.infovqa_doc_to_text
    (
        "infovqa",
        {"question": "Which social platform has heavy female audience?"},
        "Which social platform has heavy female audience?" + ANSWER_WORD_OR_PHRASE,
    ),
    # chartqa/chartqa.yaml default ("with a single word") + utils.chartqa_doc_to_text
    (
        "chartqa",
        {"question": "What's the value of the lowest bar?"},
        "What's the value of the lowest bar?\nAnswer the question with a single word.",
    ),
    # ocrbench/utils.ocrbench_doc_to_text: the stripped question, nothing added
    ("ocrbench", {"question": "What is the title of the report? "}, "What is the title of the report?"),
    # pope/pope.yaml default + utils.pope_doc_to_text: the stripped question
    (
        "pope",
        {"question": " Is there a snowboard in the image? "},
        "Is there a snowboard in the image?" + ANSWER_WORD_OR_PHRASE,
    ),
    # vstar_bench/_default_template_yaml default + utils.vstar_doc_to_text on the released text: the last option
    # swallows the text's own instruction line, and the post_prompt repeats it
    (
        "vstar",
        {"question": "What is the material of the glove?", "options": ["rubber", "cotton", "kevlar", "leather"]},
        f"What is the material of the glove?\nA. rubber\nB. cotton\nC. kevlar\nD. leather\n{VSTAR_LINE}\n{VSTAR_LINE}",
    ),
    (
        "vstar",
        {"question": "Is the dog on the left or right side of the bench?", "options": ["left", "right"]},
        f"Is the dog on the left or right side of the bench?\nA. left\nB. right\n{VSTAR_LINE}\n{VSTAR_LINE}",
    ),
    # hrbench/utils.hrbench_doc_to_text: options "X. text" lines, then its own instruction (no kwargs)
    (
        "hrbench4k",
        {"question": 'What is written on the "EXIT" sign? ', "options": ["EXIT", "ENTER", "STOP", "OPEN"]},
        'What is written on the "EXIT" sign?\nA. EXIT\nB. ENTER\nC. STOP\nD. OPEN\nAnswer the option letter directly.',
    ),
    (
        "hrbench8k",
        {"question": "What animal is on the flag?", "options": ["eagle", "lion", "bear", "horse"]},
        "What animal is on the flag?\nA. eagle\nB. lion\nC. bear\nD. horse\nAnswer the option letter directly.",
    ),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("name", "doc", "text"), PROMPTS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PROMPTS)])
def test_prompts_are_lmms_evals_text(name, doc, text, family):
    assert build_prompt(name, doc, family) == text
    assert "<image>" not in text and "OCR" not in text


def test_prompts_of_read_documents(tmp_path):
    docs, _ = _read("vstar", write_fixture("vstar", "original_jsonl", tmp_path), tmp_path / "images")
    assert build_prompt("vstar", docs[1], "qwen2_5_vl") == PROMPTS[7][2]


def test_model_specific_entries_are_matched_by_exact_model_name():
    # qwen_vl (Qwen-VL) and plm entries exist, but lmms-eval runs these families as llava / qwen2_5_vl
    for family in FAMILIES:
        assert prompt_kwargs("textvqa", family) == ("", ANSWER_WORD_OR_PHRASE)
        assert prompt_kwargs("chartqa", family) == ("", "\nAnswer the question with a single word.")
        assert prompt_kwargs("ocrbench", family) == ("", "")


def test_generation_kwargs_follow_the_task_yamls():
    max_new = {n: generation_kwargs(n)["max_new_tokens"] for n in BENCHMARKS}
    assert max_new == {
        "docvqa": 128,
        "chartqa": 16,
        "ocrbench": 128,
        "infovqa": 32,
        "textvqa": None,
        "vstar": 16,
        "pope": 128,
        "hrbench4k": None,
        "hrbench8k": None,
    }
    assert generation_kwargs("textvqa") == {
        "max_new_tokens": None,
        "do_sample": False,
        "num_beams": 1,
        "until": ["ASSISTANT:"],
    }
    assert generation_kwargs("hrbench4k", "llava")["max_new_tokens"] == 1024
    assert generation_kwargs("pope", "qwen2_5_vl") == {
        "max_new_tokens": 128,
        "do_sample": False,
        "num_beams": 1,
        "until": ["\n\n"],
    }
    with pytest.raises(ValueError, match="unknown model family"):
        build_prompt("pope", {"question": "q"}, "llava_next")
