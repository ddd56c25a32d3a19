"""The README's polars one-liners run against a real labels artifact and mean what they say."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.io.attention_store import AttentionStoreWriter
from pipeline.teacher.labels import LabelParams, label_store

README = Path(__file__).resolve().parent.parent / "README.md"


def _polars_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- polars-examples[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its polars examples block"
    return match.group(1)


def test_readme_polars_examples(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n, side = 6, 5
    attention = rng.random((n, 1, side * side)).astype(np.float32) * 0.01
    attention[0, 0, 7] = 1.0  # one strong token: fg box is 1x1
    attention[1] = 0.0  # all-zero map: no fg, not kept
    writer = AttentionStoreWriter.create(tmp_path / "a.zarr", n_samples=n, layers=[0], max_visual=side * side)
    writer.write(
        0,
        [f"s{i}" for i in range(n)],
        np.full((n, 2), side, dtype=np.int32),
        np.ones(n, dtype=np.int32),
        attention,
        np.ones((n, 1, side * side), dtype=np.float32),
    )
    writer.finalize()
    (tmp_path / "artifacts").mkdir()
    label_store(tmp_path / "a.zarr", LabelParams(), tmp_path / "artifacts/labels.parquet", progress=False)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_polars_block(), str(README), "exec"), scope)
    fg_share = dict(scope["fg_share"].iter_rows())
    assert fg_share["s0"] == 1 / 25
    assert scope["no_fg"]["sample_id"].to_list() == ["s1"]
    assert scope["skipped"]["len"].to_list() == [1]
    assert scope["box_sizes"].filter(scope["box_sizes"]["box_tokens"] == 1)["count"].item() >= 1
    assert scope["grid"].shape == (side, side) and scope["grid"][1, 2] == 1
