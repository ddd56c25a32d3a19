"""Reading the two input formats at their edges, pinned where mutation testing found gaps: a LLaVA mix without an
image_root, text-only entries with an empty image, a gpt turn of the wrong type, the annotators' answers of plain
records, and an input path that cannot be read."""

from __future__ import annotations

import json

import pytest

from pipeline.io.manifest import InputError, records_from_llava_mix, records_from_table


def _mix(tmp_path, entries):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(entries))
    return path


def _conv(q, a):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


def test_llava_mix_without_image_root(tmp_path):
    path = _mix(
        tmp_path,
        [
            {"id": "a", "image": "gqa/images/1.jpg", "conversations": _conv("what is it?", "a cat")},
            {"id": "t", "image": "", "conversations": _conv("text only", "ok")},  # no image: not a sample
            {"id": "u", "conversations": _conv("text only too", "ok")},
            {"id": "b", "image": "ocr_vqa/images/2.jpg", "conversations": _conv("title?", "Dune")},
        ],
    )
    records = sorted(records_from_llava_mix(path, None, None, None), key=lambda r: r.sample_id)
    assert [(r.sample_id, r.image, r.skip) for r in records] == [
        ("a", "gqa/images/1.jpg", None),
        ("b", "ocr_vqa/images/2.jpg", None),
    ]
    assert [(r.question, r.answer, r.source) for r in records] == [
        ("what is it?", "a cat", "gqa"),
        ("title?", "Dune", "ocr_vqa"),
    ]


def test_a_gpt_turn_of_the_wrong_type_is_named(tmp_path):
    conv = [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": 5}]
    path = _mix(tmp_path, [{"id": "a", "image": "gqa/1.jpg", "conversations": conv}])
    (rec,) = records_from_llava_mix(path, None, None, None)
    assert rec.where == "item 0"
    assert rec.skip == "'conversations' gpt turn 'value' must be a string, got integer"


def test_plain_records_keep_the_annotators_answers(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [
        {"sample_id": "a", "image": "1.png", "question": "q?", "answers": ["x", "y", "x"]},
        {"sample_id": "b", "image": "2.png", "question": "q?", "answer": "z"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = records_from_table(path)
    assert (a.answers, a.answer) == (["x", "y", "x"], None)
    assert (b.answers, b.answer) == (None, "z")


def test_an_unreadable_input_is_named(tmp_path):
    folder = tmp_path / "mix.json"
    folder.mkdir()  # a directory where a file should be
    with pytest.raises(InputError, match=rf"^{folder}: unreadable: .*[Ii]s a directory"):
        records_from_llava_mix(folder, None, None, None)
