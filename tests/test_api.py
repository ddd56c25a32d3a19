"""The one-image Python API loads a model directory and an RPN checkpoint, and agrees with the batch path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.api import SDRPN
from pipeline.inference.evaluate import evaluate_manifest, rpn_maps
from pipeline.inference.params import EvalParams
from pipeline.inference.roi import RoIParams
from pipeline.io.manifest import MANIFEST_COLUMNS
from pipeline.student.rpn import RPN
from pipeline.teacher.decode import decode_batch
from tests.conftest import random_images


def test_answer_from_directories(adapter, toy_dir, tmp_path):
    RPN.from_base(adapter, B=1, R=2).save(tmp_path / "rpn")
    sd = SDRPN.from_pretrained(toy_dir, tmp_path / "rpn", device="cpu", dtype="float32", roi=RoIParams(tau=0.0))
    images = random_images(3)
    path = tmp_path / "im.png"
    images[0].save(path)
    questions = ["what is in the red box ?", "a b", "what colour is the shape ?"]
    one = sd.answer(str(path), questions[0], max_new_tokens=3)
    batch = sd.answer_batch(images, questions, max_new_tokens=3)
    assert one.text == batch[0].text and one.crop_boxes == batch[0].crop_boxes
    assert one.prob_map.shape == (4, 4) and ((one.prob_map >= 0) & (one.prob_map <= 1)).all()
    assert np.array_equal(one.mask, batch[0].mask)
    # tau 0 keeps every token: one component over the whole 4x4 grid, so one crop over the whole image
    sizes = [im.size for im in images]
    assert [a.grid_boxes for a in batch] == [[[0, 0, 3, 3]]] * 3
    assert [a.crop_boxes for a in batch] == [[[0, 0, w, h]] for w, h in sizes]
    assert all(a.mask.all() for a in batch)

    # evaluate's own path (manifest on disk, the in-memory RPN, the same RoI settings) answers the same
    refs = []
    for i, im in enumerate(images):
        refs.append(str(tmp_path / f"{i}.png"))
        im.save(refs[-1])
    rows = [
        {"sample_id": f"s{i}", "image": ref, "question": q, "width": w, "height": h, "source": "unit"}
        for i, (ref, q, (w, h)) in enumerate(zip(refs, questions, sizes, strict=True))
    ]
    manifest = pa.Table.from_pylist(rows, schema=MANIFEST_COLUMNS)
    params = EvalParams(batch_size=3, max_new_tokens=3, modes=["masked"], roi={"tau": 0.0}, raw_attention=False)
    rpn = RPN.from_base(adapter, B=1, R=2).eval()
    preds, _ = evaluate_manifest(adapter, manifest, {"sdrpn": rpn}, params, progress=False)
    rows = [r for r in preds.to_pylist() if r["method"] == "sdrpn_masked"]
    assert [r["response"] for r in rows] == [a.text for a in batch]
    assert [r["crop_boxes"] for r in rows] == [a.crop_boxes for a in batch]
    assert all(r["found"] for r in rows)
    maps = rpn_maps(rpn)(images, questions).maps
    for a, m in zip(batch, maps, strict=True):
        np.testing.assert_allclose(a.prob_map, m, rtol=0, atol=1e-6)

    # tau 0.9, above every probability (the fresh RPN's are all near 0.5): no region, the original view's answer
    quiet = SDRPN.from_pretrained(toy_dir, tmp_path / "rpn", device="cpu", dtype="float32", roi=RoIParams(tau=0.9))
    plain = quiet.answer_batch(images, questions, max_new_tokens=3)
    base = decode_batch(adapter, images, questions, 3)
    assert [a.text for a in plain] == [r["response"] for r in base]
    assert [(a.crop_boxes, a.grid_boxes) for a in plain] == [([], [])] * 3
    assert not any(a.mask.any() for a in plain)
