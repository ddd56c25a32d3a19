"""dvc.yaml lists exactly what each stage runs and reads, so `dvc repro` can never skip a stale stage.

For every stage: its ``sdrpn <command>`` maps (stages/cli.py ``COMMANDS``) to a stage module; the project files
that module can run (tests/depgraph.py ``closure``), the contracts (``schemas/``) that code names and the
``params.yaml`` sections it reads must all be deps / params, and no listed project file may be one it never
runs. Model stages depend on the checkpoint directory ``${model.path}``; ``.dvcignore`` hides the files in it
that loading never reads (checked here against the embedded default).
"""

from __future__ import annotations

import ast
import fnmatch
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.cli import COMMANDS
from tests.depgraph import (
    ROOT,
    closure,
    contract_names,
    module_file,
    parameters_in_scope,
    parsed,
    rel,
    runs_code,
    schema_files,
)
from tests.dvc_project import PROJECT_DIRS, run_dvc

CODE_DIRS = ("pipeline", "stages", "schemas", "toymodels")  # project files a stage may list as deps
MODEL_DEP = "${model.path}"
# What loading a checkpoint reads (transformers' from_pretrained and our processors), by file name; everything
# else in a checkpoint directory (model card, training records, test fixtures) must be hidden by .dvcignore.
LOADED = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# stages/params.py and stages/common.py helpers that read one params.yaml section: name -> (position, keyword)
SECTION_READERS = {"section": (1, "name"), "raw_section": (1, "name"), "load_section": (1, "section")}

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC_YAML["stages"]
# the pipelines off the default path (their wdir is the project root, so their paths read as dvc.yaml's)
OTHER_STAGES = {
    f"{f.parent.name}/dvc.yaml:{name}": stage
    for f in sorted(ROOT.glob("*/dvc.yaml"))
    for name, stage in yaml.safe_load(f.read_text())["stages"].items()
}


LAUNCH_OPTIONS = {"--nnodes": "nnodes", "--nproc-per-node": "nproc_per_node", "--rdzv-endpoint": "rdzv_endpoint"}


def _launched(words: list[str], cmd: str) -> list[str]:
    """``sdrpn launch --nnodes ... <command> ...`` -> ``sdrpn <command> ...``; each launch option must be given
    params.yaml's ``compute`` value (the model stages' process count comes from there)."""
    rest = words[2:]
    while rest and rest[0].startswith("--"):
        flag, value = rest[0], rest[1]
        assert flag in LAUNCH_OPTIONS, f"cmd {cmd!r}: unknown launch option {flag}"
        assert value == f"${{compute.{LAUNCH_OPTIONS[flag]}}}", f"cmd {cmd!r}: {flag} must be compute's"
        rest = rest[2:]
    return ["sdrpn", *rest]


def _stage_module(cmd: str) -> tuple[Path, list[str]]:
    """The stage module behind ``sdrpn [launch ...] <command> ...`` and the words of ``sdrpn <command> ...``."""
    words = shlex.split(cmd)
    if words[:2] == ["sdrpn", "launch"]:  # the model stages: one process, or torchrun by params.yaml's compute
        words = _launched(words, cmd)
    assert words[:1] == ["sdrpn"] and len(words) > 1, f"cmd {cmd!r} does not run the sdrpn CLI"
    assert words[1] in COMMANDS, f"sdrpn has no command {words[1]!r} (stages/cli.py COMMANDS)"
    module = module_file(COMMANDS[words[1]].partition(":")[0])
    assert module is not None, f"{COMMANDS[words[1]]} is not a project module"
    return module, words


