"""lmms-eval's scoring rules (pipeline.benchmarks.scorers): seeded generated (prediction, ground truth) pairs whose
expected values are known by construction, and hand-worked examples citing the rule they exercise."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from pipeline.benchmarks import BENCHMARKS, DOC_KEYS
from pipeline.benchmarks.answer_processing import CONTRACTIONS, normalize_vqa_answer
from pipeline.benchmarks.scorers import (
    OCRBENCH_CATEGORIES,
    OCRBENCH_RECOGNITION,
    SCORERS,
    Scorer,
    anls,
    hrbench_letter,
    levenshtein,
    relaxed_correctness,
    vstar_letter,
)
from pipeline.inference.scoring import normalize as simplified_normalize
from pipeline.inference.scoring import vqa_soft as evaluate_vqa_soft


def _doc(**fields) -> dict:
    doc = dict.fromkeys(DOC_KEYS)
    doc.update(fields)
    return doc


def _run(name: str, pairs: list[tuple[dict, str]]) -> tuple[list[dict], dict[str, float]]:
    scorer = SCORERS[name]
    records = [scorer.process(doc, pred) for doc, pred in pairs]
    return records, scorer.aggregate(records)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_covers_every_benchmark():
    assert set(SCORERS) == set(BENCHMARKS)
    assert all(isinstance(s, Scorer) for s in SCORERS.values())
    assert SCORERS["hrbench4k"] is SCORERS["hrbench8k"]
    assert SCORERS["docvqa"] is SCORERS["infovqa"]
    with pytest.raises(AttributeError):
        SCORERS["pope"].process = None  # frozen


# ------------------------------------------------------------------------------------------- VQA normaliser

# Each canonical answer with surface forms that lmms-eval's EvalAI processor maps onto it (the rule in the key's
# comment) and forms that it does NOT undo.
TEXTVQA_ITEMS = {
    "10": (["10", "ten", "Ten", "TEN", "10."], ["10.0", "10%", "tenth"]),  # number words; final period
    "0": (["0", "zero", "none", "None"], ["nothing", "0.0"]),  # "none" is a number word too
    "don't": (["dont", "don't", "DONT", "Don't"], ["do not", "donot"]),  # contraction table
    "it 's": (["it's", "IT'S", "it 's"], ["its", "it is"]),  # possessive 's split off
    "coca cola": (["coca-cola", "Coca-Cola", "coca cola", "coca - cola", "coca_cola"], ["cocacola", "coca-colas"]),
    "e mail": (["e-mail", "E-Mail", "e mail", "e/mail"], ["email"]),  # "-" and "/" become spaces when unspaced
    "1000": (["1,000", "1000", "1,000.", "1,0,0,0"], ["1 000", "1.000", "1000s"]),  # commas deleted
    "3.14": (["3.14", "3.14.", "3.14!"], ["314", "3 14"]),  # a period before a digit stays
    "10%": (["10%", "10%.", "The 10%"], ["10", "10 %", "10 percent"]),  # "%" is not punctuation here
    "am": (["a.m.", "A.M.", "am", "a.m"], ["a m", "pm"]),  # periods deleted; "a m" loses the article "a"
    "red blue": (["red/blue", "red / blue", "(red) blue", "red blue", "red-blue", "[red] {blue}"], ["redblue"]),
    "pizza hut": (["Pizza Hut", "the pizza hut", "a pizza  hut", "pizza hut?", "pizza hut !", "\tpizza\nhut "], []),
}
DISTRACTORS = ["dog", "bird", "house", "tree", "car", "seven", "window", "blue red", "12", "cola", "mail", "hut"]


def _surface(rng: random.Random, form: str) -> str:
    """Wrap a form in changes every canonical survives: case, outer whitespace, a question mark, an article."""
    choice = rng.randrange(6)
    if choice == 0:
        form = form.upper()
    elif choice == 1:
        form = rng.choice([" ", "\t", "\n", "  "]) + form + rng.choice([" ", "\n", ""])
    elif choice == 2:
        form = form + "?"
    elif choice == 3:
        form = rng.choice(["the ", "The ", "a ", "an "]) + form
    return form


def _textvqa_case(rng: random.Random) -> tuple[list[str], str, float, bool]:
    canonical = rng.choice(list(TEXTVQA_ITEMS))
    same, different = TEXTVQA_ITEMS[canonical]
    k = rng.randint(0, 10)
    answers = [_surface(rng, rng.choice(same)) for _ in range(k)]
    answers += [_surface(rng, rng.choice(DISTRACTORS)) for _ in range(10 - k)]
    rng.shuffle(answers)
    undone = not different or rng.random() < 0.7
    prediction = _surface(rng, rng.choice(same if undone else different))
    matches = k if undone else 0
    # Leave-one-out: a left-out match leaves matches-1 among the other nine, any other leaves all of them.
    expected = float((matches * min(1, Fraction(matches - 1, 3)) + (10 - matches) * min(1, Fraction(matches, 3))) / 10)
    return answers, prediction, expected, undone


def _simplified_vqa(prediction: str, answers: list[str]) -> float:
    """What evaluate scored before it used lmms-eval's rule: lower case, punctuation and articles dropped."""
    pred, gts = simplified_normalize(prediction), [simplified_normalize(a) for a in answers]
    others = [sum(g == pred for j, g in enumerate(gts) if j != i) for i in range(len(gts))]
    return sum(min(1, m / 3) for m in others) / len(gts)


