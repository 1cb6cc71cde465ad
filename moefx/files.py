"""Writing outputs safely: every file or directory moefx writes appears whole or not at all.

A directory is built in a temporary directory beside its destination (:func:`staging_dir`) and renamed into
place (:func:`atomic_output_dir`, :func:`move_into_place`); a single file is written to a temporary file and
renamed (:func:`atomic_write_text`). A write the operating system refuses (a full disk) becomes one
:class:`~moefx.errors.MoefxError` that says nothing was changed. Also :func:`read_json_file`, the one way
moefx reads its own JSON files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import MoefxError, OutputExistsError

__all__ = [
    "atomic_output_dir",
    "atomic_write_text",
    "move_into_place",
    "read_json_file",
    "staging_dir",
    "write_failure",
]


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if ``exc`` is the operating system refusing it (full disk, file-size limit,
    permissions), else None. safetensors reports such errors as ``SafetensorError("... I/O error: REASON (os
    error N)")``, not as OSError."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    match = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(exc).strip())
    if type(exc).__name__ == "SafetensorError" and match:
        return match.group(1)
    return None


def _write_failed(out: Path, reason: str) -> MoefxError:
    return MoefxError(f"{out}: writing failed ({reason}); nothing was changed (free some space or choose another "
                      "output path)")


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A new temporary directory beside ``out`` (on its file system, so that a rename publishes what is built
    there), removed on exit with whatever is still in it. A write the operating system refused inside the
    block (a full disk) becomes a :class:`MoefxError` naming ``out`` that says nothing was changed."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise MoefxError(f"{out}: cannot write to {parent} ({exc.strerror}); choose a writable output path") from None
    try:
        yield tmp
    except BaseException as exc:
        reason = write_failure(exc)
        if reason is not None:
            raise _write_failed(out, reason) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out`` in one rename.

    On any error the temporary directory is removed and an existing ``out`` is left untouched; a write the
    operating system refused (a full disk) becomes a :class:`MoefxError` that says so.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory; choose another output path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise MoefxError(f"{out}: the parent directory {parent} does not exist; create it first")
    with staging_dir(out) as tmp:
        yield tmp
        mask = _umask()
        for item in [tmp, *tmp.rglob("*")]:
            _default_mode(item, directory=item.is_dir(), mask=mask)
        move_into_place(tmp, out)


def _umask() -> int:
    """The process umask (reading it means setting it: done once per output, not once per file)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path | str, *, directory: bool, mask: int | None = None) -> None:
    """Give a staged directory or file the permissions ``mkdir``/``open`` would have (``mask``, default the
    process umask, applied): ``mkdtemp`` and ``mkstemp`` (and safetensors' writer) make them private to the
    user."""
    mask = _umask() if mask is None else mask
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``, replacing an existing ``out`` (moved aside first)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent if str(out.parent) else "."))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)  # put the existing output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def atomic_write_text(path: str | os.PathLike, text: str, *, what: str = "the file") -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a failed write (a full disk, an
    unwritable directory) leaves no partial file and an existing ``path`` untouched."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MoefxError(f"{path}: the directory {parent} for {what} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=parent)
    except OSError as exc:
        raise MoefxError(f"{path}: cannot write {what} to {parent} ({exc.strerror}); choose a writable output "
                         "path") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _default_mode(tmp, directory=False)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_failed(path, exc.strerror or str(exc)) from None


def read_json_file(path: Path, error: type[MoefxError], missing: str, fix: str = "") -> Any:
    """Parse the JSON file ``path``; a missing or malformed file raises ``error`` (``missing``, or the parse
    error followed by ``fix``)."""
    if not path.exists():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: is not valid JSON ({exc})" + (f"; {fix}" if fix else "")) from None

