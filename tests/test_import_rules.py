"""The private-name check of .ci/run (scripts/check_private_imports.py) catches what it is there to catch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from check_private_imports import violations  # noqa: E402
from moefx_imports import imports, modules  # noqa: E402


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def package(tmp_path):
    """A small moefx package: passes/ installed as moefx.passes, as in the repository."""
    return _tree(tmp_path, {
        "moefx/__init__.py": "",
        "moefx/ops.py": "_SECRET = 1\nPUBLIC = 2\n\ndef _helper():\n    return 1\n",
        "moefx/placement/__init__.py": "",
        "moefx/placement/planner.py": "def _plan():\n    return 0\n",
        "passes/__init__.py": "",
        "passes/rules.py": "def _match():\n    return 0\n",
    })


def test_a_clean_package_passes(package):
    _tree(package, {"moefx/layers.py": "from . import ops\nfrom .ops import PUBLIC\n\nx = ops.PUBLIC + PUBLIC\n"})
    assert violations(package) == []


@pytest.mark.parametrize("where, text", [
    ("moefx/layers.py", "from .ops import _helper\n"),  # relative
    ("moefx/layers.py", "from moefx.ops import _SECRET\n"),  # absolute
    ("moefx/placement/shards.py", "from .planner import _plan\n"),  # a sibling in a subpackage
    ("moefx/placement/shards.py", "from ..ops import PUBLIC, _helper\n"),  # among public names
    ("moefx/layers.py", "def f():\n    from .ops import _helper  # hidden in a function\n    return _helper()\n"),
    ("moefx/layers.py", "from . import ops\n\ny = ops._helper()\n"),  # attribute of an imported module
    ("moefx/layers.py", "import moefx.ops\n\ny = moefx.ops._SECRET\n"),  # through the package
    ("moefx/layers.py", "from moefx import placement\n\ny = placement.planner._plan\n"),  # through a subpackage
    ("passes/ffn_pass.py", "from .rules import _match\n"),  # inside moefx.passes (passes/)
    ("moefx/capture.py", "from .passes.rules import _match\n"),  # into moefx.passes from moefx/
])
def test_a_cross_module_private_name_is_caught(package, where, text):
    _tree(package, {where: text})
    found = violations(package)
    assert len(found) == 1, found
    assert found[0].startswith(f"{where}:")


def test_a_module_may_use_its_own_privates(package):
    _tree(package, {"moefx/ops.py": "def _helper():\n    return 1\n\ny = _helper()\n"})
    assert violations(package) == []


def test_passes_is_mapped_into_moefx(package):
    known = modules(package)
    assert "moefx.passes.rules" in known and "moefx.placement.planner" in known
    _tree(package, {"moefx/capture.py": "from .passes import rules\n"})
    found = [(i.importer, i.imported) for i in imports("moefx.capture", package / "moefx/capture.py", modules(package))]
    assert found == [("moefx.capture", "moefx.passes.rules")]


def test_the_script_fails_with_one_line_per_violation(package):
    _tree(package, {"moefx/layers.py": "from .ops import _helper, _SECRET\n"})
    run = subprocess.run([sys.executable, str(SCRIPTS / "check_private_imports.py"), str(package)],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stdout.count("moefx/layers.py:1:") == 1 and "_helper, _SECRET" in run.stdout


def test_the_repository_has_no_violation():
    assert violations() == []