def test_textvqa_generated_pairs():
    rng = random.Random(16)
    cases = [_textvqa_case(rng) for _ in range(400)]
    pairs = [(_doc(answers=answers, question_id=str(i)), pred) for i, (answers, pred, _, _) in enumerate(cases)]
    records, metrics = _run("textvqa", pairs)
    for (answers, pred, expected, _), record in zip(cases, records, strict=True):
        assert record["score"] == pytest.approx(expected, abs=1e-12), (pred, answers)
        assert record["exact_match"] == record["score"]
    mean = sum(c[2] for c in cases) / len(cases)
    assert metrics["exact_match"] == pytest.approx(mean, abs=1e-12)
    assert metrics["score"] == pytest.approx(100 * mean, abs=1e-10)
    # The fixture has teeth: the simplified normaliser disagrees on a good share of these cases, and the evaluate
    # stage's vqa_soft (which once was that) now agrees with lmms-eval's rule on every one
    old_wrong = sum(_simplified_vqa(pred, answers) != pytest.approx(exp, abs=1e-12) for answers, pred, exp, _ in cases)
    assert old_wrong > 50
    assert [evaluate_vqa_soft(pred, answers) for answers, pred, _, _ in cases] == [r["score"] for r in records]


def test_simplified_normaliser_fails_number_words():
    # EvalAI maps "ten" -> "10" (number-word table); a plain lower/punctuation/articles normaliser does not.
    answers = ["10"] * 10
    assert _simplified_vqa("ten", answers) == 0.0
    record = SCORERS["textvqa"].process(_doc(answers=answers), "ten")
    assert record["score"] == 1.0 == evaluate_vqa_soft("ten", answers)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Ten", "10"),  # number word, after lower-casing
        ("none", "0"),  # "none" is in the number table
        ("dont", "don't"),  # contraction table
        ("Im", "im"),  # capitalised table key never matches lower-cased text
        ("somebody'd", "somebodyd"),  # the table's one reversed entry
        ("John's", "john 's"),  # possessive split off
        ("1,000", "1000"),  # every comma deleted
        ("coca-cola", "coca cola"),  # unspaced "-" becomes a space
        ("10 - 5", "10 5"),  # spaced "-" is deleted
        ("a-b c -d", "ab c d"),  # one spaced "-" anywhere deletes every "-", so "a-b" joins up
        ("3.14", "3.14"),  # period before a digit stays
        ("end.", "end"),  # period before a non-digit goes
        ("5.", "5"),  # ... also right after a digit
        ("a.m.", "am"),
        ("10%", "10%"),  # "%" untouched
        ("The  cat\tsat", "cat sat"),  # article dropped, whitespace squeezed
        ("(yes)", "yes"),
        ("What?", "what"),  # "?" deleted
        ("x " + "." * 40 + "y", "x " + "." * 8 + "y"),  # only the first 32 periods are deleted
    ],
)
def test_vqa_normaliser_rules(raw, normal):
    assert normalize_vqa_answer(raw) == normal


def test_contraction_table_is_complete():
    # The EvalAI table has 120 entries (its keys, including the ones that cannot match).
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["yall'd've"] == "y'all'd've"


