"""Analysis: find a model's FFNs (and the near-misses, with why) without changing it.

:func:`find_ffns` runs the first steps of a conversion: the sample pass, capture of every container that
holds an FFN, and the ``find_ffn`` pass with the FFN rules; its graphs keep the pass's annotations
(``node.meta["moefx.*"]``), which ``convert`` rewrites from and ``heal``, ``stream`` and ``layerwise`` read
the dense FFNs from. :func:`analyze` is the same for a user (``moefx.analyze``, ``moefx inspect``):
example inputs as given or made up, and the graphs cleaned of the annotations.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .capture import (
    CaptureAttempt,
    SampleRecord,
    capture_container,
    common_prefix,
    container_of,
    is_projection_module,
    projection_containers,
    record_sample_pass,
    weight_like,
)
from .config import MoEConfig, select_layers
from .inputs import default_inputs, normalize_inputs
from .passes import FindFFNPass, PassManager
from .passes.ffn_rules import FFNMatch
from .progress import progress

__all__ = [
    "Analysis",
    "FoundFFN",
    "NearMiss",
    "analyze",
    "find_ffns",
    "is_inside",
    "join_name",
    "non_finite_weights",
    "strip_analysis_meta",
    "unchunk_ffns",
]

log = logging.getLogger("moefx")


@dataclass
class FoundFFN:
    """A convertible FFN: where it is, what it is, and the capture that found it."""

    name: str  # the FFN's qualified name in the model (common prefix of its projections)
    container: str  # the captured submodule that holds it
    match: FFNMatch
    attempt: CaptureAttempt
    position: int  # order in the model
    selected: bool = False

    def to_dict(self) -> dict[str, Any]:
        m = self.match
        return {
            "name": self.name,
            "container": self.container,
            "rule": m.rule,
            "activation": m.activation,
            "gated": m.gated,
            "in_features": m.in_features,
            "hidden_features": m.hidden_features,
            "out_features": m.out_features,
            "bias": m.up_bias is not None or m.down_bias is not None,
            "dropout": m.dropout_p,
            "projections": [join_name(self.container, mod) for mod in m.modules],
            "forms": m.forms,
            "capture": self.attempt.method,
            "selected": self.selected,
        }


@dataclass
class NearMiss:
    """Something that looked like an FFN but was not converted, and why."""

    where: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason}


@dataclass
class Analysis:
    ffns: list[FoundFFN] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    attempts: dict[str, CaptureAttempt] = field(default_factory=dict)
    record: SampleRecord | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ffns": [f.to_dict() for f in self.ffns],
            "near_misses": [n.to_dict() for n in self.near_misses],
            "captures": {
                name or "(root)": {"method": a.method, "errors": a.errors} for name, a in self.attempts.items()
            },
        }


def join_name(prefix: str, name: str) -> str:
    """The qualified name of ``name`` inside the module ``prefix`` (either may be the root, "")."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def analyze(model: nn.Module, example_inputs: Any = None, *, example_kwargs: dict | None = None,
            config: MoEConfig | None = None) -> Analysis:
    """Find the model's FFNs (and near-misses) without changing it.

    ``config`` only marks which FFNs its layer selection would convert (``FoundFFN.selected``).
    """
    inputs = normalize_inputs(example_inputs, example_kwargs) or default_inputs(model)
    analysis = find_ffns(model, inputs, config)
    for attempt in analysis.attempts.values():
        if attempt.graph_module is not None:
            strip_analysis_meta(attempt.graph_module)
    return analysis


def strip_analysis_meta(gm: nn.Module) -> None:
    """Drop the find_ffn pass's results (they reference graph nodes and tensors) from a graph module."""
    for module in gm.modules():
        meta = getattr(module, "meta", None)
        if isinstance(module, fx.GraphModule) and isinstance(meta, dict):
            for key in [k for k in meta if k.startswith("moefx.")]:
                meta.pop(key)


