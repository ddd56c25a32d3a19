"""The paper's benchmarks (DocVQA, ChartQA, OCRBench, InfoVQA, TextVQA, V*, POPE, HR-Bench 4K/8K).

``formats`` reads each benchmark's files as they are distributed into benchmark documents, ``prompts`` builds
the question text as lmms-eval does for each model family, ``scorers`` scores answers as lmms-eval's
``process_results`` and aggregation do. A benchmark document is a dict with the keys of :data:`DOC_KEYS`.
"""

# Benchmark names as params.yaml and the artifacts spell them.
BENCHMARKS = ("docvqa", "chartqa", "ocrbench", "infovqa", "textvqa", "vstar", "pope", "hrbench4k", "hrbench8k")

# What every document holds (formats fills them, prompts and scorers read them):
#   sample_id    unique in the benchmark (the question id when that is unique, else made unique)
#   question_id  the benchmark's own id of the question, as a string
#   image        local path of the image (embedded images are written once under the image directory)
#   width/height source image size in pixels
#   question     the question as the benchmark states it (no options, no instruction)
#   answer       the single ground truth (ChartQA, POPE "yes"/"no", V* / HR-Bench option letter), else None
#   answers      all accepted answers (TextVQA's 10 annotators, DocVQA/InfoVQA/OCRBench lists), else None
#   options      the option texts in order (V*, HR-Bench), else None
#   category     what lmms-eval groups by (ChartQA type, OCRBench question_type, POPE category, V* category,
#                HR-Bench category), else None
#   subset       a second grouping (OCRBench dataset, HR-Bench cycle_category), else None
#   source       the benchmark name
DOC_KEYS = (
    "sample_id",
    "question_id",
    "image",
    "width",
    "height",
    "question",
    "answer",
    "answers",
    "options",
    "category",
    "subset",
    "source",
)