def test_textvqa_worked_examples():
    score = lambda answers, pred: SCORERS["textvqa"].process(_doc(answers=answers), pred)["score"]  # noqa: E731
    # 2 of 10 annotators: 2 subsets with 1 other match (1/3), 8 with 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    assert score(["cat", "cat"] + ["dog"] * 8, "Cat.") == pytest.approx(0.6)
    # 3 of 10: 3 subsets with 2 matches (2/3) and 7 with 3 (1) -> (2 + 7) / 10 = 0.9
    assert score(["two"] * 3 + ["dog"] * 7, "2") == pytest.approx(0.9)
    # 4 or more matches: every subset holds at least 3 -> 1
    assert score(["the dog"] * 4 + ["cat"] * 6, "DOG") == 1.0
    assert SCORERS["textvqa"].process(_doc(answers=None), "dog")["score"] == 0.0  # test split: no answers


# ------------------------------------------------------------------------------------------------------- ANLS

_CORE, _FRESH, _OTHER = "abcdefghijklm", "nopqrstuvwxyz", "0123456789"


def _anls_case(rng: random.Random) -> tuple[list[str], str, float]:
    n = rng.randint(4, 20)
    gold = "".join(rng.choice(_CORE) for _ in range(n))
    # s substitutions by distinct characters absent from the gold and d deletions elsewhere: the edit distance is
    # exactly s + d (each fresh character costs an edit, and so does each missing character).
    s = rng.randint(0, min(n - 1, len(_FRESH)))
    d = rng.randint(0, n - 1 - s)
    positions = rng.sample(range(n), s + d)
    fresh = iter(rng.sample(_FRESH, s))
    subs, dels = set(positions[:s]), set(positions[s:])
    pred = "".join(next(fresh) if i in subs else c for i, c in enumerate(gold) if i not in dels)
    if rng.random() < 0.5:
        pred = pred.upper()  # ANLS lower-cases both sides
    # Outer spaces of the gold count in lmms-eval's length (raw strings); the prediction's are stripped first.
    left, right = rng.randint(0, 3), rng.randint(0, 3)
    gold_raw = " " * left + gold + " " * right
    pred_raw = rng.choice(["", " ", "\n"]) + pred + rng.choice(["", "  "])
    sim = 1 - Fraction(s + d, max(n + left + right, n - d))
    expected = float(sim) if sim >= Fraction(1, 2) else 0.0
    # Unrelated references share no character with the prediction: their distance is the longer length -> 0.
    others = ["".join(rng.choice(_OTHER) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(0, 2))]
    refs = [gold_raw, *others]
    rng.shuffle(refs)
    return refs, pred_raw, expected


@pytest.mark.parametrize("name", ["docvqa", "infovqa"])
def test_anls_generated_pairs(name):
    rng = random.Random(7 if name == "docvqa" else 8)
    cases = [_anls_case(rng) for _ in range(300)]
    records, metrics = _run(name, [(_doc(answers=refs), pred) for refs, pred, _ in cases])
    for (refs, pred, expected), record in zip(cases, records, strict=True):
        assert record["score"] == pytest.approx(expected, abs=1e-12), (refs, pred)
    assert 0 < sum(c[2] == 0.0 for c in cases) < len(cases)  # both sides of the threshold are exercised
    mean = sum(c[2] for c in cases) / len(cases)
    assert metrics["anls"] == pytest.approx(mean, abs=1e-12)
    assert metrics["score"] == pytest.approx(100 * mean, abs=1e-10)


def test_levenshtein_worked_examples():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abab", "baba") == 2  # delete the first a, append an a
    assert levenshtein("flaw", "lawn") == 2


def test_anls_worked_examples():
    # 5 substitutions in 10 characters: 1 - 5/10 = 0.5, which is not below the 0.5 threshold -> kept
    assert anls("nopqrfghij", ["abcdefghij"]) == 0.5
    # 6 in 11: 1 - 6/11 < 0.5 -> 0
    assert anls("nopqrsghijk", ["abcdefghijk"]) == 0.0
    # case and inner whitespace are normalised away for the distance ...
    assert anls("HELLO  World", ["hello world"]) == 1.0
    # ... but the raw lengths divide: gold "  abcd  " is 8 long, one substitution -> 1 - 1/8
    assert anls("abcx", ["  abcd  "]) == pytest.approx(7 / 8)
    # the best reference counts
    assert anls("abcd", ["zzzz", "abce"]) == pytest.approx(0.75)
    assert anls("", [""]) == 1.0  # zero length counts as distance 0


