"""prepare: LLaVA mix parsing, plain records, and bad images reported by sample id."""

from __future__ import annotations

import json

import polars as pl
import yaml
from click.testing import CliRunner

from pipeline.io.contracts import read_metadata, read_parquet
from pipeline.io.manifest import build_manifest, records_from_llava_mix, records_from_table
from stages.cli import main
from tests.conftest import random_images


def _mix(tmp_path):
    (tmp_path / "gqa/images").mkdir(parents=True)
    (tmp_path / "ocr_vqa/images").mkdir(parents=True)
    (tmp_path / "coco").mkdir()
    entries = []
    for i, img in enumerate(random_images(9)):
        src = ["gqa", "ocr_vqa", "coco"][i % 3]
        rel = f"{src}/images/{i}.jpg" if src != "coco" else f"coco/{i}.jpg"
        img.save(tmp_path / rel)
        entries.append(
            {
                "id": f"id{i}",
                "image": rel,
                "conversations": [
                    {
                        "from": "human",
                        "value": f"<image>\nQuestion {i}?\nAnswer the question using a single word or phrase.",
                    },
                    {"from": "gpt", "value": f"ans{i}"},
                    {"from": "human", "value": "second turn?"},
                    {"from": "gpt", "value": "no"},
                ],
            }
        )
    entries.append({"id": "text-only", "conversations": [{"from": "human", "value": "hi"}]})
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_mix_first_turn_filter_shuffle(tmp_path):
    path = _mix(tmp_path)
    recs = records_from_llava_mix(path, str(tmp_path), ["gqa", "ocr_vqa"], n=None, seed=42)
    assert sorted(r.sample_id for r in recs) == ["id0", "id1", "id3", "id4", "id6", "id7"]
    r = next(r for r in recs if r.sample_id == "id3")
    assert r.question == "Question 3?\nAnswer the question using a single word or phrase."
    assert r.answer == "ans3" and r.source == "gqa" and r.image == f"{tmp_path}/gqa/images/3.jpg"
    again = records_from_llava_mix(path, str(tmp_path), ["gqa", "ocr_vqa"], n=None, seed=42)
    assert [x.sample_id for x in again] == [x.sample_id for x in recs]  # seeded shuffle is stable
    first4 = records_from_llava_mix(path, str(tmp_path), ["gqa", "ocr_vqa"], n=4, seed=42)
    assert [x.sample_id for x in first4] == [x.sample_id for x in recs[:4]]


def test_missing_and_unreadable_images_are_reported(records_jsonl):
    (records_jsonl.parent / "img/2.png").unlink()
    (records_jsonl.parent / "img/4.png").write_bytes(b"not an image")
    manifest, skips = build_manifest(records_from_table(records_jsonl))
    assert manifest.column("sample_id").to_pylist() == ["s0", "s1", "s3", "s5"]
    reasons = dict(zip(skips.column("sample_id").to_pylist(), skips.column("reason").to_pylist(), strict=True))
    assert reasons["s2"] == "line 3: image not found"
    assert reasons["s4"] == "line 5: unreadable image: UnidentifiedImageError: cannot identify image file"


def test_prepare_stage_writes_contracted_artifacts(records_jsonl, tmp_path):
    params = tmp_path / "params.yaml"
    section = {"format": "records", "input": str(records_jsonl), "image_root": None, "sources": None, "n": None}
    params.write_text(yaml.safe_dump({"prepare": {**section, "seed": 42, "allow_outside_root": False}}))
    out, skips = tmp_path / "m.parquet", tmp_path / "s.parquet"
    res = CliRunner().invoke(main, ["prepare", str(out), str(skips), "--params", str(params)])
    assert res.exit_code == 0, res.output
    table = read_parquet(out, "manifest")
    assert table.num_rows == 6
    meta = read_metadata(out)
    assert meta["schema"] == "manifest" and meta["params"]["input"] == str(records_jsonl)
    assert str(records_jsonl) in meta["inputs"]
    df = pl.read_parquet(out)
    assert df["width"].to_list()[:3] == [64, 90, 40] and df["box_x1"][0] == 10.0
