"""A repeated sample_id keeps its first record and turns every later one into a skip row naming the duplicate,
its place and the first one's place (issue 20, mutant 6)."""

from __future__ import annotations

import json

import pytest

from pipeline.io.manifest import Record, build_manifest, records_from_table
from tests.conftest import random_images


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    for i, img in enumerate(random_images(4, seed=2)):
        img.save(root / f"{i}.png")
    return root


def _jsonl(root, rows) -> list[Record]:
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return records_from_table(path)


def test_a_duplicate_is_one_manifest_row_and_one_skip_row(root):
    rows = [
        {"sample_id": "a", "image": "0.png", "question": "first a ?", "answer": "x"},
        {"sample_id": "b", "image": "1.png", "question": "b ?"},
        {"sample_id": "a", "image": "2.png", "question": "second a ?", "answer": "y"},
    ]
    manifest, skips = build_manifest(_jsonl(root, rows), workers=1)
    assert manifest.column("sample_id").to_pylist() == ["a", "b"]
    first = manifest.to_pylist()[0]
    assert (first["image"], first["question"], first["answer"]) == (f"{root}/0.png", "first a ?", "x")
    assert skips.to_pylist() == [
        {"sample_id": "a", "image": f"{root}/2.png", "reason": "line 3: duplicate sample_id (first at line 1)"}
    ]


def test_every_later_copy_is_a_skip_naming_the_first(root):
    rows = [{"sample_id": 7, "image": f"{i}.png", "question": f"q{i} ?"} for i in range(3)]  # integer ids
    rows.insert(1, {"sample_id": "8", "image": "3.png", "question": "other ?"})
    manifest, skips = build_manifest(_jsonl(root, rows), workers=1)
    assert manifest.column("sample_id").to_pylist() == ["7", "8"]
    assert manifest.column("image").to_pylist() == [f"{root}/0.png", f"{root}/3.png"]
    assert skips.column("sample_id").to_pylist() == ["7", "7"]
    assert skips.column("image").to_pylist() == [f"{root}/1.png", f"{root}/2.png"]
    assert skips.column("reason").to_pylist() == [
        "line 3: duplicate sample_id (first at line 1)",
        "line 4: duplicate sample_id (first at line 1)",
    ]


def test_records_without_a_place_name_no_place(root):
    recs = [Record("a", str(root / f"{i}.png"), "q ?", "unit") for i in range(2)]
    manifest, skips = build_manifest(recs, workers=1)
    assert manifest.num_rows == 1 and manifest.column("image").to_pylist() == [str(root / "0.png")]
    assert skips.to_pylist() == [{"sample_id": "a", "image": str(root / "1.png"), "reason": "duplicate sample_id"}]
