"""Fail on a moefx module that reaches into another module's private names.

A name that starts with one underscore is its module's own: another module that needs it gets a public name
(the function moves to the layer that owns it, or loses its underscore). This parses every module of the
installed package (``moefx/`` and ``passes/``, see ``scripts/moefx_imports.py``) with ``ast`` and reports

* ``from moefx.x import _name`` / ``from .x import _name`` (a private name, or a private module);
* ``import moefx.x._y``;
* attribute access through an imported module: ``ops._name``, ``moefx.x._name``.

Usage: ``python scripts/check_private_imports.py [ROOT]`` (ROOT: the repository, by default this one).
Exit status 1 with one line per violation, 0 when there is none. Runs in ``.ci/run`` before the tests.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from moefx_imports import ROOT, absolute_base, imports, is_private, modules


def _bound_modules(module: str, path: Path, tree: ast.AST, known: dict[str, Path]) -> dict[str, str]:
    """Local names bound to moefx modules by import statements: ``ops`` -> ``moefx.ops``."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is not None and alias.name in known:
                    bound[alias.asname] = alias.name  # import moefx.ops as ops
                elif alias.asname is None and alias.name.split(".")[0] in known:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]  # import moefx.ops binds moefx
        elif isinstance(node, ast.ImportFrom):
            base = absolute_base(module, path, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"  # from moefx import ops
    return bound


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """``a.b.c`` -> ``("a", ["b", "c"])``; None when the chain does not start at a name."""
    attrs: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        attrs.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    return current.id, attrs[::-1]


def violations(root: Path = ROOT) -> list[str]:
    """One line per cross-module use of a private name in the package under ``root``."""
    known = modules(root)
    found: list[str] = []
    for module, path in known.items():
        rel = path.relative_to(root)
        for imp in imports(module, path, known):
            private = [n for n in imp.names if is_private(n)]
            private_modules = [p for p in imp.imported.split(".") if is_private(p)]
            if private or private_modules:
                what = ", ".join(private) if private else imp.imported
                found.append(f"{rel}:{imp.line_number}: imports {what} from {imp.imported}: {imp.line}")
        tree = ast.parse(path.read_text(), str(path))
        bound = _bound_modules(module, path, tree, known)
        seen: set[int] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in seen:
                continue
            chain = _chain(node)
            if chain is None or chain[0] not in bound:
                continue
            # The inner Attribute nodes of this chain are the same chain, shorter: check the whole once.
            inner = node.value
            while isinstance(inner, ast.Attribute):
                seen.add(id(inner))
                inner = inner.value
            target = bound[chain[0]]
            for attr in chain[1]:
                if is_private(attr):
                    if target != module:
                        found.append(f"{rel}:{node.lineno}: uses {target}.{attr}, a private name of {target}")
                    break
                if f"{target}.{attr}" not in known:
                    break
                target = f"{target}.{attr}"
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else ROOT
    found = violations(root)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} use(s) of another module's private names; give the name a public home "
              "(see the layering in moefx/__init__.py)", file=sys.stderr)
        return 1
    print(f"private names: {len(modules(root))} modules checked, no module reaches into another's privates")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
