"""The package's shape, checked from its source (no imports of it): imports point down without
cycles, the project's own modules are imported at module level (lazily only where that defers a heavy
third-party package), files stay small unless their docstring says why they are one thing, and the
torch-free layers stay torch-free."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "ciard_deploy"
ROOT = "ciard_deploy"
# third-party packages too heavy (or too optional) to import before they are needed
HEAVY = {"torch", "torchvision", "onnxruntime", "onnx", "onnxconverter_common", "onnxslim", "onnxsim",
         "tensorrt", "matplotlib", "art", "autoattack", "sklearn", "scipy", "onnx2torch", "safetensors",
         "robustbench", "timm", "mlflow", "tensorboard"}
MAX_LINES = 450
ONE_FILE = "Kept as one file:"  # a long module's docstring says why it is one cohesive thing


@dataclass
class Module:
    name: str
    path: Path
    is_pkg: bool
    top: set[str] = field(default_factory=set)      # own modules imported at module level
    inner: set[str] = field(default_factory=set)    # own modules imported inside functions
    heavy_top: set[str] = field(default_factory=set)  # heavy third-party packages at module level
    lazy: dict[str, str] = field(default_factory=dict)  # a lazy package's name -> module table


def _modules() -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = Module(".".join(parts), path, is_pkg)
    return mods


def _targets(mods: dict[str, Module], mod: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = mod.name.split(".")
        if not mod.is_pkg:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        if sub in mods:
            out.append(sub)
        elif prefix in mods and alias.name in mods[prefix].lazy:
            out.append(mods[prefix].lazy[alias.name])
        else:
            out.append(prefix)
    return out


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            # a literal table, maybe with a comprehension (``**{name: "mod" for name in (...)}``)
            table = eval(compile(ast.Expression(node.value), "<_LAZY>", "eval"), {"__builtins__": {}})
            return {str(k): str(v) for k, v in table.items()}
    return {}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _graph() -> dict[str, Module]:
    mods = _modules()
    trees = {m.name: ast.parse(m.path.read_text()) for m in mods.values()}
    for name, tree in trees.items():
        mods[name].lazy = _lazy_table(tree)

    for name, tree in trees.items():
        mod = mods[name]

        def walk(nodes: list[ast.stmt], in_function: bool) -> None:
            for node in nodes:
                if _is_type_checking(node):
                    continue
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in _targets(mods, mod, node):
                        top_name = target.split(".")[0]
                        if top_name == ROOT:
                            while target not in mods and "." in target:
                                target = target.rsplit(".", 1)[0]
                            if target != name:
                                (mod.inner if in_function else mod.top).add(target)
                        elif top_name in HEAVY and not in_function:
                            mod.heavy_top.add(top_name)
                    continue
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    walk(node.body, True)
                    continue
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        walk([child], in_function)
                    elif isinstance(child, ast.excepthandler):
                        walk(child.body, in_function)

        walk(tree.body, False)
    return mods


GRAPH = _graph()


def _heavy(name: str, seen: set[str] | None = None) -> set[str]:
    """Heavy third-party packages importing ``name`` pulls in (module-level imports, transitively)."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    mod = GRAPH[name]
    out = set(mod.heavy_top)
    for t in mod.top:
        out |= _heavy(t, seen)
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules() -> None:
    """Module-level and in-function imports together form no cycle (a package's ``__init__`` that only
    re-exports its submodules is left out: importing a submodule runs it first by Python's rules)."""
    edges = {n: {t for t in m.top | m.inner if not GRAPH[t].is_pkg} for n, m in GRAPH.items() if not m.is_pkg}
    assert _cycles(edges) == []


def test_own_modules_imported_at_module_level() -> None:
    """An import of the project's own module inside a function is there only to defer a heavy
    third-party package (torch, onnxruntime, ...) that the importer itself does not load."""
    needless = []
    for name, mod in sorted(GRAPH.items()):
        if mod.is_pkg:
            continue
        mine = _heavy(name)
        for target in sorted(mod.inner):
            if not (_heavy(target) - mine):
                needless.append(f"{name} -> {target}")
    assert needless == []


def test_long_files_say_why_they_are_one_file() -> None:
    long = []
    for mod in GRAPH.values():
        lines = mod.path.read_text().count("\n")
        if lines > MAX_LINES and ONE_FILE not in (ast.get_docstring(ast.parse(mod.path.read_text())) or ""):
            long.append(f"{mod.path.relative_to(PKG.parent)} ({lines} lines)")
    assert long == []


@pytest.mark.parametrize("ground", ["ciard_deploy.io", "ciard_deploy.errors", "ciard_deploy.limits",
                                    "ciard_deploy.lock", "ciard_deploy.registry"])
def test_ground_floor_imports_nothing_above_it(ground: str) -> None:
    floor = {"ciard_deploy.errors", "ciard_deploy.limits", "ciard_deploy.lock", "ciard_deploy.registry",
             "ciard_deploy.io", "ciard_deploy.fingerprint", "ciard_deploy._lazy", "ciard_deploy.signals"}
    mod = GRAPH[ground]
    assert (mod.top | mod.inner) - floor == set()
