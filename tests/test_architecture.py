"""The import rules of docs/design.md, read from the source with ``ast`` (function-level lazy
imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "anoseg"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str:
    """The anoseg module an imported dotted name belongs to (``a.b.c`` -> the longest module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return name


def _imports(path: Path) -> Set[str]:
    """Every name imported anywhere in the file: ``anoseg.*`` modules (resolved) and others."""
    found: Set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(prefix + ([base] if base else []))
            found.add(_resolve(base))
            for alias in node.names:  # ``from anoseg import batch_runs`` imports a module
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    found.add(full)
    return found


GRAPH: Dict[str, Set[str]] = {
    name: {m for m in _imports(path) if m.startswith("anoseg") and m != name}
    for name, path in MODULES.items()}
ALL_IMPORTS: Dict[str, Set[str]] = {name: _imports(path) for name, path in MODULES.items()}


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_models_import_no_data_training_evaluation_or_cli():
    forbidden = ("anoseg.data", "anoseg.training", "anoseg.detector_training", "anoseg.engine",
                 "anoseg.losses", "anoseg.evaluation", "anoseg.predict", "anoseg.reporting",
                 "anoseg.threshold", "anoseg.batch_runs", "anoseg.inference", "anoseg.cli")
    bad = {name: sorted(m for m in deps if _in(m, *forbidden))
           for name, deps in GRAPH.items() if _in(name, "anoseg.models")}
    assert not any(bad.values()), bad


def test_metrics_import_no_model_code():
    deps = ALL_IMPORTS["anoseg.metrics"]
    assert not any(_in(m, "anoseg.models", "anoseg.inference", "anoseg.training",
                       "torch.nn") for m in deps), sorted(deps)
    assert {m for m in GRAPH["anoseg.metrics"]} <= {"anoseg.errors"}


def test_inference_imports_no_training():
    deps = GRAPH["anoseg.inference"]
    assert not any(_in(m, "anoseg.training", "anoseg.detector_training", "anoseg.engine",
                       "anoseg.losses", "anoseg.batch_runs", "anoseg.evaluation")
                   for m in deps), sorted(deps)


def test_nothing_imports_the_cli_or_the_scripts():
    for name, deps in ALL_IMPORTS.items():
        if not _in(name, "anoseg.cli"):
            assert not any(_in(m, "anoseg.cli") for m in deps), name
        assert not any(m == "scripts" or m.startswith("scripts.") or m in
                       ("run_categories", "run_ablations", "real_data_benchmark")
                       for m in deps), name


def test_no_import_cycles():
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH.get(name, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep in GRAPH and state.get(dep) is None:
                visit(dep)
        stack.pop()
        state[name] = 2

    for module in sorted(GRAPH):
        if state.get(module) is None:
            visit(module)


MAX_FUNCTION_LINES = 60
"""Lines of a package function, from ``def`` to its end, not counting its docstring."""

LONG_MARKER = "long:"
"""A docstring that says why its function is long contains this (any case)."""


def long_functions() -> List[str]:
    """``module.function (N lines)`` for each package function over
    :data:`MAX_FUNCTION_LINES` whose docstring gives no reason (:data:`LONG_MARKER`)."""
    found = []
    for name, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)
            lines = node.end_lineno - node.lineno + 1
            if docstring is not None:
                lines -= node.body[0].end_lineno - node.body[0].lineno + 1
            if lines > MAX_FUNCTION_LINES and LONG_MARKER not in (docstring or "").lower():
                found.append(f"{name}.{node.name} ({lines} lines)")
    return found


def test_no_long_function_without_a_reason():
    assert long_functions() == []
