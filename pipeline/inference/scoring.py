"""Answer scoring: exact match, TextVQA-style soft accuracy over 10 answers, multiple choice."""

from __future__ import annotations

import re
import string

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
    """VQA accuracy: min(1, matches / 3), averaged over the 10 leave-one-annotator-out subsets."""
    if not answers:
        raise ValueError("vqa_soft needs the annotators' answers")
    p = normalize(pred)
    gts = [normalize(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(g == p for g in others) / 3))
    return sum(scores) / len(scores)


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
        return vqa_soft(pred, answers or ([answer] if answer else []))
    if scoring == "multiple_choice":
        return multiple_choice(pred, answer)
    raise ValueError(f"unknown scoring {scoring!r}; use exact, vqa_soft, multiple_choice or auto")
