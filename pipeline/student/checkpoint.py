"""The RPN checkpoint directory without torch: its file names, format check and the release copy.

A checkpoint is ``rpn.safetensors`` (the RPN's weights only) and ``rpn_config.json`` (what the weights are
for, :meth:`pipeline.student.rpn.RPN.config_dict`). A *release* is the same two files with one more config
key, ``inference``: the two-stage settings the checkpoint was evaluated with, which every entry point that
loads it uses unless told otherwise (:mod:`pipeline.inference.params`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.io.locks import atomic_path

WEIGHTS_NAME = "rpn.safetensors"
CONFIG_NAME = "rpn_config.json"
CHECKPOINT_FORMAT = "sdrpn-rpn"
CHECKPOINT_VERSION = 1


class CheckpointMismatch(ValueError):
    """An RPN checkpoint was made for another base model (or is not an RPN checkpoint)."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rpn_config.json`` of a checkpoint directory, checked to be one."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointMismatch(f"{path}: no {CONFIG_NAME}; not an RPN checkpoint")
    cfg = json.loads(file.read_text())
    if cfg.get("format") != CHECKPOINT_FORMAT or int(cfg.get("version", -1)) != CHECKPOINT_VERSION:
        raise CheckpointMismatch(
            f"{file}: format {cfg.get('format')!r} v{cfg.get('version')}, this code reads "
            f"{CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}"
        )
    return cfg


def write_release(
    rpn_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    inference: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Copy checkpoint ``rpn_dir`` to ``out_dir`` with ``inference`` (and ``extra`` keys) in its config.

    Written into a fresh, uniquely named sibling directory and renamed into place under ``out_dir``'s lock
    (:mod:`pipeline.io.locks`), so a crash or a concurrent release leaves the old release or the new one, whole.
    """
    cfg = read_config(rpn_dir)
    out = Path(out_dir)
    cfg = {**cfg, **(extra or {}), "inference": inference}
    with atomic_path(out, directory=True) as tmp:
        shutil.copyfile(Path(rpn_dir) / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
