"""evaluate scores TextVQA-style samples by soft accuracy over the 10 annotators' answers, end to end
(issue 20, mutant 4): k of 10 annotators giving the model's answer scores lmms-eval's leave-one-out mean of
min(1, matches / 3), i.e. 0, 0.3, 0.6, 0.9 and then 1 for k = 0 .. 4; an exact match against the single
``answer`` (which here always equals the model's answer) would score 1 everywhere."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.benchmarks.scorers import normalize_vqa_answer
from pipeline.inference.evaluate import evaluate_manifest
from pipeline.inference.params import EvalParams
from pipeline.io.manifest import MANIFEST_COLUMNS
from pipeline.student.rpn import RPN
from pipeline.teacher.decode import decode_batch
from tests.conftest import random_images

QUESTIONS = ["what is in the red box ?", "what colour is the shape ?", "what is in the blue box ?", "a b"] * 2
K = [0, 1, 2, 3, 4, 10, 3, 1]  # annotators (of 10) who gave the model's answer, per sample
SOFT = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}  # by hand: (10 - k)/10 * min(1, k/3) + k/10 * min(1, (k-1)/3)
NEW_TOKENS = 3
OTHER = "zebra"  # a word the toy vocabulary cannot produce


@pytest.fixture(scope="module")
def manifest(adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("soft")
    images = random_images(len(QUESTIONS), seed=11)
    answers = [r["response"] for r in decode_batch(adapter, images, QUESTIONS, NEW_TOKENS)]
    assert OTHER not in {normalize_vqa_answer(a) for a in answers}, answers  # the annotators' other answer is wrong
    rows = []
    for i, (im, q, a, k) in enumerate(zip(images, QUESTIONS, answers, K, strict=True)):
        im.save(root / f"{i}.png")
        rows.append(
            {
                "sample_id": f"t{i}",
                "image": str(root / f"{i}.png"),
                "question": q,
                "answer": a,
                "answers": [a] * k + [OTHER] * (10 - k),
                "width": im.size[0],
                "height": im.size[1],
                "source": "unit",
            }
        )
    return pa.Table.from_pylist(rows, schema=MANIFEST_COLUMNS), answers


def test_soft_accuracy_end_to_end(adapter, manifest):
    table, answers = manifest
    # tau 1: no region anywhere, so every method answers with the baseline's (known) answer
    params = EvalParams(batch_size=4, max_new_tokens=NEW_TOKENS, raw_attention=False, roi={"tau": 1.0})
    rpn = RPN.from_base(adapter, B=1, R=1).eval()
    preds, metrics = evaluate_manifest(adapter, table, {"sdrpn": rpn}, params, progress=False)
    want = [SOFT[k] for k in K]
    assert sorted(metrics) == ["baseline", "sdrpn_box", "sdrpn_masked"]
    for method in metrics:
        rows = [r for r in preds.to_pylist() if r["method"] == method]
        assert [r["response"] for r in rows] == answers
        assert [r["score"] for r in rows] == pytest.approx(want, abs=1e-12), method
        assert metrics[method]["accuracy"] == pytest.approx(sum(want) / len(want), abs=1e-12)


def test_without_annotators_auto_is_exact_match(adapter, manifest):
    """The same samples without ``answers``: auto scoring is the exact match against ``answer`` (all 1 here)."""
    table, answers = manifest
    plain = table.set_column(
        table.schema.get_field_index("answers"), "answers", pa.nulls(table.num_rows, pa.list_(pa.string()))
    )
    params = EvalParams(
        batch_size=8, max_new_tokens=NEW_TOKENS, raw_attention=False, modes=["masked"], roi={"tau": 1.0}
    )
    preds, metrics = evaluate_manifest(adapter, plain, {}, params, progress=False)
    assert preds.column("score").to_pylist() == [1.0] * len(answers)
    assert metrics["baseline"]["accuracy"] == 1.0


def test_vqa_soft_without_annotators_names_the_sample(adapter, manifest):
    """Forced ``vqa_soft`` on a sample with no ``answers`` fails naming the sample (one answer would score 0)."""
    table, _ = manifest
    answers = table.column("answers").to_pylist()
    answers[2] = None
    broken = table.set_column(
        table.schema.get_field_index("answers"), "answers", pa.array(answers, pa.list_(pa.string()))
    )
    params = EvalParams(
        batch_size=8,
        max_new_tokens=NEW_TOKENS,
        raw_attention=False,
        modes=["masked"],
        roi={"tau": 1.0},
        scoring="vqa_soft",
    )
    with pytest.raises(ValueError, match=r"sample 't2'.*needs the annotators' answers \(field `answers`\)"):
        evaluate_manifest(adapter, broken, {}, params, progress=False)
