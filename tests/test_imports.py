"""Import hygiene: no import cycles in the project, and the light stages never load torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from stages.cli import COMMANDS, main
from tests.depgraph import ROOT, closure, find_cycle, import_graph, module_file, rel

HEAVY = ("torch", "transformers")
# Runs the sdrpn CLI in-process on argv[1:], then reports which heavy modules got imported.
PROBE = f"""
import sys
from stages.cli import main
code = main(sys.argv[1:], standalone_mode=False)
print("HEAVY:", ",".join(m for m in {HEAVY!r} if m in sys.modules), "EXIT:", code)
"""


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(rel(p) for p in cycle)


def test_cycle_finder_sees_function_level_relative_and_submodule_imports(tmp_path: Path):
    """The checker itself: a cycle made of a function-level relative import, a submodule import and a plain one."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""pkg"""\n')
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from pipeline.sub import c\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pipeline.a\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None
    names = {p.relative_to(tmp_path).as_posix() for p in cycle}
    assert names == {"pipeline/a.py", "pipeline/b.py", "pipeline/sub/c.py"}


def _decorated_command_name(module: Path, function: str) -> str | None:
    """The name in ``@click.command("name")`` on ``function`` in ``module`` (read by AST, nothing imported)."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "click.command" and deco.args:
                    return ast.literal_eval(deco.args[0])
    return None


def test_cli_map_names_each_stage_command():
    """Every COMMANDS entry is a click command of that name, and the group lists exactly those."""
    for name, target in COMMANDS.items():
        module, _, function = target.partition(":")
        path = module_file(module)
        assert path is not None, f"{name}: no module {module}"
        assert _decorated_command_name(path, function) == name, f"{name}: {target} is not @click.command({name!r})"
    with click.Context(main) as ctx:
        assert main.list_commands(ctx) == list(COMMANDS)


def test_light_stages_import_no_torch_statically():
    """world and label (and prepare) reach no torch-importing project module, even through function-level imports."""
    for command in ("world", "prepare", "label"):
        files = closure(module_file(COMMANDS[command].partition(":")[0]))
        assert ROOT / "pipeline/models/__init__.py" not in files, (command, sorted(rel(f) for f in files))


def _probe(*args: str, cwd: Path = ROOT) -> str:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("command", ["world", "label"])
def test_help_of_a_light_stage_loads_no_torch(command: str):
    out = _probe(command, "--help")
    assert "Usage:" in out and "HEAVY:  EXIT: 0" in out, out


def test_running_world_loads_no_torch(tmp_path: Path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["world"]["n_train"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _probe("world", str(tmp_path / "world"), "--split", "train", "--params", str(tmp_path / "params.yaml"))
    assert "HEAVY:  EXIT: None" in out, out
    assert len((tmp_path / "world" / "world.jsonl").read_text().splitlines()) == 2
