"""Per-benchmark scoring and aggregation as lmms-eval's ``process_results`` and aggregation functions do them.

Reimplemented from the rules of these lmms-eval (EvolvingLMMs-Lab/lmms-eval) sources, by commit read:

- framework: ``lmms_eval/api/task.py`` @ c9c33025049c9124f7c7f16d89cdccffe53489e6 (a generated answer is
  ``.strip()``-ed before any scoring; the built-in ``anls`` metric gets the whole answer list),
  ``lmms_eval/api/metrics.py`` @ 309242ce1a4ea1a89e37798a61d4e79201f734f5 (``anls``, ``mean``)
- textvqa: ``tasks/textvqa/utils.py`` @ e39bd9316ed7e929ecf92a2981f504a0f617a755, ``textvqa_val.yaml`` @
  03b2f7cbd0e4d810fb75c8340c21213b60be9295, ``tasks/_task_utils/vqa_eval_metric.py`` @
  61e5060b4e8611b360b037779652cd735801581c
- docvqa / infovqa: ``docvqa_val.yaml`` @ 9dd4344c1c191746057decdfd2ccbc92a8aad703, ``infovqa_val.yaml`` @
  7fa200553d2484c4a087a2ec6f1504247f648917, ``_default_template_infovqa_yaml`` @
  471d28df902de2018556c0ce48f01b90dfcba742 (metric ``anls``, target ``answers``, aggregation ``mean``)
- chartqa: ``tasks/chartqa/utils.py`` @ 2bb5e9852537729b4fb25fcaa2dce11eb1b2971d, ``chartqa.yaml`` @
  38eb0f316ce90b5dfd262a68b0b4c955a554199b
- ocrbench: ``tasks/ocrbench/utils.py`` @ cf94793bd62d0f7b8f228e56ae7b15f226ed5204 and
  46a88d8b0199ed44d2ff459fb372f2e006960cea (the later one divides the final score by 1000)
- pope: ``tasks/pope/utils.py`` @ 9cd42ee0d878eb91f56b2cff7c59fc8a7dff52f5, ``pope.yaml`` @
  3b20a06780701e6d72afaeadf927940d24004528
- vstar: ``tasks/vstar_bench/utils.py`` @ 59e9c32634f5c6446db90b14df24c2bd5623cea6, yamls @
  2bb5e9852537729b4fb25fcaa2dce11eb1b2971d
- hrbench4k / hrbench8k: ``tasks/hrbench/utils.py`` and ``hrbench_evals.py`` @
  ce4ce428fe5a43bbfa00b0c8fb8774e29bc50b92 (same rules @ 161c7a170643a0d71c24312251d35f7b490d2925)

A :class:`Scorer` holds ``process(doc, prediction) -> record`` and ``aggregate(records) -> metrics``. Every record
carries a float ``"score"`` (the per-sample value whose mean is meaningful: 1/0, the ANLS, the VQA accuracy); the
metrics carry ``"score"``, the headline on the paper's 0-100 scale, plus lmms-eval's own metrics under lmms-eval's
names and on lmms-eval's scale. Records are plain JSON-serialisable dicts.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.benchmarks import BENCHMARKS
from pipeline.benchmarks.answer_processing import normalize_vqa_answer

Record = dict[str, Any]


@dataclass(frozen=True)
class Scorer:
    """lmms-eval's per-document scoring (``process``) and its aggregation (``aggregate``) for one benchmark."""

    process: Callable[[dict, str], Record]
    aggregate: Callable[[list[Record]], dict[str, float]]


def _mean(values: list[float]) -> float:
    # lmms-eval's "mean" aggregation is sum / len (not statistics.mean), kept for bit-identical results.
    if not values:
        raise ValueError("no records to aggregate")
    return sum(values) / len(values)


def _require(records: list[Record]) -> None:
    if not records:
        raise ValueError("no records to aggregate")