# ---------------------------------------------------------------------------------------------------- ChartQA


def _chartqa_case(rng: random.Random) -> tuple[str, str, bool]:
    kind = rng.randrange(5)
    if kind == 0:  # number within 5%
        target = round(rng.uniform(1, 5000) * rng.choice([1, -1]), rng.randint(0, 2))
        pred = target * (1 + rng.uniform(-0.045, 0.045))
        return f"{target:g}", f"{pred:.6g}", True
    if kind == 1:  # number outside 5%
        target = round(rng.uniform(1, 5000), rng.randint(0, 2))
        pred = target * (1 + rng.choice([1, -1]) * rng.uniform(0.056, 0.5))
        return f"{target:g}", f"{pred:.6g}", False
    if kind == 2:  # percent: a trailing % divides by 100 on either side
        pct = rng.randint(1, 99)
        return rng.choice(
            [(f"{pct}%", f"{pct / 100:g}", True), (f"{pct}%", f"{pct}", False), (f"{pct}", f"{pct}%", False)]
        )
    if kind == 3:  # strings: case-insensitive exact match only
        word = rng.choice(["Yes", "North America", "Q3 2019", "Apple"])
        return rng.choice([(word, word.upper(), True), (word, word.lower() + ".", False), (word, "N/A", False)])
    # a zero target, or a prediction float() rejects, falls back to string equality
    return rng.choice([("0", "0", True), ("0", "0.0", False), ("0", "0.01", False), ("1000", "1,000", False)])


def test_chartqa_generated_pairs():
    rng = random.Random(21)
    cases = [(*_chartqa_case(rng), rng.choice(["human_test", "augmented_test"])) for _ in range(400)]
    pairs = [(_doc(answer=t, category=kind), rng.choice(["", " ", "\n"]) + p) for t, p, _, kind in cases]
    records, metrics = _run("chartqa", pairs)
    for (t, p, ok, _), record in zip(cases, records, strict=True):
        assert record["score"] == (1.0 if ok else 0.0), (t, p)
    human = [c[2] for c in cases if c[3] == "human_test"]
    augmented = [c[2] for c in cases if c[3] == "augmented_test"]
    assert metrics["relaxed_overall"] == pytest.approx(sum(c[2] for c in cases) / len(cases))
    assert metrics["relaxed_human_split"] == pytest.approx(sum(human) / len(human))
    assert metrics["relaxed_augmented_split"] == pytest.approx(sum(augmented) / len(augmented))
    assert metrics["score"] == pytest.approx(100 * metrics["relaxed_overall"])


def test_chartqa_worked_examples():
    assert relaxed_correctness("105", "100")  # |105 - 100| / 100 = 0.05 <= 0.05
    assert relaxed_correctness("95", "100")
    assert not relaxed_correctness("105.1", "100")  # 0.051
    assert relaxed_correctness("0.12", "12%")  # 12% -> 0.12
    assert not relaxed_correctness("12", "12%")
    assert relaxed_correctness("1e2", "100")  # Python float() syntax
    assert not relaxed_correctness("0.0", "0")  # zero target: string comparison
    assert relaxed_correctness("YES", "Yes")
    with pytest.raises(ValueError, match="human_test"):
        SCORERS["chartqa"].process(_doc(answer="1", category="human"), "1")


# --------------------------------------------------------------------------------------------------- OCRBench


def _ocrbench_case(rng: random.Random) -> tuple[dict, str, bool]:
    word = rng.choice(["STOP", "Coffee", "route 66", "Hello World", "x7Q"])
    if rng.random() < 0.15:  # formula set: spaces removed, answer case kept, prediction lower-cased
        gold = rng.choice(["x ^ { 2 } + 1", "\\frac { a } { b }", "A + b", "y = 2"])
        doc = _doc(answers=[gold], category=OCRBENCH_CATEGORIES[-1], subset="HME100k")
        if rng.random() < 0.5:
            return doc, "The formula is " + gold.replace(" ", ""), gold == gold.lower()
        return doc, gold.replace(" ", "  ").upper(), gold == gold.lower()
    doc = _doc(answers=[rng.choice(["zzz", "qqq"]), word], category=rng.choice(OCRBENCH_CATEGORIES[:-1]), subset="X")
    form = rng.randrange(4)
    if form == 0:  # answer inside a sentence, any case
        return (
            doc,
            rng.choice(["The sign says ", "it reads: ", ""]) + rng.choice([word.upper(), word.lower()]) + ".",
            True,
        )
    if form == 1:  # a newline inside the prediction reads as a space
        return doc, word.replace(" ", "\n"), True
    if form == 2:  # extra inner space breaks the substring
        return doc, word.replace(" ", "  "), " " not in word
    return doc, word[:-1] + "#", False  # last character wrong


