"""The benchmark scorers' per-document records and edge cases, pinned by hand to lmms-eval's rules.

Mutation testing left these open: the record keys each benchmark emits (lmms-eval's ``process_results`` keys,
which the benchmarks table and its per-sample Parquet carry), POPE with no positive prediction (lmms-eval divides
only when the count is non-zero), ANLS / OCRBench documents with a single ``answer``, ChartQA percentages, V*
documents without a category, HR-Bench's missing options, and the errors on empty input.
"""

from __future__ import annotations

import math

import pytest

from pipeline.benchmarks.scorers import SCORERS, anls, hrbench_options, levenshtein, ocrbench_match

TEXT_RECOGNITION = "Regular Text Recognition"


def test_textvqa_record():
    doc = {"answers": ["two"] * 10}
    assert SCORERS["textvqa"].process(doc, "2") == {"score": 1.0, "exact_match": 1.0, "answer": "2"}
    assert SCORERS["textvqa"].process({"answers": None}, "Two.") == {"score": 0.0, "exact_match": 0.0, "answer": "2"}


def test_anls_with_a_single_answer_and_none():
    assert SCORERS["docvqa"].process({"answer": "Total"}, " total ") == {"score": 1.0, "anls": 1.0}
    assert SCORERS["infovqa"].process({"answers": ["abcd"], "answer": "zzzz"}, "abcd")["anls"] == 1.0
    with pytest.raises(ValueError, match="document 'd7' has neither answers nor answer"):
        SCORERS["docvqa"].process({"sample_id": "d7"}, "x")
    with pytest.raises(ValueError, match="at least one reference"):
        anls("x", [])


def test_anls_values():
    # distance between squeezed lower-case strings over the raw lengths; below 0.5 -> 0
    assert anls("Hello  World", ["hello world"]) == 1.0
    assert anls("abcd  ", ["abcf"]) == pytest.approx(1 - 1 / 6)  # distance 1 over the raw length 6
    assert anls("abcd", ["abcf"]) == pytest.approx(0.75)
    assert anls("abcd", ["wxyz"]) == 0.0
    assert anls("", [""]) == 1.0  # zero length counts as distance 0
    assert anls("ab", ["xb", "ab"]) == 1.0  # the best reference


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 == levenshtein("abc", "")
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("abc", "abc") == 0


def test_chartqa_records_and_percentages():
    human = SCORERS["chartqa"].process({"category": "human_test", "answer": "0.5"}, "50%")
    assert human == {"score": 1.0, "relaxed_overall": 1.0, "relaxed_human_split": 1.0, "type": "human_test"}
    aug = SCORERS["chartqa"].process({"category": "augmented_test", "answer": "12%"}, "0.13")
    assert aug == {"score": 0.0, "relaxed_overall": 0.0, "relaxed_augmented_split": 0.0, "type": "augmented_test"}
    assert SCORERS["chartqa"].process({"category": "human_test", "answer": "12%"}, "0.1205")["score"] == 1.0
    agg = SCORERS["chartqa"].aggregate([human, aug])
    assert agg == {"score": 50.0, "relaxed_overall": 0.5, "relaxed_human_split": 1.0, "relaxed_augmented_split": 0.0}
    with pytest.raises(ValueError, match="no records to aggregate"):
        SCORERS["chartqa"].aggregate([])


def test_ocrbench_record_and_single_answer():
    doc = {"category": TEXT_RECOGNITION, "answer": "Cafe", "subset": "IIIT5K"}
    assert SCORERS["ocrbench"].process(doc, "the word is CAFE") == {
        "score": 1.0,
        "question_type": TEXT_RECOGNITION,
        "dataset": "IIIT5K",
    }
    with pytest.raises(ValueError, match="document 'o1' has neither answers nor answer"):
        SCORERS["ocrbench"].process({"category": TEXT_RECOGNITION, "answer": None, "sample_id": "o1"}, "x")
    # formulas: spaces and newlines dropped, the answer's case kept
    assert ocrbench_match("x ^ 2\n+ 1", ["x^2+1"], "HME100k")
    assert not ocrbench_match("x^2+1", ["X^2+1"], "HME100k")
    assert ocrbench_match("A\nB", "a b", None)


def test_pope_without_positive_predictions():
    """No "yes" predicted: precision, recall and F1 are 0 (no division by zero), accuracy still counts."""
    records = [SCORERS["pope"].process({"answer": gt}, p) for gt, p in [("yes", "no"), ("no", "no"), ("no", "no")]]
    got = SCORERS["pope"].aggregate(records)
    assert got["pope_precision"] == 0.0 and got["pope_recall"] == 0.0 and got["pope_f1_score"] == 0.0
    assert got["pope_accuracy"] == pytest.approx(2 / 3) and got["score"] == 0.0
    none_yes = [SCORERS["pope"].process({"answer": "no"}, "no")] * 2  # no positive in truth nor prediction
    got = SCORERS["pope"].aggregate(none_yes)
    assert (got["pope_precision"], got["pope_recall"], got["pope_f1_score"]) == (0.0, 0.0, 0.0)
    assert got["pope_yes_ratio"] == 0.0 and got["pope_accuracy"] == 1.0
    with pytest.raises(ValueError, match="no records to aggregate"):
        SCORERS["pope"].aggregate([])


def test_vstar_without_category():
    rec = SCORERS["vstar"].process({"answer": "b"}, "B. the red one")
    assert rec == {"score": 1.0, "category": "unknown", "prediction": "B", "ground_truth": "B"}
    agg = SCORERS["vstar"].aggregate([rec, SCORERS["vstar"].process({"answer": "A", "category": "direct"}, "C")])
    assert agg == {"score": 50.0, "vstar_overall_acc": 50.0, "vstar_direct_acc": 0.0, "vstar_unknown_acc": 100.0}


def test_hrbench_options_skip_missing():
    assert hrbench_options(["cat", None, math.nan, 3]) == {"A": "cat", "D": "3"}
    assert hrbench_options(None) == {}
