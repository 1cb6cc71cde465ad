"""The exceptions moefx raises for things a user can fix.

Every failure a user can act on is a :class:`MoefxError` (or a subclass): its message is one line that says
what is wrong and what to do. The CLI prints that line and exits with :attr:`MoefxError.exit_code` (2, a
usage or input error) without a traceback; anything else is a bug in moefx and exits with 1.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "CaptureError",
    "ConfigError",
    "ModelLoadError",
    "MoefxError",
    "NoFFNFoundError",
    "OutputExistsError",
    "PassError",
    "UnsafeFileError",
    "first_line",
]


class MoefxError(Exception):
    """Base class of the errors a user can act on."""

    exit_code = 2


class ConfigError(MoefxError, ValueError):
    """An invalid configuration value (MoEConfig field, CLI flag)."""


class ModelLoadError(MoefxError):
    """The model source could not be read (missing file, wrong format, broken config)."""


class UnsafeFileError(ModelLoadError):
    """Loading the file would execute code from it and the user has not opted in."""


class CalibrationError(MoefxError):
    """Calibration data that cannot be used (missing, wrong format, wrong shape or dtype for the model)."""


class CaptureError(MoefxError):
    """No tracer could capture the part of the model that holds an FFN."""


class NoFFNFoundError(MoefxError):
    """The model has no feed-forward block that moefx can convert."""


class OutputExistsError(MoefxError):
    """The output path exists and ``force`` was not given."""


class PassError(MoefxError):
    """A graph pass failed; the message names the pass and the passes that ran before it.

    This is a bug in moefx or an unsupported graph, not a user input error, hence exit code 1.
    """

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters; its type name when it has none), for
    one-line error messages that quote what failed underneath."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
