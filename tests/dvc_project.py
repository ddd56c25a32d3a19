"""Shared by the DVC pipeline tests on other model families: a throwaway copy of the project, plain-records data
of mixed aspect ratios, and ``dvc`` run as the project's own interpreter runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# (width, height): 1:1, 16:9, 9:16, 3:1
SIZES = [(84, 84), (160, 90), (90, 160), (168, 56)]
QUESTIONS = ["what is in the red box ?", "what colour is the shape ?", "what is in the blue box ?"]
# what a DVC project copy needs besides dvc.yaml and params.yaml (every dvc.yaml dependency that is a folder)
PROJECT_DIRS = ("pipeline", "stages", "schemas", "presets")
WORLD = {"world", "world_eval"}  # the synthetic world: nothing depends on it once prepare reads other records


def run_dvc(project: Path, *args: str) -> str:
    """``dvc <args>`` in ``project`` (this interpreter's DVC and ``sdrpn``); fails the test on a non-zero exit."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def write_records(path: Path, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` samples cycling through SIZES, a red box on noise each, as records JSONL; returns (width, height)s."""
    rng = np.random.default_rng(seed)
    (path.parent / "img").mkdir(parents=True, exist_ok=True)
    rows, sizes = [], []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 200, (h, w, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        pixels[y0 : y0 + h // 3, x0 : x0 + w // 3] = (255, 0, 0)
        name = f"img/{path.stem}-{i}.png"
        Image.fromarray(pixels).save(path.parent / name)
        box = [x0, y0, x0 + w // 3, y0 + h // 3]
        rows.append(
            {"sample_id": f"{path.stem}-{i}", "image": name, "question": QUESTIONS[i % 3], "answer": "red", "box": box}
        )
        sizes.append((w, h))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sizes


def new_project(proj: Path, params_edit) -> None:
    """Copy the code, schemas, presets and dvc.yaml into ``proj``, write params.yaml as ``params_edit(params)`` leaves
    the project's own, and initialise git and DVC there."""
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params_edit(params)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    run_dvc(proj, "init", "-q")
