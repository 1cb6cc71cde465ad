"""Pass infrastructure: a pass maps a GraphModule to a ``PassResult``; a ``PassManager`` runs a pipeline.

Modelled on ``torch.fx.passes.infra``: a pass returns ``PassResult(graph_module, modified)``, so a pass that
changes nothing says so, and the manager names the failing pass and the passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from moefx.errors import MoefxError, PassError

__all__ = ["PassManager", "PassResult", "pass_name"]


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


GraphPass = Callable[[fx.GraphModule], PassResult]


def pass_name(p: GraphPass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


class PassManager:
    """Runs passes in order; lints the graph after each pass that modified it."""

    def __init__(self, passes: Sequence[GraphPass]) -> None:
        self.passes = list(passes)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            try:
                result = p(gm)
                if result.modified:
                    result.graph_module.graph.lint()
                    result.graph_module.recompile()
            except MoefxError:
                raise
            except Exception as exc:
                before = ", ".join(done) or "none"
                raise PassError(f"pass {pass_name(p)} failed (after: {before}): {exc}") from exc
            gm = result.graph_module
            modified = modified or result.modified
            done.append(pass_name(p))
        return PassResult(gm, modified)
