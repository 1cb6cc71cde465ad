"""The errors of expert placement and expert-parallel execution (all :class:`moefx.errors.MoefxError`)."""

from __future__ import annotations

from moefx.errors import MoefxError

__all__ = ["ExpertParallelError", "PlacementError", "PlanMismatchError", "ShardError"]


class PlacementError(MoefxError):
    """No valid placement: too many devices, not enough memory, a policy that returned a bad device."""


class PlanMismatchError(MoefxError):
    """A plan made for another model (other layers, expert counts or shapes)."""


class ShardError(MoefxError):
    """A partition directory is incomplete or damaged (missing or mismatched shard files)."""


class ExpertParallelError(MoefxError):
    """An expert-parallel collective failed: a peer rank died, hung past the timeout, or disagreed."""

    exit_code = 1