# --------------------------------------------------------------------------------------------------- TextVQA


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA accuracy: mean over annotators i of min(1, matches among the other answers / 3), all normalised."""
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    per_subset = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        per_subset.append(min(1, matches / 3))
    # textvqa_process_results averages with statistics.mean (exact rational mean, then rounded).
    return float(statistics.mean(per_subset))


def _textvqa_process(doc: dict, prediction: str) -> Record:
    prediction = prediction.strip()
    answers = doc.get("answers")
    # A document without answers scores 0 in lmms-eval (the test split); the answer is still normalised.
    acc = vqa_accuracy(prediction, answers) if answers is not None else 0.0
    return {"score": acc, "exact_match": acc, "answer": normalize_vqa_answer(prediction)}


def _textvqa_aggregate(records: list[Record]) -> dict[str, float]:
    em = _mean([r["exact_match"] for r in records])
    return {"score": 100 * em, "exact_match": em}


# ------------------------------------------------------------------------------------------ DocVQA / InfoVQA


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insertions, deletions, substitutions) by the two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _squeeze(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """lmms-eval's ANLS of one answer: 1 - min over references of distance / length, 0 below ``threshold``.

    Distance is between the lower-cased, whitespace-squeezed strings, but the length divides by the *raw*
    lengths (``max(len(ref.upper()), len(prediction.upper()))``), as lmms-eval does; a zero length counts as
    distance 0.
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    pred = _squeeze(prediction)
    ratios = []
    for ref in references:
        length = max(len(ref.upper()), len(prediction.upper()))
        ratios.append(0.0 if length == 0 else levenshtein(_squeeze(ref), pred) / length)
    value = 1 - min(ratios)
    return 0.0 if value < threshold else float(value)


def _references(doc: dict) -> list[str]:
    if doc.get("answers") is not None:
        return list(doc["answers"])
    if doc.get("answer") is not None:
        return [doc["answer"]]
    raise ValueError(f"document {doc.get('sample_id')!r} has neither answers nor answer")


def _anls_process(doc: dict, prediction: str) -> Record:
    value = anls(prediction.strip(), _references(doc))
    return {"score": value, "anls": value}


def _anls_aggregate(records: list[Record]) -> dict[str, float]:
    value = _mean([r["anls"] for r in records])
    return {"score": 100 * value, "anls": value}


# ---------------------------------------------------------------------------------------------------- ChartQA

CHARTQA_HUMAN, CHARTQA_AUGMENTED = "human_test", "augmented_test"


