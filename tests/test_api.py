"""The one-image Python API loads a model directory and an RPN checkpoint, and agrees with the batch path."""

from __future__ import annotations

import numpy as np

from pipeline.api import SDRPN
from pipeline.inference.roi import RoIParams
from pipeline.student.rpn import RPN
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
    assert one.crop_boxes  # tau 0 keeps every token: one crop over the whole image
    assert np.array_equal(one.mask, batch[0].mask)
