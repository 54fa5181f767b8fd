"""Layers that cannot be crossed (issue 8): every import and name of the project's modules, read with ast.

The rules (all in RULES below, each with the reason it exists):

- core-no-ray: ``pipeline/`` outside ``pipeline/ray/`` (the algorithm, the models, the Learner) never
  imports ``ray``, ``actors`` or ``pipeline.ray``: it runs, and is tested, without a cluster.
- rewards-standalone: ``rewards/`` never imports ``ray``, ``actors`` or ``pipeline``: reward models can be
  used (and served in their own environment) without the trainer.
- jobs-are-entry-points: nothing outside ``jobs/`` imports ``jobs``.
- no-cycles: no import cycle among project modules, counting the imports a module runs when it is
  imported (module top, not functions, not ``if TYPE_CHECKING:``).
- flux-names-in-adapter: outside ``pipeline/models/`` (and the tiny-world builders, which write real FLUX
  folders) no module names a FLUX class or a FLUX-specific key, nor imports ``pipeline.models.flux``:
  a second family plugs in through the adapter protocol alone.
- one-tracking-facade: only ``pipeline/tracking.py`` imports ``mlflow``: one place holds the MLflow
  conventions (tracking URI, run attachment, client-side logging).
- project-imports-at-top: project modules (``pipeline``, ``rewards``, ``actors``, ``jobs``) are imported at
  module top, where a reader sees every dependency; the few exceptions are listed with their reason.

Type-only imports (``if TYPE_CHECKING:``) count for the layer rules (a reader still sees the dependency)
but not for cycles. Comments and docstrings are not code and are not read; other strings are (an error
message naming a FLUX class is FLUX-specific code).
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "actors", "rewards", "jobs")

# ------------------------------------------------------------------------------------------ the rules' data

# Names that only FLUX has: its classes, its block lists, its text/image position ids, its T5 config key.
FLUX_NAMES = frozenset({
    "FluxTransformer2DModel", "FluxPipeline", "FluxAdapter", "TextConditioning", "transformer_blocks",
    "single_transformer_blocks", "text_ids", "txt_ids", "img_ids", "T5EncoderModel", "CLIPTextModel", "d_model",
})
FLUX_IDENTIFIER = re.compile(r"^(Flux[A-Z0-9]|FLUX_)")  # FluxAttnProcessor, FLUX_DEV_SCHEDULER, ...
FLUX_IN_STRING = re.compile(r"\b(" + "|".join(sorted(FLUX_NAMES)) + r"|Flux[A-Z]\w*)\b")
FLUX_MODULE = "pipeline.models.flux"
# Modules allowed to name FLUX: the family folder, and the tiny-world builder (it writes a FLUX folder).
FLUX_HOMES = ("pipeline.models", "pipeline.tiny")
TRACKING_FACADE = "pipeline.tracking"

# (importer, imported module) -> why the import has to stay inside a function (an optional part, or
# one that must not load in some process). Keep it short; an entry that is no longer needed fails
# test_allow_list_entries_are_still_needed. (jobs/cli.py's importlib dispatch is not an import statement.)
FUNCTION_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------ reading the code


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name imported (a project submodule when `from pkg import submodule`)
    line: int
    scope: str  # "top" (runs at import), "function" (runs when called), "type_checking" (never runs)


@dataclass(frozen=True)
class Name:
    module: str
    line: int
    text: str  # the identifier, or the FLUX name a string mentions
    kind: str  # "identifier" or "string"


@dataclass
class Module:
    name: str
    path: Path
    rel: str  # the path relative to the repository root, as violations are reported
    tree: ast.Module


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Module]:
    modules = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            name = module_name(root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            modules[name] = Module(name, path, str(path.relative_to(root)), tree)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from X import ...`` (relative imports resolved against the importer)."""
    if not node.level:
        return node.module or ""
    package = mod.name.split(".") if mod.path.name == "__init__.py" else mod.name.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: Module, known: Iterable[str]) -> list[Import]:
    """Every import of ``mod`` with the scope it runs in; ``from pkg import sub`` targets ``pkg.sub``."""
    known = set(known)
    out: list[Import] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and scope == "top":
                inner = "function"
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "type_checking")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), scope)
                continue
            if isinstance(child, ast.Import):
                out.extend(Import(mod.name, a.name, child.lineno, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(mod, child)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(mod.name, sub if sub in known else base, child.lineno, inner))
            visit(child, inner)

    visit(mod.tree, "top")
    return list(dict.fromkeys(out))  # `from m import a, b` is one import of m


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def names_of(mod: Module) -> list[Name]:
    """Identifiers (names, attributes, keywords, parameters, definitions, imported names) and the FLUX
    names mentioned in string constants that are not docstrings."""
    docs = _docstring_nodes(mod.tree)
    out: list[Name] = []
    for node in ast.walk(mod.tree):
        line = getattr(node, "lineno", 0)
        idents: list[str] = []
        if isinstance(node, ast.Name):
            idents = [node.id]
        elif isinstance(node, ast.Attribute):
            idents = [node.attr]
        elif isinstance(node, ast.keyword) and node.arg:
            idents = [node.arg]
        elif isinstance(node, ast.arg):
            idents = [node.arg]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            idents = [node.name]
        elif isinstance(node, ast.alias):
            idents = [node.name.split(".")[-1]] + ([node.asname] if node.asname else [])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.extend(Name(mod.name, line, m, "string") for m in sorted(set(FLUX_IN_STRING.findall(node.value))))
        out.extend(Name(mod.name, line, i, "identifier") for i in idents)
    return out


# ------------------------------------------------------------------------------------------ the rules


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _where(mods: dict[str, Module], imp: Import) -> str:
    scope = {"top": "", "function": " (inside a function)", "type_checking": " (under TYPE_CHECKING)"}[imp.scope]
    return f"{mods[imp.importer].rel}:{imp.line}  imports {imp.target}{scope}"


def _forbidden_imports(mods: dict[str, Module], importers: Callable[[str], bool],
                       forbidden: tuple[str, ...]) -> list[str]:
    return [_where(mods, imp) for name in mods if importers(name)
            for imp in imports_of(mods[name], mods) if any(_under(imp.target, f) for f in forbidden)]


def rule_core_no_ray(mods: dict[str, Module]) -> list[str]:
    return _forbidden_imports(mods, lambda m: _under(m, "pipeline") and not _under(m, "pipeline.ray"),
                              ("ray", "actors", "pipeline.ray"))


def rule_rewards_standalone(mods: dict[str, Module]) -> list[str]:
    return _forbidden_imports(mods, lambda m: _under(m, "rewards"), ("ray", "actors", "pipeline"))


def rule_jobs_are_entry_points(mods: dict[str, Module]) -> list[str]:
    return _forbidden_imports(mods, lambda m: not _under(m, "jobs"), ("jobs",))


def import_graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    """importer -> project modules it runs at import. Importing a.b.c also runs the packages a and a.b
    (unless the importer lives inside them: they are already being initialised then)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, mod in mods.items():
        for imp in imports_of(mod, mods):
            if imp.scope != "top":
                continue
            parts = imp.target.split(".")
            for k in range(1, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in mods and target != name and not (k < len(parts) and _under(name, target)):
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, shortest)."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def rule_no_cycles(mods: dict[str, Module]) -> list[str]:
    graph = import_graph(mods)
    return [f"cycle {' -> '.join(cycle_path(graph, comp))}  (component: {', '.join(comp)})"
            for comp in strongly_connected(graph)]


def _flux_name(n: Name) -> bool:
    return n.kind == "string" or n.text in FLUX_NAMES or bool(FLUX_IDENTIFIER.match(n.text))


def rule_flux_names_in_adapter(mods: dict[str, Module]) -> list[str]:
    out = []
    for name, mod in mods.items():
        if any(_under(name, home) for home in FLUX_HOMES):
            continue
        seen = set()
        for n in names_of(mod):
            if _flux_name(n) and (n.line, n.text) not in seen:
                seen.add((n.line, n.text))
                out.append(f"{mod.rel}:{n.line}  names {n.text!r}" + (" in a string" if n.kind == "string" else ""))
        out += [_where(mods, imp) + " (use pipeline.models and the adapter protocol)"
                for imp in imports_of(mod, mods) if _under(imp.target, FLUX_MODULE)]
    return sorted(out)


def rule_one_tracking_facade(mods: dict[str, Module]) -> list[str]:
    return _forbidden_imports(mods, lambda m: m != TRACKING_FACADE, ("mlflow",))


def rule_project_imports_at_top(mods: dict[str, Module]) -> list[str]:
    return [_where(mods, imp) for name in mods for imp in imports_of(mods[name], mods)
            if imp.scope == "function" and any(_under(imp.target, p) for p in PACKAGES)
            and (imp.importer, imp.target) not in FUNCTION_IMPORTS_ALLOWED]


RULES: dict[str, tuple[str, Callable[[dict[str, Module]], list[str]]]] = {
    "core-no-ray": ("pipeline/ outside pipeline/ray/ imports neither ray, actors nor pipeline.ray", rule_core_no_ray),
    "rewards-standalone": ("rewards/ imports neither ray, actors nor pipeline", rule_rewards_standalone),
    "jobs-are-entry-points": ("nothing outside jobs/ imports jobs", rule_jobs_are_entry_points),
    "no-cycles": ("no import cycle among project modules (module-top imports)", rule_no_cycles),
    "flux-names-in-adapter": ("FLUX classes and keys are named only in pipeline/models/ (and the tiny-world "
                              "builders)", rule_flux_names_in_adapter),
    "one-tracking-facade": ("only pipeline/tracking.py imports mlflow: every MLflow call goes through one facade",
                            rule_one_tracking_facade),
    "project-imports-at-top": ("project modules are imported at module top, not inside functions (allowed: "
                               "FUNCTION_IMPORTS_ALLOWED)", rule_project_imports_at_top),
}


# ------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def project() -> dict[str, Module]:
    mods = read_modules()
    assert {m.split(".")[0] for m in mods} == set(PACKAGES), "every layer has modules to check"
    return mods


@pytest.mark.parametrize("rule", list(RULES))
def test_layer_rule(project, rule):
    description, check = RULES[rule]
    violations = check(project)
    assert not violations, (f"rule {rule!r} ({description}): {len(violations)} violation(s)\n  "
                            + "\n  ".join(violations))


def test_allow_list_entries_are_still_needed(project):
    """An allowed function-level import that is gone (or moved to the top) must leave the list too."""
    present = {(i.importer, i.target) for m in project.values() for i in imports_of(m, project) if i.scope == "function"}
    stale = sorted(set(FUNCTION_IMPORTS_ALLOWED) - present)
    assert not stale, f"FUNCTION_IMPORTS_ALLOWED lists imports that no longer exist: {stale}"


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return read_modules(root, PACKAGES)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    """The rules on a small made-up tree with one violation of each kind (and legal code beside it)."""
    mods = _write(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/ray/__init__.py": "import ray\nimport actors.a\n",
        "pipeline/core.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                            "import pipeline.other\nif TYPE_CHECKING:\n    import ray.data\n"
                            "def f():\n    '''FluxPipeline in a docstring is fine.'''\n"
                            "    from actors import a\n    return a.text_ids, 'd_model'\n",
        "pipeline/other.py": "from . import core\n",
        "pipeline/models/__init__.py": "from pipeline.models import flux\n",
        "pipeline/models/flux.py": "from pipeline.models.base import X\nclass FluxAdapter: text_ids = 1\n",
        "pipeline/models/base.py": "X = 1\n",
        "actors/__init__.py": "", "actors/a.py": "import pipeline.core\n", "actors/m.py": "import mlflow.entities\n",
        "actors/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jobs.j\n",
        "rewards/__init__.py": "", "rewards/r.py": "from pipeline.models.flux import FluxAdapter\n",
        "jobs/__init__.py": "", "jobs/j.py": "import pipeline.ray\n",
    })
    assert rule_core_no_ray(mods) == [
        "pipeline/core.py:5  imports ray.data (under TYPE_CHECKING)",
        "pipeline/core.py:8  imports actors.a (inside a function)"]
    assert rule_rewards_standalone(mods) == ["rewards/r.py:1  imports pipeline.models.flux"]
    assert rule_no_cycles(mods) == [
        "cycle pipeline.core -> pipeline.other -> pipeline.core  (component: pipeline.core, pipeline.other)"]
    flux = rule_flux_names_in_adapter(mods)
    assert "pipeline/core.py:9  names 'text_ids'" in flux and "pipeline/core.py:9  names 'd_model' in a string" in flux
    assert "rewards/r.py:1  names 'FluxAdapter'" in flux
    assert not any("docstring" in v or "models/" in v or "pipeline/core.py:7" in v for v in flux)
    assert rule_project_imports_at_top(mods) == ["pipeline/core.py:8  imports actors.a (inside a function)"]
    assert rule_jobs_are_entry_points(mods) == ["actors/b.py:3  imports jobs.j (under TYPE_CHECKING)"]
    assert rule_one_tracking_facade(mods) == ["actors/m.py:1  imports mlflow.entities"]