def find_ffns(model: nn.Module, inputs: tuple[tuple, dict] | None, config: MoEConfig | None) -> Analysis:
    """Find the FFNs of ``model`` (and near-misses) on ``inputs`` (``(args, kwargs)``, or None: no sample pass).

    The analysis convert, heal, stream and layerwise share, so all of them see the same FFNs: transformers' FFN
    chunking is off meanwhile (see :func:`unchunk_ffns`), and the captured graphs keep the find_ffn pass's
    annotations (``meta["moefx.*"]``), which the rewrite needs (:func:`strip_analysis_meta` drops them).
    """
    with _ffns_unchunked(model):
        return _capture_and_match(model, inputs, config)


def _capture_and_match(model: nn.Module, inputs: tuple[tuple, dict] | None, config: MoEConfig | None) -> Analysis:
    start = time.perf_counter()
    analysis = Analysis()
    projections = weight_like(model)
    if isinstance(model, fx.GraphModule) and not any(is_projection_module(m) for m in model.modules()):
        # A program (e.g. a loaded .pt2): already one ATen graph, rewritten in place.
        attempt = CaptureAttempt("", "fx.GraphModule", model)
        analysis.attempts[""] = attempt
        _collect_matches(model, analysis, model, "", attempt, set(), {})
        _finish(analysis, config, start)
        return analysis
    if inputs is not None:
        with progress(total=1, desc="sample forward pass", unit="pass") as bar:
            analysis.record = record_sample_pass(model, *inputs)
            bar.update(1)
        pairs = analysis.record.pairs
        containers = sorted({container_of(model, [u, d]) for u, d in pairs}, key=lambda n: -len(n.split(".")))
    else:
        containers = projection_containers(model, {n: None for n in projections})
    claimed: set[int] = set()  # identities of projections already in an FFN (a shared module has many names)
    module_order = _element_order(model)
    # Then every other module holding two or more projections, with symbolic_trace only (cheap): finds FFNs
    # built from functional projections, which leave no trace in the sample pass.
    sweep = [c for c in projection_containers(model, projections) if c not in containers]
    with progress(total=len(containers) + len(sweep), desc="capturing", unit="module") as bar:
        for name in containers + sweep:
            bar.update(1)
            inside = {_identity(model, p) for p in projections if is_inside(p, name)}
            if inside and inside <= claimed:
                continue
            attempt = capture_container(model, name, analysis.record if name in containers else None)
            if name not in containers and not attempt.ok:
                continue
            analysis.attempts[name] = attempt
            if not attempt.ok:
                if inputs is not None:
                    mod = model.get_submodule(name)
                    reasons = "; ".join(f"{k}: {v}" for k, v in attempt.errors.items())
                    analysis.near_misses.append(NearMiss(
                        name or "(root)",
                        f"holds an FFN but no tracer could capture {type(mod).__name__}: {reasons}",
                    ))
                continue
            _collect_matches(model, analysis, attempt.graph_module, name, attempt, claimed, module_order)
    _finish(analysis, config, start)
    return analysis


def _chunked_ffns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules with transformers' ``chunk_size_feed_forward`` on (an FFN applied to the sequence in pieces,
    to save memory): a captured layer would hold one FFN per piece, for one MoE layer. The FFN acts on each token
    alone, so the layer computes the same with it off; its MoE layer then runs once on all the tokens."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "chunk_size_feed_forward", None), int) and module.chunk_size_feed_forward > 0]


def unchunk_ffns(model: nn.Module) -> None:
    """Turn FFN chunking off for good (see :func:`_chunked_ffns`): the model convert returns."""
    chunked = _chunked_ffns(model)
    for _, module in chunked:
        module.chunk_size_feed_forward = 0
    if chunked:
        names = [name for name, _ in chunked]
        log.info("moefx: chunk_size_feed_forward turned off in %d module(s) (%s%s): each MoE layer runs on all "
                 "tokens at once", len(names), ", ".join(names[:2]), ", ..." if len(names) > 2 else "")


@contextlib.contextmanager
def _ffns_unchunked(model: nn.Module):
    """FFN chunking off in the block, put back on exit (see :func:`_chunked_ffns`)."""
    chunked = [(module, module.chunk_size_feed_forward) for _, module in _chunked_ffns(model)]
    for module, _ in chunked:
        module.chunk_size_feed_forward = 0
    try:
        yield
    finally:
        for module, size in chunked:
            module.chunk_size_feed_forward = size


