"""The conversion pipeline: capture -> find FFNs -> select -> build experts -> rewrite -> swap back -> verify.

The first steps are :mod:`moefx.analysis` (``analyze`` is what ``moefx inspect`` shows); ``convert`` runs
them all, building the experts (:mod:`moefx.experts`), calibrating (:mod:`moefx.calibrate`) and healing
(:mod:`moefx.heal`) on the way.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .analysis import (
    Analysis,
    FoundFFN,
    NearMiss,
    find_ffns,
    is_inside,
    join_name,
    non_finite_weights,
    strip_analysis_meta,
    unchunk_ffns,
)
from .calibrate import batch_tokens, calibration_batches, ffn_forward, fit_in_order, record_ffns, swap_module
from .capture import CaptureAttempt, CapturedModule, capture_container, ghost_parameters
from .config import CALIB_TOKENS, HEAL_STEPS, MoEConfig
from .context import task_ids
from .errors import ConfigError, MoefxError, NoFFNFoundError
from .evaluate import EVAL_TOKENS, evaluate_batches
from .experts import build_moe_layer, layer_generator
from .heal import MIN_ROWS, heal_layer, heal_layers
from .inputs import default_inputs, normalize_inputs
from .layers import MoELayer
from .passes import FindFFNPass, PassManager, RewriteFFNPass
from .passes.ffn_rules import FFNMatch
from .progress import progress
from .routers import check_router_causality
from .split import check_partition

__all__ = ["ConversionInfo", "convert", "exact_tolerance"]

log = logging.getLogger("moefx")


@dataclass
class ConversionInfo:
    """What a conversion did; kept on the converted model as ``model.moefx_info`` and saved as the recipe."""

    config: MoEConfig
    layers: list[dict[str, Any]]
    near_misses: list[NearMiss]
    skipped: list[str]
    inputs: tuple[tuple, dict] | None
    verification: dict[str, Any] | None
    seconds: float
    source: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    healing: list[dict[str, Any]] | None = None
    quality: dict[str, Any] | None = None  # moefx.evaluate on calibration batches held out of the conversion

    def report(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "layers": self.layers,
            **({"healing": self.healing} if self.healing is not None else {}),
            **({"quality": self.quality} if self.quality is not None else {}),
            "not_selected": self.skipped,
            "warnings": self.warnings,
            "near_misses": [n.to_dict() for n in self.near_misses],
            "verification": self.verification,
            "seconds": round(self.seconds, 3),
        }


def convert(
    model: nn.Module,
    config: MoEConfig | None = None,
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    inplace: bool = False,
    verify: bool = True,
    initialize: bool = True,
    source: dict[str, Any] | None = None,
    calib: Any = None,
    calib_tokens: int = CALIB_TOKENS,
    tokenizer: Any = None,
    heal: bool = False,
    heal_steps: int = HEAL_STEPS,
    sequential: bool = True,
    hold_out: bool = True,
) -> nn.Module:
    """Convert the selected dense FFNs of ``model`` into MoE layers and return the converted model.

    Args:
        model: any ``nn.Module`` (a Hugging Face model keeps its class, config and ``generate``).
        config: what to build; defaults to ``MoEConfig()`` (top-2 of 8 upcycled experts).
        example_inputs: positional inputs for one sample forward pass (a tensor or a tuple). Needed to
            capture submodules that ``symbolic_trace`` cannot; Hugging Face models get dummy inputs from
            their config when none are given.
        example_kwargs: keyword inputs for the sample pass.
        inplace: convert ``model`` itself instead of a deep copy.
        verify: compare the converted model with the dense one on the example inputs (in the report).
        initialize: build expert weights with ``config.init``; ``False`` only allocates them (for loading).
        source: where the model came from (recorded in the recipe by ``moefx.save``).
        calib: calibration data for the inits that use statistics (``split``) and for ``heal``: a ``.txt``
            (one example per line), ``.pt`` or ``.safetensors`` file, a tensor or dict of tensors, or an
            iterable of batches (see :func:`moefx.calibrate.calibration_batches`). Streamed, never held whole.
        calib_tokens: at most this many input rows per FFN are kept from the calibration data (a seeded
            uniform sample), which bounds the memory calibration and healing use.
        tokenizer: the tokenizer for a text ``calib`` file (default: the Hugging Face model's own, if found).
        heal: after building the experts, fit each MoE layer to its dense FFN on the calibration data
            (:func:`moefx.heal`); needs ``calib``.
        heal_steps: Adam steps per layer when healing (0: least squares only, for split layers).
        sequential: with ``calib`` and ``init='split'``, refit each layer, in model order, on the inputs the
            layers converted before it give it (its router, then its down projections and biases by least
            squares, kept only where its held-out error drops), so that errors do not compound from layer to
            layer; ``False`` builds every layer from the dense model's inputs alone.
        hold_out: with ``calib``, every tenth calibration batch (up to 16384 tokens) is kept out of the
            conversion and the converted model is compared with the dense one on them
            (:func:`moefx.evaluate.evaluate_batches`): ``model.moefx_info.quality`` and the report say what the
            conversion costs. Data of fewer than ten batches is all used for calibration, and ``inplace``
            leaves no dense model to compare with.

    Raises:
        NoFFNFoundError: no convertible FFN (the message gives the most relevant near-miss).
        ConfigError: the layer selection matched no FFN.
    """
    start = time.perf_counter()
    config = config or MoEConfig()
    check_router_causality(model, config)
    dense_model = model
    if not inplace:
        strip_analysis_meta(model)
        model = copy.deepcopy(model)
    inputs = normalize_inputs(example_inputs, example_kwargs) or default_inputs(model)
    unchunk_ffns(model)
    analysis = find_ffns(model, inputs, config)
    if not analysis.ffns:
        raise NoFFNFoundError(_no_ffn_message(model, analysis))
    chosen = [f for f in analysis.ffns if f.selected]
    if not chosen:
        raise MoefxError(
            f"the layer selection (every={config.every}, last={config.last}, layers={config.layers!r}, "
            f"exclude={config.exclude!r}) matched none of the {len(analysis.ffns)} FFNs "
            f"({', '.join(f.name or '(root)' for f in analysis.ffns[:4])}{', ...' if len(analysis.ffns) > 4 else ''})"
        )
    warnings = non_finite_weights(chosen)
    for warning in warnings:
        log.warning("moefx: warning: %s", warning)
    if heal and calib is None:
        raise ConfigError("heal=True fits the MoE layers to the dense FFNs on calibration data; pass calib= "
                          "(--calib FILE)")
    if heal_steps < 0:
        raise ConfigError(f"heal_steps must be >= 0 (--heal-steps), got {heal_steps}")
    calibrated = calib is not None and initialize and config.init == "split"
    if initialize:
        check_partition(config, calibrated=calib is not None)
    if calib is not None and config.init != "split" and not heal:
        log.info("moefx: init=%r does not use calibration data; it is only read by init='split' and healing",
                 config.init)
    index_of = {id(f): i for i, f in enumerate(analysis.ffns)}
    by_container: dict[str, list[FoundFFN]] = {}
    for ffn in chosen:
        by_container.setdefault(ffn.container, []).append(ffn)
    layers_info: list[dict[str, Any]] = []
    rewritten: list[str] = []
    with progress(total=len(chosen), desc="building experts", unit="layer") as bar:
        for container, ffns in sorted(by_container.items(), key=lambda kv: -len(kv[0].split("."))):
            if any(c != container and is_inside(c, container) for c in rewritten):
                kept = _recapture_around_converted(model, container, ffns, warnings)
                dropped = {id(f) for f in ffns} - {id(f) for f in kept}
                chosen = [f for f in chosen if id(f) not in dropped]
                bar.update(len(ffns) - len(kept))
                if not kept:
                    continue
                ffns = kept
            new_root = _rewrite_container(model, container, ffns, config, index_of, layers_info,
                                          initialize and not calibrated, bar)
            rewritten.append(container)
            if new_root is not None:
                model = new_root
    _apply_fixups(model)
    if config.init == "split" and calib is None and initialize:
        log.info("moefx: init='split' without calibration data: neurons partitioned by %s from the weights "
                 "alone, centroid router; pass calibration data (--calib FILE) for co-activation partitions "
                 "and a fitted router", "random permutation" if config.partition == "random" else "weight clustering")
    held: list = []
    if calibrated or heal:
        batches = calibration_batches(calib, model, inputs, tokenizer=tokenizer)
        if hold_out and not inplace:
            batches = _holding_out(batches, held)
    recorded = None
    if calibrated:
        recorded = _build_calibrated(model, chosen, layers_info, config, index_of, batches, calib_tokens,
                                     sequential)
    healing = None
    by_name = {f.name: f.match for f in chosen}
    dense_ffns = {d["moe"]: by_name[d["name"]] for d in layers_info}  # each MoE layer's dense FFN
    if heal:
        # Split layers were just built from the dense inputs of each layer: heal on the same sample rather
        # than reading the data again.
        healing = heal_layers(model, dense_ffns, batches, max_tokens=calib_tokens, seed=config.seed, steps=heal_steps,
                              inputs=recorded, routers_fitted=recorded is not None)
    quality = None
    if held:
        ffns = {name: functools.partial(ffn_forward, match) for name, match in dense_ffns.items()}
        quality = evaluate_batches(model, dense_model, held, ffns=ffns, min_tokens=1,
                                   what="the held-out calibration data").to_dict()
    strip_analysis_meta(model)
    layers_info.sort(key=lambda d: d["position"])
    for d in layers_info:
        d.pop("position")
    verification = None
    if verify and inputs is not None and analysis.record is not None:
        verification = _verify(model, inputs, analysis.record.output, config)
    info = ConversionInfo(
        config=config,
        layers=layers_info,
        near_misses=analysis.near_misses,
        skipped=[f.name for f in analysis.ffns if not f.selected],
        inputs=inputs,
        verification=verification,
        seconds=time.perf_counter() - start,
        source=dict(source or {}),
        warnings=warnings,
        healing=healing,
        quality=quality,
    )
    object.__setattr__(model, "moefx_info", info)
    return model


def _build_calibrated(model: nn.Module, chosen: list[FoundFFN], layers_info: list[dict[str, Any]],
                      config: MoEConfig, index_of: dict[int, int], batches: Any,
                      max_tokens: int, sequential: bool) -> dict[str, torch.Tensor]:
    """Record each converted FFN's inputs on the calibration batches (running the dense FFNs), then build its
    MoE layer from them and put it in place of the allocated one; with ``sequential``, then refit the layers in
    order on the converted model's own inputs (:func:`_refit_in_order`). Returns each layer's inputs by name
    (the converted model's where refitted, else the dense model's), the sample healing continues from."""
    by_name = {f.name: f for f in chosen}
    targets = {}
    for d in layers_info:
        ffn = by_name[d["name"]]
        targets[d["moe"]] = (ffn.match, layer_generator(config, index_of[id(ffn)], stream=3))
    first: list = []  # the first batches, up to max_tokens real tokens, for the refit in order
    samples = record_ffns(model, targets, _keep_first(batches, first, max_tokens), max_tokens=max_tokens)
    with progress(total=len(layers_info), desc="building experts from calibration", unit="layer") as bar:
        for d in layers_info:
            ffn = by_name[d["name"]]
            layer = build_moe_layer(ffn.match, config, index_of[id(ffn)], ffn.name,
                                    calib_inputs=samples[d["moe"]].inputs)
            old = swap_module(model, d["moe"], layer)
            layer.train(old.training)
            d.update(_split_info(layer), calibration_tokens=samples[d["moe"]].tokens)
            bar.update(1)
    inputs = {name: sample.inputs for name, sample in samples.items()}
    if sequential:
        matches = {d["moe"]: by_name[d["name"]].match for d in layers_info}
        inputs.update(_refit_in_order(model, layers_info, matches, first, max_tokens, batches))
    return inputs


def _holding_out(batches: Any, held: list):
    """Yield ``batches`` but every tenth, which goes to ``held`` (up to :data:`EVAL_TOKENS` real tokens; past
    that every batch is yielded). Fewer than ten batches: all yielded, none held."""
    tokens = 0
    for i, batch in enumerate(batches):
        if i % 10 == 9 and tokens < EVAL_TOKENS:
            held.append(batch)
            tokens += batch_tokens(batch)
        else:
            yield batch


#: The refit in order runs its batches as concurrent passes (one thread each): at most this many.
MAX_SEQUENTIAL_BATCHES = 64


def _keep_first(batches: Any, kept: list, max_tokens: int):
    """Yield ``batches``, appending the first of them to ``kept`` until they hold ``max_tokens`` real tokens
    (or :data:`MAX_SEQUENTIAL_BATCHES` batches)."""
    tokens = 0
    for batch in batches:
        if tokens < max_tokens and len(kept) < MAX_SEQUENTIAL_BATCHES:
            kept.append(batch)
            tokens += batch_tokens(batch)
        yield batch


def _refit_in_order(model: nn.Module, layers_info: list[dict[str, Any]], matches: dict[str, FFNMatch],
                    batches: list, max_tokens: int, source: Any) -> dict[str, torch.Tensor]:
    """Refit every split layer, in model order, on the inputs the layers before it (already refitted) give
    it in the converted model (:func:`moefx.calibrate.fit_in_order`): router, then least squares, each kept
    only where the layer's held-out error drops (:func:`moefx.heal.heal_layer`, no gradient steps). Built from
    the dense model's inputs alone, every layer is fitted to inputs it never sees once the layers before it are
    converted, and the errors compound; refitted in order, each layer corrects for the ones before it.
    Returns the inputs each refitted layer was fitted on."""
    by_moe = {d["moe"]: d for d in layers_info}
    names = [d["moe"] for d in sorted(layers_info, key=lambda d: d["position"]) if "partition" in d]
    fitted: dict[str, torch.Tensor] = {}

    def fit(name: str, x: torch.Tensor) -> None:
        if x.shape[0] > max_tokens:  # evenly spaced rows: the fit is deterministic
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
        fitted[name] = x
        if x.shape[0] < MIN_ROWS:
            return  # too few rows to hold any out: the layer stays as built
        result = heal_layer(model.get_submodule(name), matches[name], x, steps=0, refit_router=True)
        by_moe[name]["refit"] = {"tokens": int(x.shape[0]), "error_before": result["error_before"],
                                 "error_after": result["error_after"], "kept": bool(result.get("kept"))}

    if names and batches:
        with progress(total=len(names), desc="refitting layers in order", unit="layer") as bar:
            fit_in_order(model, names, batches, lambda name, x: (fit(name, x), bar.update(1)),
                         what=getattr(source, "what", "the calibration data"))
    return fitted


def _split_info(layer: MoELayer) -> dict[str, Any]:
    partition = getattr(layer, "split_partition", None)
    if partition is None:
        return {}
    return {"partition": partition, "shared_size": 0 if layer.shared is None else layer.shared.expert_size}


def _disable_nested_tensor_fast_path(encoder: nn.Module) -> None:
    # nn.TransformerEncoder decides at construction whether its layers can take the nested-tensor fast path,
    # which reads each layer's dense linear1/linear2 weights; converted layers have none.
    encoder.use_nested_tensor = False


#: Model classes whose own code makes assumptions about their converted children, and how to fix them up.
_FIXUPS = {nn.TransformerEncoder: _disable_nested_tensor_fast_path}


def _apply_fixups(model: nn.Module) -> None:
    for module in model.modules():
        fix = _FIXUPS.get(type(module))
        if fix is not None and any(isinstance(m, (MoELayer, CapturedModule)) for m in module.modules()):
            fix(module)


def _no_ffn_message(model: nn.Module, analysis: Analysis) -> str:
    name = type(model).__name__
    if analysis.near_misses:
        miss = analysis.near_misses[0]
        more = f" (and {len(analysis.near_misses) - 1} more; run `moefx inspect` for all)" if len(analysis.near_misses) > 1 else ""
        return f"{name} has no FFN moefx can convert: {miss.where}: {miss.reason}{more}"
    return (
        f"{name} has no FFN moefx can convert: no two projections (nn.Linear or Conv1D) are joined by an "
        "activation; moefx converts Linear-activation-Linear and gated (GLU) feed-forward blocks"
    )


def _rewrite_container(model, container, ffns, config, index_of, layers_info, initialize, bar) -> nn.Module | None:
    """Rewrite one captured container and swap it into the model; returns a new root if the root changed."""
    attempt = ffns[0].attempt
    gm: fx.GraphModule = attempt.graph_module
    wanted = {id(f.match): f for f in ffns}
    # A loaded program's train/eval mode is baked into its graph (it cannot switch): its MoE layers run in eval.
    training = model.get_submodule(container).training and attempt.method != "fx.GraphModule"
    names: dict[tuple[str, ...], str] = {}
    layers: dict[str, MoELayer] = {}

    def bind(graph_module: fx.GraphModule, match: FFNMatch) -> str | None:
        ffn = wanted.get(id(match))
        if ffn is None:
            return None
        layer = build_moe_layer(match, config, index_of[id(ffn)], ffn.name, init=initialize)
        layer.train(training)
        rel = _relative(ffn.name, container)
        target = _unique_name(graph_module, f"{rel}.moe" if rel else "moe")
        graph_module.add_submodule(target, layer)
        names[tuple(match.modules)] = target
        layers[target] = layer
        bar.update(1)
        return target

    PassManager([RewriteFFNPass(bind)])(gm)
    original = model.get_submodule(container)
    replacement: nn.Module
    trivial = _trivial_layer(gm, attempt)
    if trivial is not None:
        replacement = layers[trivial]
    elif attempt.method == "torch.export":
        for ffn in ffns:
            for path in ffn.match.modules:
                ghost_parameters(original, path)
        replacement = CapturedModule(gm, attempt.key, original, names, type(original).__name__)
    else:
        replacement = gm
    for target, layer in layers.items():
        ffn = next(f for f in ffns if f.name == layer.source)
        qualname = container if replacement is layer else join_name(container, target)
        layers_info.append({
            **ffn.to_dict(),
            "moe": qualname,
            "experts": layer.num_experts,
            "expert_size": layer.experts.expert_size,
            **_split_info(layer),
            "position": ffn.position,
        })
    if not container:
        return replacement
    # Every parent that holds the module (a shared module has several) now holds the replacement.
    for parent in model.modules():
        for child, module in list(parent._modules.items()):
            if module is original:
                setattr(parent, child, replacement)
    return None


def _recapture_around_converted(model: nn.Module, container: str, ffns: list[FoundFFN],
                                warnings: list[str]) -> list[FoundFFN]:
    """Capture ``container`` again now that containers inside it hold MoE layers; returns its FFNs matched in
    the new graph (the others are left dense, with a warning).

    Its first graph was captured before those containers were converted and runs their dense FFNs inline:
    rewriting it would silently undo their conversion. A symbolic trace keeps converted layers as leaves; a
    module only ``torch.export`` can capture cannot be captured again around them, so its FFNs stay dense.
    """
    attempt = capture_container(model, container, None)
    matches = {}
    if attempt.ok:
        PassManager([FindFFNPass()])(attempt.graph_module)
        matches = {tuple(m.modules): m for m in attempt.graph_module.meta["moefx.ffn_matches"]}
    kept = []
    for ffn in ffns:
        match = matches.get(tuple(ffn.match.modules))
        if match is None:
            warning = (f"{ffn.name or '(root)'}: left dense: only torch.export captures "
                       f"{type(model.get_submodule(container)).__name__}, and not around the MoE layers now "
                       "inside it; a conversion that selects this FFN alone converts it")
            warnings.append(warning)
            log.warning("moefx: warning: %s", warning)
            continue
        ffn.match, ffn.attempt = match, attempt
        kept.append(ffn)
    return kept


def _relative(name: str, container: str) -> str:
    if not container:
        return name
    return name[len(container) + 1 :] if name.startswith(container + ".") else ""


def _unique_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while _has_attr_path(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def _has_attr_path(root: nn.Module, path: str) -> bool:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _trivial_layer(gm: fx.GraphModule, attempt: CaptureAttempt) -> str | None:
    """If the rewritten graph is just ``x -> moe -> output``, the MoE layer can replace the container."""
    nodes = [n for n in gm.graph.nodes if not (n.op == "call_module" and str(n.target).startswith("_guards_fn"))]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    calls = [n for n in nodes if n.op not in ("placeholder", "output")]
    if len(placeholders) != 1 or len(calls) != 1 or calls[0].op != "call_module":
        return None
    call = calls[0]
    if not isinstance(gm.get_submodule(call.target), MoELayer) or call.args != (placeholders[0],):
        return None
    output = nodes[-1]
    result = output.args[0]
    if isinstance(result, (tuple, list)):
        if len(result) != 1:
            return None
        result = result[0]
    if result is not call:
        return None
    if attempt.method == "torch.export":
        # The call must have been a single positional tensor returning a single tensor.
        spec = getattr(gm, "_out_spec", None)
        if spec is not None and spec.num_leaves != 1:
            return None
    return call.target


@torch.no_grad()
def _verify(model: nn.Module, inputs: tuple[tuple, dict], dense_output: Any, config: MoEConfig) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    try:
        # A task router needs task ids; task 0 is as good as any for this check.
        with task_ids(0) if config.router == "task" else contextlib.nullcontext():
            out = model(*inputs[0], **inputs[1])
    finally:
        model.train(was_training)
    dense = [t for t in pytree.tree_leaves(dense_output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    moe = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not dense or len(dense) != len(moe):
        return {"compared": False}
    a, b = dense[0].float(), moe[0].float()
    if a.shape != b.shape:
        return {"compared": False}
    if a.is_meta or b.is_meta:  # shapes only: nothing to compare
        return {"compared": False, "reason": "meta tensors (shapes checked)"}
    max_abs = float((a - b).abs().max())
    rel = max_abs / max(float(a.abs().max()), 1e-12)
    dropless = config.capacity_factor is None
    exact_expected = (config.router in ("topk", "task") and config.init == "upcycle" and config.normalize_weights
                      and dropless and config.init_noise == 0) or (
        config.init in ("split", "lora") and config.router == "topk" and dropless
        and (config.init == "lora" or config.top_k == config.num_experts))
    # "Exact" up to rounding: the MoE adds the same expert outputs in another order than the dense FFN, which
    # costs about one unit in the last place of the output's dtype (fp16 1e-3, bf16 8e-3 relative). A
    # conversion not expected to be exact (noise, random experts) is held to 1e-5 whatever the dtype: at bf16's
    # tolerance, a little init noise would pass for exact.
    tolerance = exact_tolerance(dense[0].dtype) if exact_expected else 1e-5
    return {"compared": True, "max_abs_error": max_abs, "relative_error": rel, "exact_expected": exact_expected,
            "exact": rel <= tolerance, "tolerance": tolerance}


def exact_tolerance(dtype: torch.dtype) -> float:
    """The relative error below which a conversion expected to be exact counts as exact, in ``dtype``."""
    return max(1e-5, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-5