def test_ocrbench_generated_pairs():
    rng = random.Random(33)
    cases = [_ocrbench_case(rng) for _ in range(400)]
    records, metrics = _run("ocrbench", [(doc, pred) for doc, pred, _ in cases])
    sums = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for (doc, pred, ok), record in zip(cases, records, strict=True):
        assert record["score"] == (1.0 if ok else 0.0), (doc["answers"], doc["subset"], pred)
        sums[doc["category"]] += ok
    final = sum(sums.values())
    assert metrics["Final Score"] == final
    assert metrics["Text Recognition"] == sum(sums[k] for k in OCRBENCH_RECOGNITION)
    assert all(metrics[k] == v for k, v in sums.items())
    assert metrics["ocrbench_accuracy"] == final / 1000
    assert metrics["score"] == pytest.approx(100 * final / len(cases))


def test_ocrbench_worked_examples():
    process = SCORERS["ocrbench"].process
    cat = OCRBENCH_CATEGORIES[0]
    assert process(_doc(answers=["Stop"], category=cat, subset="IIIT5K"), "the sign says STOP!")["score"] == 1.0
    assert process(_doc(answer="Stop", category=cat, subset="IIIT5K"), "Sto p")["score"] == 0.0  # single answer
    hme = OCRBENCH_CATEGORIES[-1]
    # HME100k: "A" in the answer is never lower-cased while the prediction always is -> no match
    assert process(_doc(answers=["A + 1"], category=hme, subset="HME100k"), "A+1")["score"] == 0.0
    assert process(_doc(answers=["a + 1"], category=hme, subset="HME100k"), "A + 1")["score"] == 1.0
    # 314 of 1000 correct is 31.4 on the paper's scale (lmms-eval: 314 out of 1000)
    docs = [_doc(answers=["ok"], category=OCRBENCH_CATEGORIES[i % 10], subset="X") for i in range(1000)]
    records = [process(d, "ok" if i < 314 else "no") for i, d in enumerate(docs)]
    metrics = SCORERS["ocrbench"].aggregate(records)
    assert metrics["score"] == 31.4
    assert metrics["Final Score"] == 314.0
    with pytest.raises(ValueError, match="question_type"):
        process(_doc(answers=["x"], category="Other", subset="X"), "x")


# ------------------------------------------------------------------------------------------------------- POPE

POPE_YES = ["yes", "Yes", "YES", " yes\n", "Yes "]
POPE_NO = ["no", "No", "NO", "\tno"]
POPE_OTHER = ["Yes.", "No.", "yes, there is", "There is no cat.", "maybe", "", "y"]