def _chartqa_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy: numbers (Python ``float``, a trailing ``%`` divides by 100) within 5% of a
    non-zero target; otherwise case-insensitive string equality (also when the target is 0 or not a number)."""
    pred_value, target_value = _chartqa_float(prediction), _chartqa_float(target)
    # A target of 0 (falsy) falls through to the string comparison, as in lmms-eval.
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    return prediction.lower() == target.lower()


def _chartqa_process(doc: dict, prediction: str) -> Record:
    kind = doc.get("category")
    if kind not in (CHARTQA_HUMAN, CHARTQA_AUGMENTED):
        raise ValueError(f"ChartQA category must be {CHARTQA_HUMAN!r} or {CHARTQA_AUGMENTED!r}, got {kind!r}")
    score = 1.0 if relaxed_correctness(prediction.strip(), str(doc["answer"])) else 0.0
    split = "relaxed_human_split" if kind == CHARTQA_HUMAN else "relaxed_augmented_split"
    return {"score": score, "relaxed_overall": score, split: score, "type": kind}


def _chartqa_aggregate(records: list[Record]) -> dict[str, float]:
    out = {"relaxed_overall": _mean([r["relaxed_overall"] for r in records])}
    # lmms-eval averages each split metric over the documents that emit it.
    for key in ("relaxed_human_split", "relaxed_augmented_split"):
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = _mean(values)
    return {"score": 100 * out["relaxed_overall"], **out}


# --------------------------------------------------------------------------------------------------- OCRBench

OCRBENCH_RECOGNITION = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OCRBENCH_CATEGORIES = (
    *OCRBENCH_RECOGNITION,
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
OCRBENCH_FORMULA_DATASET = "HME100k"


def ocrbench_match(prediction: str, answers: list[str] | str, dataset: str | None) -> bool:
    """OCRBench: some answer is a substring of the prediction after lmms-eval's per-dataset cleaning.

    HME100k (formulas): all spaces removed and newlines ignored, the prediction lower-cased but the answer NOT
    (an upper-case letter in the answer never matches). Others: both lower-cased and stripped, newlines to spaces.
    """
    pred = prediction.lower().strip()
    golds = [answers] if isinstance(answers, str) else list(answers)
    if dataset == OCRBENCH_FORMULA_DATASET:
        got = pred.strip().replace("\n", " ").replace(" ", "")
        return any(g.strip().replace("\n", " ").replace(" ", "") in got for g in golds)
    got = pred.lower().strip().replace("\n", " ")
    return any(g.lower().strip().replace("\n", " ") in got for g in golds)


def _ocrbench_process(doc: dict, prediction: str) -> Record:
    kind = doc.get("category")
    if kind not in OCRBENCH_CATEGORIES:
        raise ValueError(f"OCRBench category (question_type) {kind!r} is not one of {OCRBENCH_CATEGORIES}")
    golds = doc["answers"] if doc.get("answers") is not None else doc["answer"]
    if golds is None:
        raise ValueError(f"document {doc.get('sample_id')!r} has neither answers nor answer")
    score = 1.0 if ocrbench_match(prediction.strip(), golds, doc.get("subset")) else 0.0
    return {"score": score, "question_type": kind, "dataset": doc.get("subset")}


def _ocrbench_aggregate(records: list[Record]) -> dict[str, float]:
    _require(records)
    sums = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for r in records:
        sums[r["question_type"]] += int(r["score"])
    recognition = sum(sums[k] for k in OCRBENCH_RECOGNITION)
    final = sum(sums.values())
    # On the full 1000-question benchmark 100 * final / n == final / 10, the paper's percent (31.4 for 314).
    return {
        "score": 100 * final / len(records),
        "Final Score": float(final),
        "ocrbench_accuracy": final / 1000,
        "Text Recognition": float(recognition),
        **{k: float(v) for k, v in sums.items()},
    }


# ------------------------------------------------------------------------------------------------------- POPE

# The paper's tables print POPE's F1 (Table 4: "All scores are accuracy (%) except for POPE, which reports the
# F1-score"); lmms-eval reports all five metrics, kept next to it.
POPE_HEADLINE = "pope_f1_score"


def _pope_process(doc: dict, prediction: str) -> Record:
    pred = prediction.strip().lower().strip()
    gt = str(doc["answer"]).lower().strip()
    if gt not in ("yes", "no"):
        raise ValueError(f"POPE answer must be yes or no, got {doc['answer']!r}")
    return {"score": 1.0 if pred == gt else 0.0, "prediction": pred, "ground_truth": gt}


def _pope_aggregate(records: list[Record]) -> dict[str, float]:
    _require(records)
    pairs = [(r["ground_truth"], r["prediction"]) for r in records]
    tp = sum(1 for gt, p in pairs if gt == "yes" and p == "yes")
    fp = sum(1 for gt, p in pairs if gt == "no" and p == "yes")
    # Only an exact "no" is a false negative; answers that are neither yes nor no leave precision and recall.
    fn = sum(1 for gt, p in pairs if gt == "yes" and p == "no")
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0.0
    gt_yes = sum(1 for gt, _ in pairs if gt == "yes")
    gt_no = sum(1 for gt, _ in pairs if gt == "no")
    metrics = {
        "pope_accuracy": sum(r["score"] for r in records) / len(records),
        "pope_precision": float(precision),
        "pope_recall": float(recall),
        "pope_f1_score": float(f1),
        # lmms-eval's yes_ratio counts the ground truth's yes answers, not the model's.
        "pope_yes_ratio": gt_yes / (gt_yes + gt_no),
    }
    return {"score": 100 * metrics[POPE_HEADLINE], **metrics}


# --------------------------------------------------------------------------------------------------------- V*

_VSTAR_CASCADE = (
    # 1. the answer opens with the letter ("B", "B.", "B) cat", and also "Dog" -> D, "Answer: C" -> A)
    re.compile(r"^([A-D])", re.IGNORECASE),
    # 2. "... answer / choice / option [is] [:] X"
    re.compile(r"(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])", re.IGNORECASE),
    # 3. a letter in parentheses
    re.compile(r"\(([A-D])\)", re.IGNORECASE),
    # 4. a letter followed (after optional spaces) by ".", ")" or "]"
    re.compile(r"([A-D])\s*[.)\]]", re.IGNORECASE),
    # 5. a letter standing alone between spaces or the ends
    re.compile(r"(?:^|\s)([A-D])(?:\s|$)", re.IGNORECASE),
)


def vstar_letter(prediction: str) -> str | None:
    """The option letter lmms-eval's V* scorer reads from an answer, or None.

    On the stripped, upper-cased answer the first of these that applies wins: it starts with A-D; "ANSWER",
    "CHOICE" or "OPTION", optionally "IS", then spaces/colons and a letter; "(X)"; a letter before ".", ")" or
    "]"; a letter alone between spaces; the only A-D letter anywhere in the answer.
    """
    text = prediction.strip().upper()
    for pattern in _VSTAR_CASCADE:
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    letters = re.findall(r"[A-D]", text)
    # lmms-eval's last fallback (first character in A-D) is already step 1.
    return letters[0] if len(letters) == 1 else None


def _vstar_process(doc: dict, prediction: str) -> Record:
    letter = vstar_letter(prediction.strip())
    gt = str(doc["answer"]).strip().upper()
    category = doc.get("category")
    return {
        "score": 1.0 if letter == gt else 0.0,
        "category": category if category is not None else "unknown",
        "prediction": letter,
        "ground_truth": gt,
    }


def _vstar_aggregate(records: list[Record]) -> dict[str, float]:
    _require(records)
    by_category: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_category[r["category"]].append(r["score"])
    # vstar_aggregate_results reports percent: sum / n * 100.
    overall = sum(r["score"] for r in records) / len(records) * 100.0
    out = {"score": overall, "vstar_overall_acc": overall}
    for category, scores in sorted(by_category.items()):
        out[f"vstar_{category}_acc"] = sum(scores) / len(scores) * 100.0
    return out


# ------------------------------------------------------------------------------------------------- HR-Bench

HRBENCH_CATEGORIES = ("single", "cross")
_HRBENCH_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_HRBENCH_API_FAILURE = "Failed to obtain answer via API"
_HRBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def hrbench_options(options: list[Any] | None) -> dict[str, str]:
    """Options keyed by letter A, B, ... in order, skipping missing ones (None or NaN) as lmms-eval does."""
    out = {}
    for i, text in enumerate(options or []):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            continue
        out[chr(ord("A") + i)] = str(text)
    return out


def hrbench_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The letter HR-Bench's matcher reads without its GPT judge (``can_infer``), or None where lmms-eval would
    ask the judge.

    Option rule (case-sensitive): a refusal phrase gives "Z"; otherwise, with ``.()[],:;!*#{}`` turned into
    spaces, exactly one option letter among the words gives that letter, no option letter but a word "Z" gives
    "Z". Text rule, when the option rule gives nothing: exactly one option text is a substring of the answer
    (both lower-cased). The option rule is skipped when the answer holds the API-failure marker.
    """
    if _HRBENCH_API_FAILURE not in prediction:
        if any(phrase in prediction for phrase in _HRBENCH_REFUSALS):
            return "Z"
        words = prediction.translate(_HRBENCH_SEPARATORS).split()
        present = [letter for letter in options if letter in words]
        if len(present) == 1:
            return present[0]
        if not present and "Z" in words:
            return "Z"
    lowered = prediction.lower()
    hits = [letter for letter, text in options.items() if text.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def _hrbench_process(doc: dict, prediction: str) -> Record:
    category = doc.get("category")
    if category not in HRBENCH_CATEGORIES:
        raise ValueError(f"HR-Bench category must be one of {HRBENCH_CATEGORIES}, got {category!r}")
    letter = hrbench_letter(prediction.strip(), hrbench_options(doc.get("options")))
    # Without a judge an undecided answer scores 0 (lmms-eval itself cannot score it without the API).
    score = 1.0 if letter is not None and str(doc["answer"]).lower() == letter.lower() else 0.0
    return {
        "score": score,
        "category": category,
        "cycle_category": doc.get("subset"),
        "prediction": letter,
        "judge_needed": letter is None,
    }


def _cycle_mean(records: list[Record]) -> float:
    by_cycle: dict[Any, list[float]] = defaultdict(list)
    for r in records:
        by_cycle[r["cycle_category"]].append(r["score"])
    means = [sum(s) / len(s) for s in by_cycle.values()]
    return sum(means) / len(means)


def _hrbench_aggregate(records: list[Record]) -> dict[str, float]:
    _require(records)
    out = {}
    for category in HRBENCH_CATEGORIES:
        subset = [r for r in records if r["category"] == category]
        if subset:
            out[category] = _cycle_mean(subset)
    out["average"] = _cycle_mean(records)
    out["judge_needed"] = float(sum(1 for r in records if r["judge_needed"]))
    return {"score": 100 * out["average"], **out}


# --------------------------------------------------------------------------------------------------- registry

_HRBENCH = Scorer(_hrbench_process, _hrbench_aggregate)
_ANLS = Scorer(_anls_process, _anls_aggregate)

SCORERS: dict[str, Scorer] = {
    "docvqa": _ANLS,
    "chartqa": Scorer(_chartqa_process, _chartqa_aggregate),
    "ocrbench": Scorer(_ocrbench_process, _ocrbench_aggregate),
    "infovqa": _ANLS,
    "textvqa": Scorer(_textvqa_process, _textvqa_aggregate),
    "vstar": Scorer(_vstar_process, _vstar_aggregate),
    "pope": Scorer(_pope_process, _pope_aggregate),
    "hrbench4k": _HRBENCH,
    "hrbench8k": _HRBENCH,
}
assert set(SCORERS) == set(BENCHMARKS), "every benchmark needs a scorer"
