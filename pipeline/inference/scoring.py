"""Answer scoring of the evaluate stage: exact match, TextVQA soft accuracy over 10 answers, multiple choice.

The soft accuracy is lmms-eval's TextVQA rule (:func:`pipeline.benchmarks.scorers.vqa_accuracy`, EvalAI answer
normalisation); the paper's benchmarks are scored by their own lmms-eval rules in :mod:`pipeline.benchmarks`.
"""

from __future__ import annotations

import re
import string

from pipeline.benchmarks.scorers import vqa_accuracy

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_OPTION = re.compile(r"^\(?([A-Za-z])[\).:]?(\s|$)")


def normalize(text: str | None) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (VQA-style answer normalisation)."""
    text = (text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, answer: str | None) -> float:
    """1.0 when the normalised prediction equals the normalised answer."""
    return float(answer is not None and normalize(pred) == normalize(answer))


def vqa_soft(pred: str, answers: list[str]) -> float:
    """TextVQA accuracy as lmms-eval scores it: min(1, matches / 3) over the 10 leave-one-annotator-out subsets,
    prediction and answers normalised by EvalAI's rules (number words, contractions, punctuation, articles)."""
    if not answers:
        raise ValueError("vqa_soft needs the annotators' answers")
    return vqa_accuracy(pred.strip(), answers)


def multiple_choice(pred: str, answer: str | None) -> float:
    """1.0 when the predicted option letter (e.g. "B", "(B) cat", "B.") equals the answer's letter."""
    if answer is None:
        return 0.0
    got, want = _OPTION.match(pred.strip()), _OPTION.match(answer.strip())
    if got and want:
        return float(got.group(1).upper() == want.group(1).upper())
    return exact_match(pred, answer)


def score(pred: str, answer: str | None, answers: list[str] | None, scoring: str) -> float:
    """Score one prediction; ``scoring`` is exact | vqa_soft | multiple_choice | auto (vqa_soft when 10 answers)."""
    if scoring == "auto":
        scoring = "vqa_soft" if answers else "exact"
    if scoring == "exact":
        return exact_match(pred, answer)
    if scoring == "vqa_soft":
        # one reference answer would score 0 under leave-one-annotator-out: refuse rather than report a wrong 0
        if not answers:
            raise ValueError("scoring 'vqa_soft' needs the annotators' answers (field `answers`); use exact or auto")
        return vqa_soft(pred, answers)
    if scoring == "multiple_choice":
        return multiple_choice(pred, answer)
    raise ValueError(f"unknown scoring {scoring!r}; use exact, vqa_soft, multiple_choice or auto")