def test_pope_generated_pairs():
    rng = random.Random(44)
    cases = []
    for _ in range(500):
        gt = rng.choice(["yes", "no"])
        kind = rng.choice(["yes", "no", "other"])
        form = rng.choice({"yes": POPE_YES, "no": POPE_NO, "other": POPE_OTHER}[kind])
        cases.append((gt, kind, form))
    records, metrics = _run("pope", [(_doc(answer=rng.choice([gt, gt.upper()])), form) for gt, _, form in cases])
    for (gt, kind, _), record in zip(cases, records, strict=True):
        assert record["score"] == (1.0 if kind == gt else 0.0)
    count = lambda gt, kind: sum(1 for c in cases if c[0] == gt and c[1] == kind)  # noqa: E731
    tp, fp, fn, tn = count("yes", "yes"), count("no", "yes"), count("yes", "no"), count("no", "no")
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert metrics["pope_accuracy"] == pytest.approx((tp + tn) / len(cases))
    assert metrics["pope_precision"] == pytest.approx(precision)
    assert metrics["pope_recall"] == pytest.approx(recall)
    assert metrics["pope_f1_score"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert metrics["pope_yes_ratio"] == pytest.approx(sum(c[0] == "yes" for c in cases) / len(cases))
    assert metrics["score"] == pytest.approx(100 * metrics["pope_f1_score"])


def test_pope_worked_example():
    # gt/pred: yes/yes, yes/yes, yes/no, yes/"Yes." (neither), no/yes, no/no, no/no, no/"" (neither)
    gts = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    preds = ["Yes", "yes", "no", "Yes.", "YES", "no", "No", ""]
    _, metrics = _run("pope", [(_doc(answer=g), p) for g, p in zip(gts, preds, strict=True)])
    # TP 2, FP 1, FN 1 (only an exact "no" counts), TN 2 -> accuracy 4/8, precision 2/3, recall 2/3
    assert metrics["pope_accuracy"] == 0.5
    assert metrics["pope_precision"] == pytest.approx(2 / 3)
    assert metrics["pope_recall"] == pytest.approx(2 / 3)
    assert metrics["pope_f1_score"] == pytest.approx(2 / 3)
    assert metrics["pope_yes_ratio"] == 0.5  # share of "yes" in the ground truth, not in the predictions
    with pytest.raises(ValueError, match="yes or no"):
        SCORERS["pope"].process(_doc(answer="maybe"), "yes")


# --------------------------------------------------------------------------------------------------------- V*

VSTAR_FORMS = [
    "{L}",
    "({L})",
    "{L}.",
    "{L})",
    "{l}",
    "{L}) the red one",
    "({L}) red",
    "The answer is {L}",
    "the answer is {l}.",
    "The correct option is ({L})",
    "Option {L}",
    "I choose {L} here",
    "[{L}]",
]


def test_vstar_generated_pairs():
    rng = random.Random(55)
    cases = []
    for _ in range(400):
        letter, gt = rng.choice("ABCD"), rng.choice("ABCD")
        form = rng.choice(VSTAR_FORMS).format(L=letter, l=letter.lower())
        cases.append(
            (gt, letter, rng.choice(["", " ", "\n"]) + form, rng.choice(["direct_attributes", "relative_position"]))
        )
    records, metrics = _run("vstar", [(_doc(answer=gt, category=cat), form) for gt, _, form, cat in cases])
    for (gt, letter, form, _), record in zip(cases, records, strict=True):
        assert record["prediction"] == letter, form
        assert record["score"] == (1.0 if letter == gt else 0.0)
    for cat in ("direct_attributes", "relative_position"):
        hits = [c[0] == c[1] for c in cases if c[3] == cat]
        assert metrics[f"vstar_{cat}_acc"] == pytest.approx(100 * sum(hits) / len(hits))
    overall = 100 * sum(c[0] == c[1] for c in cases) / len(cases)
    assert metrics["vstar_overall_acc"] == pytest.approx(overall)
    assert metrics["score"] == metrics["vstar_overall_acc"]  # lmms-eval already reports percent


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("Answer: B", "A"),  # rule 1 first: the answer starts with the letter A of "ANSWER"
        ("Dog", "D"),  # rule 1: starts with D
        ("The answer is: C", "C"),  # rule 2
        ("It must be (B).", "B"),  # rule 3 ("IT MUST BE" has no A-D before the parenthesis rule)
        ("The color is red.", "D"),  # rule 4: "RED." ends in "D."
        ("I think it is a cat", "A"),  # rule 5: the standalone "A"
        ("Left", None),  # no A-D letter at all
        ("Hmm, yes", None),
        ("Yellow bus", "B"),  # the only A-D letter anywhere
    ],
)
def test_vstar_letter_rules(answer, letter):
    assert vstar_letter(answer) == letter


# --------------------------------------------------------------------------------------------------- HR-Bench

HR_OPTIONS = ["red car", "blue truck", "green bus", "white van"]


def _hrbench_case(rng: random.Random) -> tuple[str, str | None]:
    i = rng.randrange(4)
    letter, text = "ABCD"[i], HR_OPTIONS[i]
    forms = [
        (letter, letter),
        (f"{letter}.", letter),
        (f"({letter})", letter),
        (f"The answer is {letter}", letter),
        (f"**{letter}**: {text}", letter),
        (f"it is the {text}", letter),  # no option letter: the option text decides
        (f"I see a {text.upper()}", letter),  # lower-case "a" is no option letter
        (f"A {text}", "A"),  # capital "A" as a word is option A
        (letter.lower(), None),  # lower-case letters are not option letters: the judge would decide
        ("B or C", None),  # two option letters
        ("Z", "Z"),
        ("Cannot determine the answer", "Z"),
        ("a red car or a blue truck", None),  # two option texts
    ]
    return forms[rng.randrange(len(forms))]


