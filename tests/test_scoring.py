"""Scoring rules against hand-worked examples."""

from __future__ import annotations

import pytest

from pipeline.inference.scoring import exact_match, multiple_choice, normalize, score, vqa_soft


def test_normalize_and_exact():
    assert normalize("  The Red, box! ") == "red box"
    assert exact_match("a Cat.", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("x", None) == 0.0


def test_vqa_soft_leave_one_out():
    # 2 of 10 annotators said "cat": each subset of 9 holds 1 or 2 matches -> 8 subsets 2/3, 2 subsets 1/3
    answers = ["cat", "cat"] + ["dog"] * 8
    assert vqa_soft("cat", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_soft("dog", answers) == 1.0
    assert vqa_soft("bird", answers) == 0.0


def test_multiple_choice_letters():
    assert multiple_choice("(B) a cat", "B") == 1.0
    assert multiple_choice("b.", "(B)") == 1.0
    assert multiple_choice("A", "B") == 0.0


def test_auto_picks_soft_when_answers_given():
    assert score("dog", "cat", ["dog"] * 10, "auto") == 1.0
    assert score("dog", "cat", None, "auto") == 0.0
    # one reference answer is no annotator set: leave-one-out would score every answer 0
    with pytest.raises(ValueError, match="needs the annotators' answers"):
        score("cat", "cat", None, "vqa_soft")
    with pytest.raises(ValueError, match="unknown scoring"):
        score("a", "a", None, "bleu")
