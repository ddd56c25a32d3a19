"""The question text lmms-eval builds for each benchmark and model family, and its generation settings.

Read from lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval), ``lmms_eval/tasks/<task>/``, at these commits:

============ ================================================================== ==================================
benchmark    task YAML (lmms_eval_specific_kwargs, generation_kwargs)           doc_to_text
============ ================================================================== ==================================
textvqa      textvqa/_default_template_textvqa_yaml @2eeb7189c1dd               textvqa/utils.py @e39bd9316ed7
docvqa       docvqa/_default_template_docvqa_yaml @3f426f262334                 docvqa/utils.py @008ddc83c2b5
infovqa      infovqa/_default_template_infovqa_yaml @471d28df902d               infovqa/utils.py @2bb5e9852537
chartqa      chartqa/chartqa.yaml @38eb0f316ce9, chartqa100.yaml @20c66d853586  chartqa/utils.py @2bb5e9852537
ocrbench     ocrbench/ocrbench.yaml @40e89c0516cf                               ocrbench/utils.py @cf94793bd62d
pope         pope/pope.yaml @2bb5e9852537                                       pope/utils.py (kwargs version)
vstar        vstar_bench/_default_template_yaml @2bb5e9852537                   vstar_bench/utils.py @59e9c32634f5
hrbench4k/8k hrbench/hrbench4k.yaml @fd7e12a7b787, hrbench8k.yaml @672508beb977 hrbench/utils.py @161c7a170643
============ ================================================================== ==================================

Which ``lmms_eval_specific_kwargs`` entry a model gets: ``simple_evaluate`` builds ``TaskManager(model_name=<the
--model argument>)`` (evaluator.py @03cbb1f363ad) and ``ConfigurableTask._prepare_model_specific_config``
(api/task.py) takes the entry whose key *equals* that name, else ``default``. So the ``qwen_vl`` entries of
TextVQA, DocVQA and ChartQA belong to lmms-eval's ``qwen_vl`` model (Qwen-VL), not to ``qwen2_5_vl``, and ``plm``
to PerceptionLM. No task here has an entry for ``llava`` / ``llava_hf`` (LLaVA-1.5), ``qwen2_5_vl`` or DeepSeek-VL
(lmms-eval has no DeepSeek-VL model): every family gets ``default``.

TextVQA: lmms-eval's ``default`` sets ``ocr: false``, so its prompt carries no "Reference OCR token" line; ours
never does (the paper follows ViCrop). The image is passed separately by the model adapter: no ``<image>``
placeholder here (lmms-eval's models add it themselves).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from pipeline.benchmarks import BENCHMARKS
from pipeline.benchmarks.formats import VSTAR_INSTRUCTION

FAMILIES = ("llava", "qwen2_5_vl", "deepseek_vl")
# the lmms-eval --model names each family runs as: an lmms_eval_specific_kwargs entry under one of them wins
MODEL_NAMES = {"llava": ("llava", "llava_hf"), "qwen2_5_vl": ("qwen2_5_vl",), "deepseek_vl": ()}
# max_new_tokens lmms-eval's model classes use where the task names none (TextVQA, HR-Bench): llava.py
# @1741440d9ac6 (1024), qwen2_5_vl.py @0229ae508e64 (32768; older versions 128); no DeepSeek-VL model exists
MODEL_MAX_NEW_TOKENS = {"llava": 1024, "qwen2_5_vl": 32768}

SINGLE_WORD_OR_PHRASE = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Task:
    """One lmms-eval task as its YAML sets it up."""

    task: str  # lmms-eval's task name
    # lmms_eval_specific_kwargs: model name -> (pre_prompt, post_prompt); empty: doc_to_text takes none
    prompts: dict[str, tuple[str, str]] = field(default_factory=dict)
    generation: dict = field(default_factory=dict)  # the YAML's generation_kwargs (None: the YAML has none)


_GREEDY = {"temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
TASKS: dict[str, Task] = {
    "textvqa": Task(
        "textvqa_val",
        {
            "default": ("", SINGLE_WORD_OR_PHRASE),
            "qwen_vl": ("", " Answer:"),
            "plm": ("", "\nProvide a short and direct response."),
        },
        {"until": ["ASSISTANT:"]},
    ),
    "docvqa": Task(
        "docvqa_val",
        {"default": ("", SINGLE_WORD_OR_PHRASE), "qwen_vl": ("", " Answer:")},
        {"max_new_tokens": 128, "temperature": 0, "do_sample": False},
    ),
    "infovqa": Task(
        "infovqa_val",
        {"default": ("", SINGLE_WORD_OR_PHRASE)},
        {"max_new_tokens": 32, "temperature": 0, "do_sample": False},
    ),
    "chartqa": Task(
        "chartqa",
        {"default": ("", "\nAnswer the question with a single word."), "qwen_vl": ("", " Answer:")},
        {"max_new_tokens": 16, "temperature": 0, "do_sample": False},
    ),
    "ocrbench": Task("ocrbench", {}, {"max_new_tokens": 128, **_GREEDY}),
    "pope": Task(
        "pope",
        {"default": ("", SINGLE_WORD_OR_PHRASE), "plm": ("", "\nYour response must be concise.")},
        {"max_new_tokens": 128, **_GREEDY},
    ),
    "vstar": Task("vstar_bench", {"default": ("", "\n" + VSTAR_INSTRUCTION)}, {"max_new_tokens": 16, **_GREEDY}),
    "hrbench4k": Task("hrbench4k"),
    "hrbench8k": Task("hrbench8k"),
}
assert set(TASKS) == set(BENCHMARKS)


def _check(name: str, family: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {list(FAMILIES)}")
    return TASKS[name]


def prompt_kwargs(name: str, family: str) -> tuple[str, str]:
    """(pre_prompt, post_prompt) lmms-eval gives benchmark ``name`` for a model of ``family``."""
    prompts = _check(name, family).prompts
    entry = next((prompts[m] for m in MODEL_NAMES[family] if m in prompts), None)
    return entry or prompts.get("default", ("", ""))


def build_prompt(name: str, doc: dict, family: str) -> str:
    """The user text lmms-eval's task ``doc_to_text`` builds for document ``doc`` (image passed separately)."""
    pre, post = prompt_kwargs(name, family)
    question = doc["question"]
    if name == "textvqa":
        # str.capitalize lower-cases the rest too ("NYC" -> "nyc"), exactly as textvqa_doc_to_text does
        return f"{pre}{question.capitalize()}{post}"
    if name in ("docvqa", "infovqa", "chartqa"):
        return f"{pre}{question}{post}"
    if name == "ocrbench":
        return question.strip()
    if name == "pope":
        return f"{pre}{question.strip()}{post}"
    if name == "vstar":
        return _vstar_text(_vstar_released_text(doc), pre, post)
    # HR-Bench: hrbench_doc_to_text takes no kwargs
    options = "".join(f"{letter}. {option}\n" for letter, option in zip(_letters(doc), doc["options"], strict=True))
    return f"{question.strip()}\n{options}Answer the option letter directly."