def test_hrbench_generated_pairs():
    rng = random.Random(66)
    cases = []
    for _ in range(400):
        pred, letter = _hrbench_case(rng)
        cases.append((pred, letter, rng.choice("ABCD"), rng.choice(["single", "cross"]), rng.randrange(4)))
    pairs = [(_doc(answer=gt, options=HR_OPTIONS, category=cat, subset=cyc), pred) for pred, _, gt, cat, cyc in cases]
    records, metrics = _run("hrbench8k", pairs)
    for (pred, letter, gt, _, _), record in zip(cases, records, strict=True):
        assert record["prediction"] == letter, pred
        assert record["judge_needed"] == (letter is None)
        assert record["score"] == (1.0 if letter == gt else 0.0)

    def cycle_mean(rows):
        groups = {}
        for row in rows:
            groups.setdefault(row[4], []).append(row[1] == row[2])
        return sum(sum(g) / len(g) for g in groups.values()) / len(groups)

    assert metrics["single"] == pytest.approx(cycle_mean([c for c in cases if c[3] == "single"]))
    assert metrics["cross"] == pytest.approx(cycle_mean([c for c in cases if c[3] == "cross"]))
    assert metrics["average"] == pytest.approx(cycle_mean(cases))
    assert metrics["judge_needed"] == sum(c[1] is None for c in cases)
    assert metrics["score"] == pytest.approx(100 * metrics["average"])


def test_hrbench_cycle_average_worked_example():
    # cycle 0: 3 of 3 right, cycle 1: 0 of 1 -> mean of cycle means 0.5 (the plain mean would be 0.75)
    docs = [_doc(answer="A", options=HR_OPTIONS, category="single", subset=c) for c in (0, 0, 0, 1)]
    _, metrics = _run("hrbench4k", [(d, "A") for d in docs[:3]] + [(docs[3], "B")])
    assert metrics["average"] == 0.5
    assert metrics["single"] == 0.5
    assert "cross" not in metrics
    assert metrics["score"] == 50.0


def test_hrbench_letter_rules():
    options = dict(zip("ABCD", HR_OPTIONS, strict=True))
    assert hrbench_letter("Failed to obtain answer via API: B", options) is None  # option rule skipped
    assert hrbench_letter("Failed to obtain answer via API, green bus", options) == "C"  # text rule still runs
    assert hrbench_letter("A A A", options) == "A"  # the same letter repeated counts once
    with pytest.raises(ValueError, match="single"):
        SCORERS["hrbench4k"].process(_doc(answer="A", options=HR_OPTIONS, category="FSP"), "A")


# ---------------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_records_carry_float_score_and_aggregate_headline(name):
    doc = {
        "textvqa": _doc(answers=["x"] * 10),
        "docvqa": _doc(answers=["x"]),
        "infovqa": _doc(answers=["x"]),
        "chartqa": _doc(answer="x", category="human_test"),
        "ocrbench": _doc(answers=["x"], category=OCRBENCH_CATEGORIES[0], subset="X"),
        "pope": _doc(answer="yes"),
        "vstar": _doc(answer="A", category="direct_attributes"),
        "hrbench4k": _doc(answer="A", options=HR_OPTIONS, category="single", subset=0),
        "hrbench8k": _doc(answer="A", options=HR_OPTIONS, category="cross", subset=0),
    }[name]
    correct = {"pope": "yes", "vstar": "A", "hrbench4k": "A", "hrbench8k": "A"}.get(name, "x")
    records = [SCORERS[name].process(doc, correct), SCORERS[name].process(doc, "zzz qqq")]
    assert [type(r["score"]) for r in records] == [float, float]
    assert [r["score"] for r in records] == [1.0, 0.0]
    metrics = SCORERS[name].aggregate(records)
    # POPE's headline is F1 (the paper's), and an answer neither yes nor no is no false negative in it
    assert metrics["score"] == pytest.approx(100.0 if name == "pope" else 50.0)
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(ValueError, match="no records"):
        SCORERS[name].aggregate([])
