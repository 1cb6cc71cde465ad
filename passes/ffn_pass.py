"""The two graph passes of a conversion: find the FFNs, then rewrite them into MoE layers.

``FindFFNPass`` annotates (``node.meta["moefx.ffn"]``, ``node.meta["moefx.rule"]``) and records its results
in ``gm.meta["moefx.ffn_matches"]`` and ``gm.meta["moefx.near_misses"]``; it never modifies the graph.
``RewriteFFNPass`` replaces each match the ``bind`` callback accepts with one ``call_module`` node, then drops
the recorded matches (they hold references to the dense weights).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from .ffn_rules import FailedMatch, FFNMatch, find_linear_sites, is_ignored_user, match_ffn
from .infra import PassResult

__all__ = ["FindFFNPass", "RewriteFFNPass", "rewrite_with_layers"]


class FindFFNPass:
    """Find every pure dense FFN in the graph (see :mod:`moefx.passes.ffn_rules`)."""

    name = "find_ffn"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        sites = find_linear_sites(gm)
        by_output = {site.output: site for site in sites}
        matches: list[FFNMatch] = []
        near_misses: list[FailedMatch] = []
        claimed: set[fx.Node] = set()
        for down in sites:
            result = match_ffn(gm, down, by_output)
            if isinstance(result, FFNMatch):
                if claimed & set(result.nodes):
                    near_misses.append(FailedMatch(result.rule, f"{down.module}: shares projections with another FFN"))
                    continue
                claimed |= set(result.nodes)
                result.output.meta["moefx.ffn"] = len(matches)
                result.output.meta["moefx.rule"] = result.rule
                matches.append(result)
            elif result.interesting:
                near_misses.append(result)
        gm.meta["moefx.ffn_matches"] = matches
        gm.meta["moefx.near_misses"] = near_misses
        return PassResult(gm, modified=False)


class RewriteFFNPass:
    """Replace each FFN match with ``call_module(target, (x,))``.

    ``bind(gm, match)`` returns the target name of a module already registered on ``gm``, or None to leave
    that FFN dense.
    """

    name = "rewrite_ffn"

    def __init__(self, bind: Callable[[fx.GraphModule, FFNMatch], str | None]) -> None:
        self.bind = bind

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for match in gm.meta.get("moefx.ffn_matches", []):
            target = self.bind(gm, match)
            if target is None:
                continue
            with graph.inserting_before(match.output):
                new = graph.call_module(target, (match.input,))
            new.meta.update({k: v for k, v in match.output.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
            new.meta["moefx.moe"] = target
            match.output.replace_all_uses_with(new)
            _erase_nodes(graph, match.nodes)
            modified = True
        if modified:
            _eliminate_dead_code(graph)
            gm.delete_all_unused_submodules()
        # The matches reference the dense weights; drop them so the rewritten module does not keep them alive.
        gm.meta.pop("moefx.ffn_matches", None)
        gm.meta.pop("moefx.near_misses", None)
        return PassResult(gm, modified)


def _erase_nodes(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=lambda n: -order[n]):
        for user in list(node.users):
            if is_ignored_user(user):
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)


def _eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove nodes left without users (weights, shape arithmetic on removed nodes); keep impure ones."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "call_method", "get_attr") and not node.users and not node.is_impure():
                graph.erase_node(node)
                changed = True


def rewrite_with_layers(gm: fx.GraphModule, owner: nn.Module, layers: dict[tuple[str, ...], str]) -> bool:
    """Find the FFNs of a freshly captured ``gm`` and route them to ``owner``'s existing MoE layers.

    ``layers`` maps an FFN's projection modules (``FFNMatch.modules``) to the MoE layer's name on ``owner``.
    """
    FindFFNPass()(gm)

    def bind(graph_module: fx.GraphModule, match: FFNMatch) -> str | None:
        name = layers.get(tuple(match.modules))
        if name is None:
            return None
        graph_module.add_submodule(name, owner.get_submodule(name))
        return name

    result = RewriteFFNPass(bind)(gm)
    if result.modified:
        gm.graph.lint()
        gm.recompile()
    return result.modified