def _letters(doc: dict) -> str:
    return string.ascii_uppercase[: len(doc["options"])]


def _vstar_released_text(doc: dict) -> str:
    """The ``text`` field as V* releases it: question, "(A) ..." lines, then the instruction line."""
    options = "\n".join(f"({letter}) {option}" for letter, option in zip(_letters(doc), doc["options"], strict=True))
    return f"{doc['question']}\n{options}\n{VSTAR_INSTRUCTION}"


def _vstar_text(question: str, pre: str, post: str) -> str:
    """lmms-eval's vstar_doc_to_text on the released text, step for step.

    Its option pattern runs to the end of the text, so the last option keeps the instruction line after it and
    the post_prompt then repeats it: "...\\nD. leather\\nAnswer with ... directly.\\nAnswer with ... directly."
    That is the text lmms-eval gives the model, so it is the text here.
    """
    options_match = re.findall(r"\([A-D]\)\s*([^()]+?)(?=\s*\([A-D]\)|$)", question)
    if options_match:
        question_text = question.split("(A)")[0].strip()
        formatted = [f"{letter}. {option.strip()}" for letter, option in zip("ABCD", options_match, strict=False)]
        question = f"{question_text}\n" + "\n".join(formatted)
    if pre:
        question = f"{pre}{question}"
    if post:
        question = f"{question}{post}"
    return question


def generation_kwargs(name: str, family: str | None = None) -> dict:
    """lmms-eval's decoding settings for benchmark ``name``: greedy, with its max_new_tokens and stop strings.

    ``max_new_tokens`` is the YAML's; TextVQA and HR-Bench name none, and lmms-eval then uses the model class's
    default (:data:`MODEL_MAX_NEW_TOKENS`, filled in when ``family`` is given; None otherwise, and for
    deepseek_vl). ``until``: the YAML's stop strings, or ``["\\n\\n"]`` that lmms-eval's TaskConfig adds when it
    names none; lmms-eval's qwen2_5_vl cuts its answer at them, its llava does not. Every task decodes greedily
    (temperature 0, one beam).
    """
    if family is not None:
        _check(name, family)
    elif name not in TASKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")
    task = TASKS[name]
    max_new_tokens = task.generation.get("max_new_tokens")
    if max_new_tokens is None and family is not None:
        max_new_tokens = MODEL_MAX_NEW_TOKENS.get(family)
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "until": list(task.generation.get("until", ["\n\n"])),
    }


# the lmms-eval model classes that cut a generated answer at the task's stop strings (its llava does not)
CUTS_AT_STOP_STRINGS = frozenset({"qwen2_5_vl"})


def final_answer(name: str, family: str, response: str) -> str:
    """The answer lmms-eval would score: ``response`` cut at the first of the task's stop strings where the
    family's lmms-eval model cuts (:data:`CUTS_AT_STOP_STRINGS`), else as generated."""
    if family not in CUTS_AT_STOP_STRINGS:
        return response
    for stop in generation_kwargs(name, family)["until"]:
        if stop:
            response = response.split(stop)[0]
    return response
