"""Accuracy of a model on held-out world samples, with the base view alone and with the GT-region crop appended.

Used by the embedded model's card and by the test that the committed weights reproduce their recorded
accuracy (greedy decoding on CPU in float32 is deterministic).
"""

from __future__ import annotations

from pipeline.inference.two_stage import Crop, generate_with_crops
from pipeline.models.base import ModelAdapter
from pipeline.teacher.decode import decode_batch
from pipeline.world.generator import WorldParams, crop_box, generate_sample


def world_accuracy(
    adapter: ModelAdapter, seed: int, n: int, params: WorldParams | None = None, batch_size: int = 16
) -> dict[str, float]:
    """{"base": accuracy from the base view, "crop": accuracy with the GT frame's crop as a second view}."""
    params = params or WorldParams()
    hits = {"base": 0, "crop": 0}
    for start in range(0, n, batch_size):
        samples = [generate_sample(params, seed, i) for i in range(start, min(start + batch_size, n))]
        images, questions = [s.image for s in samples], [s.question for s in samples]
        base = decode_batch(adapter, images, questions, max_new_tokens=4)
        size = (params.canvas, params.canvas)
        crops = [[Crop(tuple(int(v) for v in crop_box(s.box, margin=0.25, rng=None, size=size)))] for s in samples]
        crop = generate_with_crops(adapter, images, questions, crops, max_new_tokens=4)
        for s, b, c in zip(samples, base, crop, strict=True):
            hits["base"] += b["response"] == s.answer
            hits["crop"] += c["response"] == s.answer
    return {k: v / n for k, v in hits.items()}
