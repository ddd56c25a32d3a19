"""Shared fixtures: tiny LLaVA models built from configs in-process, and small image sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models import wrap_model
from toymodels.llava import ToyLlavaSizes, build_toy_llava, save_toy_llava

WORDS = [
    "what",
    "is",
    "in",
    "the",
    "red",
    "blue",
    "green",
    "box",
    "colour",
    "shape",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy():
    """(model, processor) of a tiny random LLaVA with grouped-query attention (4 heads, 2 kv heads)."""
    return build_toy_llava(WORDS, ToyLlavaSizes(text_kv_heads=2), seed=0)


@pytest.fixture(scope="session")
def adapter(toy):
    model, processor = toy
    model.set_attn_implementation("sdpa")
    return wrap_model(model, processor, "toy")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory, toy) -> Path:
    """The tiny model saved as an ordinary transformers model directory."""
    return save_toy_llava(*toy, tmp_path_factory.mktemp("model") / "toy-llava")


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Noise images of assorted aspect ratios."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (50, 90), (80, 40), (33, 47), (96, 96)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def records_jsonl(tmp_path) -> Path:
    """A plain-records JSONL of 6 samples with images on disk, relative paths."""
    rows = []
    (tmp_path / "img").mkdir()
    qs = ["what is in the red box ?", "what colour is the shape ?", "what is in the blue box ?"]
    for i, img in enumerate(random_images(6)):
        img.save(tmp_path / "img" / f"{i}.png")
        rows.append(
            {
                "sample_id": f"s{i}",
                "image": f"img/{i}.png",
                "question": qs[i % 3],
                "answer": "a",
                "box": [1, 2, 10, 12],
                "source": "unit",
            }
        )
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