def _option_value(stage_module: Path, param: str, words: list[str]) -> str | None:
    """The value the command line gives the click option bound to ``param`` (else its default)."""
    for node in ast.walk(parsed(stage_module)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "option"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        names = [f for f in flags if not f.startswith("-")] or [flags[0].lstrip("-").replace("-", "_")]
        if param not in names:
            continue
        for flag in (f for f in flags if f.startswith("-")):
            if flag in words[:-1]:
                return words[words.index(flag) + 1]
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        return default.value if isinstance(default, ast.Constant) else None
    return None


def _sections_read(code: dict[Path, set[str]], stage_module: Path, words: list[str]) -> tuple[set[str], list[str]]:
    """params.yaml sections the stage code reads, and calls whose section cannot be told."""
    sections: set[str] = set()
    unknown: list[str] = []
    for path, units in code.items():
        if path.parent.name != "stages":
            continue
        tree = parsed(path)
        reached = [n for n in tree.body if not isinstance(n, ast.FunctionDef) or n.name in units]
        for node in (n for top in reached for n in ast.walk(top)):
            name = getattr(node.func, "id", getattr(node.func, "attr", None)) if isinstance(node, ast.Call) else None
            if name not in SECTION_READERS:
                continue
            pos, kw = SECTION_READERS[name]
            positional = node.args[pos] if len(node.args) > pos else None
            arg = next((k.value for k in node.keywords if k.arg == kw), positional)
            option = _option_value(path, arg.id, words) if isinstance(arg, ast.Name) and path == stage_module else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                sections.add(arg.value)
            elif option is not None:  # e.g. prepare's --section
                sections.add(option)
            elif not (isinstance(arg, ast.Name) and arg.id in parameters_in_scope(path).get(id(node), ())):
                # (a helper forwarding its own argument names nothing itself: its callers do)
                unknown.append(f"{rel(path)}:{node.lineno}: cannot tell which section `{ast.unparse(node)}` reads")
    return sections, unknown


def _listed_params(stage: dict) -> set[str]:
    """The stage's params.yaml keys (``section`` or ``section.key``)."""
    out: set[str] = set()
    for entry in stage.get("params", []):
        if isinstance(entry, str):
            out.add(entry)
        else:
            out.update(k for file, keys in entry.items() if file == "params.yaml" for k in keys or [])
    return out


def _dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def check_stage(name: str, stage: dict) -> list[str]:
    """Everything wrong with one stage's deps and params, one line each."""
    stage_module, words = _stage_module(stage["cmd"])
    code = closure(stage_module)
    if shlex.split(stage["cmd"])[:2] == ["sdrpn", "launch"]:  # the launcher's code runs the stage too
        code = {**closure(module_file("stages.launch")), **code}
    problems: list[str] = []
    # the project files the stage runs (docstring-only package __init__.py files run nothing: optional)
    required = {f for f in code if f.name != "__init__.py" or runs_code(f)}
    allowed = set(code)
    for f, units in code.items():
        contracts, unknown = contract_names(f, units)
        problems += [f"contract: {u}" for u in unknown]
        for contract in contracts:
            files = schema_files(contract)
            if not files:
                problems.append(f"contract: {rel(f)} names {contract!r}, which has no schemas/{contract}.v*.json")
            required.update(files)
    allowed |= required
    loads_model = "load_adapter" in code.get(ROOT / "pipeline/models/__init__.py", set())

    covered: set[Path] = set()
    extra: list[str] = []
    for dep in _dep_paths(stage):
        if dep == MODEL_DEP:
            if not loads_model:
                extra.append(f"{dep} (the stage loads no model)")
            continue
        if dep.startswith(MODEL_DEP):
            extra.append(f"{dep} (depend on the whole {MODEL_DEP}: see the comment atop dvc.yaml)")
            continue
        if "${" in dep or Path(dep).parts[0] not in CODE_DIRS:
            continue  # artifacts and other inputs: what connects the stages, not checked here
        path = ROOT / dep
        if path.is_dir():
            covered.update(path.rglob("*"))
            extra.append(f"{dep} (a code directory: list the files the stage uses; DVC would also hash __pycache__)")
        elif not path.is_file():
            extra.append(f"{dep} (does not exist)")
        else:
            covered.add(path)
            if path not in allowed:
                extra.append(f"{dep} (never imported or read by `{' '.join(words[:2])}`)")
    missing = sorted(rel(f) for f in required - covered)
    if loads_model and MODEL_DEP not in _dep_paths(stage):
        missing.append(f"{MODEL_DEP} (the stage loads the model)")
    problems += [f"missing dep: {m}" for m in missing] + [f"extra dep: {e}" for e in extra]

    sections, unknown = _sections_read(code, stage_module, words)
    problems += [f"params: {u}" for u in unknown]
    listed = _listed_params(stage)
    problems += [
        f"missing params: {s} (read by the stage code)"
        for s in sorted(sections)
        if not any(p == s or p.startswith(f"{s}.") for p in listed)
    ]
    problems += [
        f"extra params: {p} (the stage code never reads section {p.split('.')[0]})"
        for p in sorted(listed)
        if p.split(".")[0] not in sections
    ]
    return problems


def test_every_stage_lists_exactly_the_code_schemas_and_params_it_uses():
    assert OTHER_STAGES, "selection/dvc.yaml is missing"
    assert all(stage.get("wdir") == ".." for stage in OTHER_STAGES.values())
    report = {name: check_stage(name, stage) for name, stage in {**STAGES, **OTHER_STAGES}.items()}
    bad = {name: problems for name, problems in report.items() if problems}
    lines = [f"{name}:\n" + "\n".join(f"  {p}" for p in problems) for name, problems in bad.items()]
    assert not bad, "dvc.yaml deps/params out of step with the code:\n" + "\n".join(lines)


def _dvc_ignored(paths: list[Path]) -> set[Path]:
    """Which of ``paths`` DVC does not see (.dvcignore), asked of DVC itself."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {p for p in paths if repo.dvcignore.is_ignored_file(str(p))}


def test_model_dir_dep_is_exactly_what_loading_reads():
    """The embedded checkpoint, as DVC hashes it for ``${model.path}``: the files loading reads, nothing else."""
    model_dir = ROOT / PARAMS["model"]["path"]
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    ignored = _dvc_ignored(files)
    loaded = {p for p in files if any(fnmatch.fnmatch(p.name, pat) for pat in LOADED)}
    hashed_not_loaded = sorted(rel(p) for p in files if p not in ignored and p not in loaded)
    loaded_but_hidden = sorted(rel(p) for p in loaded & ignored)
    assert not hashed_not_loaded, f"add to .dvcignore (no stage loads them): {hashed_not_loaded}"
    assert not loaded_but_hidden, f".dvcignore hides files loading reads: {loaded_but_hidden}"
    assert model_dir / "model.safetensors" in loaded and model_dir / "config.json" in loaded


@pytest.fixture
def label_project(tmp_path: Path) -> Path:
    """The project's code and DVC files in a fresh repo, with ``label``'s data deps and outs as placeholders."""
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for dep in _dep_paths(STAGES["label"]):
        if not (tmp_path / dep).exists():
            (tmp_path / dep).mkdir(parents=True)
            (tmp_path / dep / "placeholder").write_text("attention\n")
    for out in STAGES["label"]["outs"]:
        out = out if isinstance(out, str) else next(iter(out))
        (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out).write_text("labels\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    run_dvc(tmp_path, "init", "-q")
    return tmp_path


def test_editing_label_presets_marks_label_changed(label_project: Path):
    run_dvc(label_project, "commit", "-f", "label")  # record the lock as if label had run
    assert "up to date" in run_dvc(label_project, "status", "label")
    with open(label_project / "pipeline/teacher/label_presets.py", "a") as fh:
        fh.write("# edited\n")
    out = run_dvc(label_project, "status", "label")
    assert "label:" in out and "modified:" in out and "pipeline/teacher/label_presets.py" in out, out