def _identity(model: nn.Module, path: str) -> int:
    """The identity of the module or parameter at ``path`` (shared modules are one FFN, not several)."""
    owner, _, leaf = path.rpartition(".")
    module = model.get_submodule(owner)
    return id(module._parameters[leaf]) if leaf in module._parameters else id(module.get_submodule(leaf))


def _collect_matches(model: nn.Module, analysis: Analysis, gm: fx.GraphModule, name: str,
                     attempt: CaptureAttempt, claimed: set[int], module_order: dict[str, int]) -> None:
    PassManager([FindFFNPass()])(gm)
    here: list[tuple[set[int], FoundFFN]] = []  # the FFNs found in this graph, by their projections' identities
    for i, match in enumerate(gm.meta["moefx.ffn_matches"]):
        modules = [join_name(name, m) for m in match.modules]
        identities = {_identity(model, m) for m in modules}
        if identities & claimed:
            again = next((found for ids, found in here if ids & identities), None)
            if again is not None and again in analysis.ffns:
                # The same FFN applied twice in one call (on pieces of its input, say): rewriting one application
                # would leave the others dense, so neither is converted.
                analysis.ffns.remove(again)
                analysis.near_misses.append(NearMiss(again.name or "(root)", (
                    f"its FFN runs more than once in one call of {join_name(name, '') or '(root)'}; moefx converts an "
                    "FFN that runs once per call (transformers' chunk_size_feed_forward is turned off for you)")))
            continue
        claimed |= identities
        position = min((module_order.get(m, math.inf) for m in modules), default=math.inf)
        if position == math.inf:  # a graph without modules: order of appearance
            position = len(module_order) + i
        found = FoundFFN(_common_module(modules), name, match, attempt, position)
        here.append((identities, found))
        analysis.ffns.append(found)
    for miss in gm.meta["moefx.near_misses"]:
        where, _, reason = miss.reason.partition(": ")
        analysis.near_misses.append(NearMiss(join_name(name, where) or "(root)", reason or where))


def _finish(analysis: Analysis, config: MoEConfig | None, start: float) -> None:
    analysis.ffns.sort(key=lambda f: f.position)
    if config is not None:
        for ffn, chosen in zip(analysis.ffns, select_layers([f.name for f in analysis.ffns], config)):
            ffn.selected = chosen
    analysis.near_misses = _dedupe(analysis.near_misses)
    analysis.seconds = time.perf_counter() - start


def _element_order(model: nn.Module) -> dict[str, int]:
    """Position of every module and parameter name in definition order."""
    order: dict[str, int] = {}
    for name, mod in model.named_modules():
        order.setdefault(name, len(order))
        for pname, _ in mod.named_parameters(recurse=False):
            order.setdefault(f"{name}.{pname}" if name else pname, len(order))
    return order


def _dedupe(items: list[NearMiss]) -> list[NearMiss]:
    seen, out = set(), []
    for item in items:
        key = (item.where, item.reason)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def is_inside(name: str, container: str) -> bool:
    """Whether the module ``name`` is ``container`` or inside it (everything is inside the root, "")."""
    return not container or name == container or name.startswith(container + ".")


def _common_module(modules: list[str]) -> str:
    prefix = common_prefix(modules)
    if prefix in modules:  # a single projection cannot be an FFN's name; use its parent
        prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    return prefix


def non_finite_weights(ffns: list[FoundFFN]) -> list[str]:
    """One warning per FFN whose dense weights hold NaN or Inf (converted as they are, and reported)."""
    warnings = []
    for ffn in ffns:
        m = ffn.match
        tensors = {"up": m.up_weight, "up bias": m.up_bias, "gate/up": m.gate_up_weight,
                   "gate/up bias": m.gate_up_bias, "down": m.down_weight, "down bias": m.down_bias}
        bad = [f"{name} ({int((~torch.isfinite(t)).sum())} values)" for name, t in tensors.items()
               if t is not None and not t.is_meta and not bool(torch.isfinite(t).all())]
        if bad:
            warnings.append(f"{ffn.name or '(root)'}: non-finite weights in {', '.join(bad)}; its experts "
                            "inherit them (check the checkpoint)")
    return warnings

