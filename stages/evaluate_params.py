"""The ``evaluate`` section as every stage that runs two-stage inference reads it (no torch).

evaluate, release and inspect share it, so the settings a release records are those evaluate used.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import parse_section
from pipeline.inference.params import EvalParams
from pipeline.teacher.label_presets import label_layers
from pipeline.teacher.params import DumpParams
from stages.label import label_params
from stages.params import checked, raw_section, section

# evaluate keys that follow from the teacher's settings: the raw-attention ablation reads the label map's layers
# (label.layers / label.heads, else every layer in dump.layers) and the rows the dump captured
DERIVED = {
    "raw_attention_layers": "label.layers/label.heads/dump.layers",
    "raw_attention_last_prompt": "dump.include_last_prompt",
}


def eval_params(params_path: Path) -> EvalParams:
    """The ``evaluate`` section, with the raw-attention keys derived from ``label`` and ``dump``."""
    values = raw_section(params_path, "evaluate")
    clash = sorted(k for k in DERIVED if k in values)
    if clash:
        raise click.UsageError(
            f"{params_path}: evaluate.{clash[0]} is derived from {DERIVED[clash[0]]} so the two cannot disagree; "
            "remove it"
        )
    dump = section(params_path, "dump", DumpParams)
    derived = {
        "raw_attention_layers": label_layers(label_params(params_path), dump.layers),
        "raw_attention_last_prompt": dump.include_last_prompt,
    }
    return checked(lambda: parse_section(EvalParams, {**values, **derived}, "evaluate", complete=True), params_path)
