"""The paper's result tables (Table 1: Document & OCR, Table 2: vision-centric and high-resolution) in Markdown.

One row per method; per benchmark its headline score (the paper's percent scale) with the gain over the
baseline, then the average over the table's benchmarks and the throughput relative to the baseline (the
baseline's seconds over the method's, summed over the table's benchmarks).
"""

from __future__ import annotations

TABLES = (
    ("Document & OCR (paper Table 1)", ("docvqa", "chartqa", "ocrbench", "infovqa", "textvqa")),
    ("Vision-centric & high-resolution (paper Table 2)", ("vstar", "pope", "hrbench4k", "hrbench8k")),
)
TITLES = {
    "docvqa": "DocVQA val",
    "chartqa": "ChartQA",
    "ocrbench": "OCRBench",
    "infovqa": "InfoVQA val",
    "textvqa": "TextVQA val",
    "vstar": "V*",
    "pope": "POPE",
    "hrbench4k": "HR-Bench 4K",
    "hrbench8k": "HR-Bench 8K",
}
# benchmarks whose table shows parts next to the headline, as the paper's Table 2 does: (column title, metric
# key, factor to percent), headline last
_HR_PARTS = (("FSP", "single", 100.0), ("FCP", "cross", 100.0), ("overall", "score", 1.0))
PARTS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "vstar": (
        ("attributes", "vstar_direct_attributes_acc", 1.0),
        ("spatial", "vstar_relative_position_acc", 1.0),
        ("overall", "score", 1.0),
    ),
    "hrbench4k": _HR_PARTS,
    "hrbench8k": _HR_PARTS,
}
METHOD_TITLES = {"baseline": "baseline", "sdrpn_masked": "SD-RPN (masked)", "sdrpn_box": "SD-RPN (box)"}


def _cell(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    if base is None:
        return f"{value:.1f}"
    return f"{value:.1f} ({value - base:+.1f})"


def markdown_tables(results: dict[str, dict[str, dict]]) -> str:
    """``results[benchmark][method]`` = :func:`~pipeline.benchmarks.run.score_benchmark`'s metrics -> Markdown.

    Only tables with at least one benchmark in ``results`` appear; with none, a line saying so.
    """
    out = []
    for title, names in TABLES:
        names = [n for n in names if n in results]
        if not names:
            continue
        columns = [(n, part) for n in names for part in PARTS.get(n, ((TITLES[n], "score", 1.0),))]
        header = ["method"] + [t if t == TITLES[n] else f"{TITLES[n]} {t}" for n, (t, _, _) in columns]
        header += ["avg", "throughput"] if len(names) > 1 else ["throughput"]
        methods = list(dict.fromkeys(m for n in names for m in results[n]))
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in methods:
            ref = "baseline" if method != "baseline" else None  # the baseline row shows no gain

            def value(n: str, key: str, factor: float, m: str | None) -> float | None:
                got = None if m is None else results[n].get(m, {}).get(key)
                return None if got is None else got * factor

            cells = [_cell(value(n, k, f, method), value(n, k, f, ref)) for n, (_, k, f) in columns]
            if len(names) > 1:
                avg = _average(results, names, method)
                cells.append(_cell(avg, _average(results, names, ref) if ref else None))
            cells.append(_throughput(results, names, method))
            lines.append("| " + " | ".join([METHOD_TITLES.get(method, method), *cells]) + " |")
        skipped = {n: results[n][m]["n_skipped"] for n in names for m in results[n] if results[n][m].get("n_skipped")}
        if skipped:
            lines += [
                "",
                "Unanswered (past the model's context, not scored): "
                + ", ".join(f"{TITLES[n]} {k}" for n, k in skipped.items()),
            ]
        out.append("\n".join(lines))
    if not out:
        return "No benchmark configured (params.yaml: benchmarks.sets is empty).\n"
    return "\n\n".join(out) + "\n"


def _average(results: dict[str, dict[str, dict]], names: list[str], method: str) -> float | None:
    scores = [results[n].get(method, {}).get("score") for n in names]
    return None if any(s is None for s in scores) else sum(scores) / len(scores)


def _throughput(results: dict[str, dict[str, dict]], names: list[str], method: str) -> str:
    base = sum(results[n].get("baseline", {}).get("seconds", 0.0) for n in names)
    own = sum(results[n].get(method, {}).get("seconds", 0.0) for n in names)
    return f"{base / own:.2f}x" if base > 0 and own > 0 else "-"
