"""Every bad input of the corpus (tests/bad_inputs/cases.py), from the CLI and from the Python API.

From the CLI (the real ``python -m moefx`` in a subprocess): the expected exit code, exactly one non-empty
line on stderr that names the input, no traceback. From the API: the expected moefx exception, with a one-line
message naming the input. Both ways: nothing under the case directory or the shared assets changed (no partial
output, no temporary files, an existing output byte for byte the same, no marker from a pickle payload).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from moefx.errors import MoefxError

from bad_inputs.cases import CASES, Expect, NotWritableDirUnavailable, Workspace, build_assets

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` with the sha256 of its bytes ("dir" for directories)."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@contextlib.contextmanager
def file_size_limit(limit: int | None):
    """A full disk for this process: writing a file past ``limit`` bytes fails with EFBIG (no signal)."""
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _limit_in_child(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return preexec


@pytest.fixture
def workspace(tmp_path, assets):
    ws = Workspace(tmp_path / "case", assets)
    ws.root.mkdir()
    yield ws
    for cleanup in ws.cleanups:
        cleanup()


def _build(name: str, ws: Workspace) -> Expect | str:
    """The case's expectation, or why it cannot run here."""
    case = CASES[name]
    try:
        return case.build(ws, case.command)
    except NotWritableDirUnavailable as exc:
        return str(exc)


@dataclass
class _CliRun:
    workspace: Workspace
    want: Expect | str
    before: dict[str, str]
    result: Future | None


@pytest.fixture(scope="module")
def cli_runs(request, assets, tmp_path_factory):
    """The CLI runs of the selected cases, started together two at a time (each is mostly Python and torch
    start-up, so two in parallel halve the wall time on a 2-core machine); a test waits for its own."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and item.originalname == "test_cli"]
    pool = ThreadPoolExecutor(max_workers=2)
    runs: dict[str, _CliRun] = {}
    for index, name in enumerate(selected):
        ws = Workspace(tmp_path_factory.mktemp(f"cli{index}") / "case", assets)
        ws.root.mkdir()
        want = _build(name, ws)
        before = snapshot(ws.root, assets.root)
        runnable = isinstance(want, Expect) and want.invocation.cli is not None
        future = pool.submit(_run_cli, want, ws.root) if runnable else None
        runs[name] = _CliRun(ws, want, before, future)
    yield runs
    pool.shutdown(cancel_futures=True)
    for run in runs.values():
        for cleanup in run.workspace.cleanups:
            cleanup()


def _run_cli(want: Expect, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS), MOEFX_QUIET="1")
    return subprocess.run(
        [sys.executable, "-m", "moefx", *want.invocation.cli], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=300, preexec_fn=_limit_in_child(want.file_size_limit) if want.file_size_limit else None,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_cli(name, cli_runs):
    run = cli_runs[name]
    if run.result is None:
        pytest.skip(run.want if isinstance(run.want, str) else "no CLI form")
    want, result = run.want, run.result.result()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == want.exit_code, (result.returncode, result.stderr)
    message = lines[0]
    assert message.startswith(f"moefx {want.invocation.cli[0]}: error: "), message
    for needle in (want.names[0], *want.says, *want.cli_says):
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(run.workspace.root, run.workspace.assets.root) == run.before, "the failed run changed files"


@pytest.mark.parametrize("name", list(CASES))
def test_api(name, workspace, monkeypatch):
    want = _build(name, workspace)
    if isinstance(want, str) or want.invocation.api is None:
        pytest.skip(want if isinstance(want, str) else "no Python API form")
    before = snapshot(workspace.root, workspace.assets.root)
    monkeypatch.chdir(workspace.root)
    with file_size_limit(want.file_size_limit), pytest.raises(MoefxError) as info:
        want.invocation.api()
    error = info.value
    assert isinstance(error, want.error), f"{type(error).__name__}: {error}"
    assert error.exit_code == want.exit_code
    message = str(error)
    assert message.strip() and "\n" not in message, message
    for needle in (want.names[1], *want.says, *want.api_says):
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(workspace.root, workspace.assets.root) == before, "the failed call changed files"


def test_every_reading_command_has_cases():
    commands = {case.command for case in CASES.values()}
    assert commands == {"convert", "inspect", "export", "bench", "partition"}


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "empty.pt2").write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(TESTS), MOEFX_QUIET="1")
    result = subprocess.run([sys.executable, "-m", "moefx", "convert", "empty.pt2", "--debug"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ModelLoadError: empty.pt2: not a valid torch.export program" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt2"]
