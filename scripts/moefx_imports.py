"""The moefx package's modules and the imports between them, as installed: ``moefx/`` plus ``passes/``.

``passes/`` is installed as ``moefx.passes`` (pyproject.toml's ``package-dir``). grimp, and so import-linter,
finds a package's modules under its own directory only, so it sees neither ``moefx.passes`` nor the imports
of it. This module lists every module with its file and resolves each import statement to the moefx modules
it names; ``scripts/check_private_imports.py`` checks those imports, and the import-linter contract types
below add ``moefx.passes`` to grimp's graph before checking (pyproject.toml's ``[tool.importlinter]``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Package -> directory, as pyproject.toml installs them (``moefx.passes`` lives in the top-level ``passes/``).
PACKAGE_DIRS = {"moefx": "moefx", "moefx.passes": "passes"}


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    imported: str  # the moefx module it names
    names: tuple[str, ...]  # the names taken from it (``from imported import a, b``); () for ``import imported``
    line_number: int
    line: str


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the installed package: dotted name -> file."""
    found: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        base = root / directory
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _known(name: str, known: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the package."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    """The imports of moefx modules in ``module`` (every statement, at any depth)."""
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        line = lines[node.lineno - 1].strip() if hasattr(node, "lineno") else ""
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, known)
                if target is not None and target != module:
                    yield Import(module, target, (), node.lineno, line)
        elif isinstance(node, ast.ImportFrom):
            base = absolute_base(module, path, node)
            whole = []  # names that are not submodules: attributes of the base module
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield Import(module, f"{base}.{alias.name}", (), node.lineno, line)
                else:
                    whole.append(alias.name)
            target = _known(base, known)
            if whole and target is not None and target != module:
                yield Import(module, target, tuple(whole) if target == base else (), node.lineno, line)


# ---------------------------------------------------------------------------------------------------------
# import-linter: the contract types that see moefx.passes
# ---------------------------------------------------------------------------------------------------------


def add_passes(graph) -> None:
    """Add ``moefx.passes`` and every import from or of it to a grimp graph built for ``moefx``."""
    known = modules()
    passes = [m for m in known if m == "moefx.passes" or m.startswith("moefx.passes.")]
    for name in passes:
        graph.add_module(name)
    for name, path in known.items():
        for imp in imports(name, path, known):
            if imp.importer in passes or imp.imported in passes:
                graph.add_import(importer=imp.importer, imported=imp.imported, line_number=imp.line_number,
                                 line_contents=imp.line)


def _with_passes(base: type) -> type:
    class Contract(base):
        def check(self, graph, verbose):
            add_passes(graph)  # each contract is checked on its own copy of the graph
            return super().check(graph, verbose)

    Contract.__name__ = Contract.__qualname__ = f"{base.__name__}WithPasses"
    return Contract


try:
    from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
    from importlinter.contracts.forbidden import ForbiddenContract
    from importlinter.contracts.layers import LayersContract
except ImportError:  # only import-linter needs the contract types; the module's helpers work without it
    pass
else:
    LayersWithPasses = _with_passes(LayersContract)
    AcyclicWithPasses = _with_passes(AcyclicSiblingsContract)
    ForbiddenWithPasses = _with_passes(ForbiddenContract)
