"""The committed embedded model loads offline through the ordinary path and reproduces its recorded accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.models import load_adapter
from pipeline.world.embedded_check import world_accuracy

MODEL = Path(__file__).resolve().parent.parent / "models" / "sdrpn-toy-llava"


def test_committed_weights_reproduce_recorded_accuracy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
    ref = json.loads((MODEL / "reference_accuracy.json").read_text())
    adapter = load_adapter(MODEL, device="cpu", dtype="float32")
    assert adapter.family == "llava" and adapter.grid_shape == (14, 14)
    got = world_accuracy(adapter, seed=ref["seed"], n=ref["n"])
    assert got == pytest.approx(ref["accuracy"], abs=1e-9)


def test_model_is_small_and_pickle_free():
    files = {p.name: p.stat().st_size for p in MODEL.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    assert sum(files.values()) <= 20 * 2**20
