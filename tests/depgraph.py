"""Static view of the project's code: its import graph, and what a stage's code runs and reads.

Shared by ``test_imports.py`` (no cycles) and ``test_dvc_deps.py`` (dvc.yaml lists what each stage runs).
Everything is read by AST, never imported: the answer must not depend on what happens to be installed, and
finding torch in a closure must not cost importing it.

Two granularities:

* :func:`import_graph` is file to file, every import at any depth (what can form an import cycle);
* :func:`closure` follows what a stage can actually run. A module's top level always runs when it is
  imported, but a top-level function's body runs only if something uses that function, so the imports
  inside a function count only when the function is reachable from the stage: from the names the stage's
  code imports, through the names each reached function refers to. That is what lets ``stages/common.py``
  import ``pipeline.models`` (torch) inside the one helper the model stages call without every stage
  depending on the model code. Classes count as a whole (a method's imports count whenever the class is
  reachable), and ``import x`` (rather than ``from x import f``) reaches all of ``x``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's importable code; anything else (numpy, torch, ...) is outside the graph.
PACKAGES = ("pipeline", "stages", "toymodels")

# Functions that name a contract (schemas/<name>.v<N>.json) and the position / keyword of that name.
CONTRACT_ARGS: dict[str, tuple[int, str]] = {
    "load_schema": (0, "name"),
    "read_parquet": (1, "schema_name"),
    "write_parquet": (2, "schema_name"),
}

MODULE = ""  # name of the unit holding a module's top-level code (always runs on import)
Request = frozenset[str] | None  # symbols of a module something uses; None = all of it
# What one import statement takes from one module: ((symbol, name it is bound to), ...); None = the whole module;
# symbol "" = the module itself (``from pkg import submodule``), used whole if its name is.
Taken = tuple[tuple[str, str], ...] | None


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file that defines module ``name`` (``pkg/__init__.py`` for a package), or None outside the project."""
    if not name or name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    """Dotted name of a project file (``pipeline/io/__init__.py`` -> ``pipeline.io``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> list[Path]:
    """Every Python file of the project's packages."""
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path, root: Path = ROOT) -> str:
    """``path`` relative to ``root``, as dvc.yaml writes it."""
    return path.relative_to(root).as_posix()


@cache
def parsed(path: Path) -> ast.Module:
    """``path``'s syntax tree (cached: node ids key several lookups)."""
    return ast.parse(path.read_text(), filename=str(path))


def _package_of(path: Path, root: Path) -> str:
    me = module_name(path, root)
    return me if path.name == "__init__.py" else me.rpartition(".")[0]


def _resolve(node: ast.Import | ast.ImportFrom, path: Path, root: Path) -> list[tuple[str, Taken]]:
    """The project modules one import statement runs, each with what it takes from them.

    ``from x import y as z`` takes ``(y, z)`` from ``x`` and, when ``y`` is a submodule, ``x.y`` whole;
    ``import x.y`` and ``from x import *`` take all of the module. Relative imports resolve against ``path``.
    """
    if isinstance(node, ast.Import):
        out: list[tuple[str, Taken]] = [(alias.name, None) for alias in node.names]
    else:
        if node.level:
            parts = _package_of(path, root).split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        taken = tuple((a.name, a.asname or a.name) for a in node.names)
        out = [(f"{base}.{a}", (("", b),)) for a, b in taken if module_file(f"{base}.{a}", root)]
        star = any(a == "*" for a, _ in taken)
        out.append((base, None if star else tuple((a, b) for a, b in taken if not module_file(f"{base}.{a}", root))))
    return [(name, t) for name, t in out if module_file(name, root)]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never executed, so their imports run nothing)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imported_names(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of the project modules ``path`` imports, at any depth (inside functions too)."""
    skip = _type_checking_only(parsed(path))
    return {
        name
        for node in ast.walk(parsed(path))
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip
        for name, _ in _resolve(node, path, root)
    }


def _packages_of(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b]``: the packages Python initialises before ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(path: Path, root: Path = ROOT) -> set[Path]:
    """Files whose top level runs because ``path`` imports something (at any depth).

    Importing ``a.b.c`` runs ``a/__init__.py``, ``a/b/__init__.py`` and ``a/b/c.py``; packages that enclose
    ``path`` itself are left out, since they already ran (or are running) before ``path`` could: counting them
    would make every package ``__init__`` that imports its own submodules look like a cycle.
    """
    me = module_name(path, root)
    mine = {*_packages_of(me), me}
    out = {
        f
        for name in imported_names(path, root)
        for mod in [*_packages_of(name), name]
        if mod not in mine and (f := module_file(mod, root)) is not None
    }
    out.discard(path)
    return out


def import_graph(root: Path = ROOT) -> dict[Path, set[Path]]:
    """file -> files its imports run, over the whole project."""
    return {p: import_edges(p, root) for p in project_files(root)}


def find_cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (iterative DFS)."""
    state: dict[Path, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[Path, Iterator[Path]]] = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


# --- what a stage runs ---------------------------------------------------------------------------------


@dataclass
class _Unit:
    """A module's top-level code, or one top-level function's body."""

    refs: set[str] = field(default_factory=set)  # names it refers to
    imports: list[tuple[str, Taken]] = field(default_factory=list)
    contract_calls: list[ast.Call] = field(default_factory=list)


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _collect(nodes: list[ast.AST], unit: _Unit, path: Path, root: Path, skip: set[int]) -> None:
    for top in nodes:
        for node in ast.walk(top):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Name):
                unit.refs.add(node.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                unit.imports.extend(_resolve(node, path, root))
            elif isinstance(node, ast.Call) and _call_name(node) in CONTRACT_ARGS:
                unit.contract_calls.append(node)


@cache
def _units(path: Path, root: Path = ROOT) -> dict[str, _Unit]:
    """``path`` split into its top-level code (:data:`MODULE`) and one unit per top-level function body.

    A function's decorators, defaults and annotations run at import time, so they belong to the top level.
    """
    tree = parsed(path)
    skip = _type_checking_only(tree)
    units = {MODULE: _Unit()}
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            a = stmt.args
            header = [*stmt.decorator_list, *a.defaults, *(d for d in a.kw_defaults if d is not None)]
            header += [x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs] if x.annotation]
            header += [stmt.returns] if stmt.returns else []
            _collect(header, units[MODULE], path, root, skip)
            units[stmt.name] = _Unit()
            _collect(stmt.body, units[stmt.name], path, root, skip)
        else:
            _collect([stmt], units[MODULE], path, root, skip)
    return units


