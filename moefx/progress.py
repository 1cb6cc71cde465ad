"""Progress bars on stderr (tqdm), switched off by ``--quiet`` / :func:`set_quiet` or a non-terminal stderr."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

__all__ = ["progress", "progress_disabled", "set_quiet"]

_state = {"quiet": None}


def set_quiet(quiet: bool | None) -> None:
    """``True``: never show bars; ``False``: always; ``None``: only when stderr is a terminal."""
    _state["quiet"] = quiet


def progress_disabled() -> bool:
    if _state["quiet"] is not None:
        return bool(_state["quiet"])
    if os.environ.get("MOEFX_QUIET"):
        return True
    return not sys.stderr.isatty()


def progress(*, total: int | None = None, desc: str = "", unit: str = "it", unit_scale: bool = False) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=progress_disabled(),
                file=sys.stderr, leave=False, dynamic_ncols=True)