def _reached(path: Path, request: Request, root: Path) -> set[str]:
    """The units of ``path`` that run when ``request`` (None: anything) of it is used."""
    units = _units(path, root)
    if request is None:
        return set(units)
    todo = [MODULE, *(s for s in request if s in units)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(r for r in units[name].refs if r in units and r not in seen)
    return seen


def closure(start: Path, root: Path = ROOT) -> dict[Path, set[str]]:
    """Every project file that runs when the stage module ``start`` runs, with the units of it that can run.

    Every unit of ``start`` counts; the ``__init__.py`` of every package on the way (``start``'s own included)
    runs its top level.
    """
    requests: dict[Path, Request] = {}
    todo: list[Path] = []

    def want(mod: str, syms: Request) -> None:
        for pkg in _packages_of(mod):
            want_file(module_file(pkg, root), frozenset())
        want_file(module_file(mod, root), syms)

    def want_file(f: Path | None, syms: Request) -> None:
        if f is None:
            return
        if f in requests:
            old = requests[f]
            new = None if old is None or syms is None else old | syms
            if new == old:
                return
        else:
            new = syms
        requests[f] = new
        todo.append(f)

    # all of the stage module runs, but what it imports counts only where it is used (not as a re-export)
    want(module_name(start, root), frozenset(_units(start, root)))
    while todo:
        f = todo.pop()
        req = requests[f]
        units = _units(f, root)
        reached = _reached(f, req, root)
        # a name an import binds is used if reached code refers to it, or someone takes it from here (re-export)
        used = set().union(*(units[u].refs for u in reached)) | set(req or ())
        for unit in reached:
            for mod, taken in units[unit].imports:
                if taken is None or req is None or any(sym == "" and bound in used for sym, bound in taken):
                    want(mod, None)
                else:
                    want(mod, frozenset(sym for sym, bound in taken if sym and bound in used))
    return {f: _reached(f, req, root) for f, req in requests.items()}


def runs_code(path: Path) -> bool:
    """Whether importing ``path`` executes anything beyond a docstring and ``from __future__`` imports."""
    for stmt in parsed(path).body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            continue
        return True
    return False


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "literal"`` assignments (how a module names its own contract once)."""
    out: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            out.update({t.id: stmt.value.value for t in stmt.targets if isinstance(t, ast.Name)})
    return out


@cache
def parameters_in_scope(path: Path) -> dict[int, frozenset[str]]:
    """id(node) -> parameter names of the functions enclosing it (to tell a forwarded contract name)."""
    out: dict[int, set[str]] = {}
    for fn in ast.walk(parsed(path)):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = fn.args
            names = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None}
            for node in ast.walk(fn):
                out.setdefault(id(node), set()).update(names)
    return {k: frozenset(v) for k, v in out.items()}


def contract_names(path: Path, units: set[str] | None = None, root: Path = ROOT) -> tuple[set[str], list[str]]:
    """The contracts the ``units`` of ``path`` (None: all) read or write, and the calls it cannot tell.

    A contract is named by a string literal, or a module-level string constant, passed to one of
    :data:`CONTRACT_ARGS`. A function forwarding its own parameter (``read_parquet`` calling
    ``load_schema(schema_name)``) names nothing itself: its callers do. Anything else is reported, so a new
    way of naming a contract cannot slip past the dependency test.
    """
    constants = _string_constants(parsed(path))
    in_scope = parameters_in_scope(path)
    all_units = _units(path, root)
    names: set[str] = set()
    unknown: list[str] = []
    for unit in sorted(all_units if units is None else units):
        for call in all_units[unit].contract_calls:
            pos, kw = CONTRACT_ARGS[_call_name(call)]
            positional = call.args[pos] if len(call.args) > pos else None
            arg = next((k.value for k in call.keywords if k.arg == kw), positional)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in constants:
                names.add(constants[arg.id])
            elif not (isinstance(arg, ast.Name) and arg.id in in_scope.get(id(call), ())):
                where = f"{rel(path, root)}:{call.lineno}"
                unknown.append(f"{where}: cannot tell which contract `{ast.unparse(call)}` uses")
    return names, unknown


def schema_files(name: str, root: Path = ROOT) -> list[Path]:
    """``schemas/<name>.v<N>.json``: load_schema globs them all and reads the newest, so each is a dependency."""
    return sorted((root / "schemas").glob(f"{name}.v*.json"))
