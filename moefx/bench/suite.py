"""``run_bench``: a converted model against its dense source (or one ONNX file), in torch and ONNX Runtime.

For a moefx output directory the suite rebuilds the dense source model (same architecture; the weights do
not change the timing), loads the converted model, exports both to ONNX (the MoE model fused, unfused, and with
per-expert gather + MatMul: ``export_onnx(gather_experts=True)``), and for every thread count, sequence length
and batch size times, round-robin in one process:

* the whole models: dense and MoE in torch eager, dense in ORT, MoE in ORT fused, unfused and gather;
* one FFN alone: the first converted layer's dense FFN module against its MoE layer, same runtimes.

FLOPs and parameters are counted from what each model executes (:mod:`moefx.bench.counting`); the
realised speed-up (dense p50 / MoE p50) is reported against the ideal one (dense FLOPs / MoE active FLOPs).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import set_mode
from ..errors import ConfigError, ModelLoadError, MoefxError, first_line
from ..layers import MoELayer
from ..progress import progress
from ..saving import load, read_recipe
from ..sources import rebuild_source
from ..tasks import task_context
from .counting import count_onnx, count_torch
from .report import BenchReport, Measurement, Speedup
from .runners import (
    export_dense_onnx,
    onnx_feed,
    ort_runner,
    ort_session,
    synthesize_inputs,
    synthesize_onnx_feed,
    tensor_leaves,
    torch_runner,
    torch_threads,
)
from .timing import interleaved, peak_memory

__all__ = ["RUNTIMES", "run_bench"]

#: Runtimes a converted model can be benchmarked in.
RUNTIMES = ("torch", "ort-fused", "ort-unfused", "ort-gather")
_EXPORT_BATCH, _EXPORT_SEQ = 2, 5  # export sizes: >= 2 and unlike other dims, so the axes stay dynamic


def _check_sizes(name: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    if not values:
        raise ConfigError(f"{name}: give at least one value")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v <= 0]
    if bad:
        raise ConfigError(f"{name}: {bad[0]!r} is not a positive integer")
    return values


def run_bench(
    source: str | Path,
    *,
    batches: Sequence[int] = (1, 8),
    seqs: Sequence[int] = (128,),
    threads: Sequence[int] = (1,),
    runtimes: Sequence[str] = RUNTIMES,
    ffn: bool = True,
    min_seconds: float = 0.5,
    rounds: int = 5,
    trust_remote_code: bool = False,
    seed: int = 0,
    task_id: int | None = None,
) -> BenchReport:
    """Benchmark a moefx output directory (converted vs dense) or an ONNX file (ORT only).

    ``task_id``: for a model with task-routed MoE layers (``router='task'``), the task whose route is timed
    (every example of a batch has it; the ONNX files take it as their ``task_ids`` input).

    Raises:
        ConfigError: a size or thread count that is not a positive integer, an unknown runtime.
        ModelLoadError: ``source`` is neither a moefx output directory nor a loadable ``.onnx`` file.
    """
    batches = _check_sizes("batch", batches)
    seqs = _check_sizes("seq", seqs)
    threads = _check_sizes("threads", threads)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ConfigError(f"runtime {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(RUNTIMES)}")
    if not min_seconds > 0:
        raise ConfigError(f"min_seconds must be positive (got {min_seconds})")
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".onnx":
        if task_id is not None:
            raise ConfigError("task_id (--task-id) applies to a moefx output directory; an ONNX file with task-routed "
                              "layers takes its task ids as the graph input 'task_ids', made up here")
        return _bench_onnx(path, batches, seqs, threads, min_seconds, rounds, seed)
    if path.is_dir() and (path / "recipe.json").exists():
        return _bench_converted(path, batches, seqs, threads, list(runtimes), ffn, min_seconds, rounds,
                                trust_remote_code, seed, task_id)
    if not path.exists():
        raise ModelLoadError(f"{source}: no such file or directory")
    raise ModelLoadError(
        f"{source}: not something moefx bench can run; pass a moefx output directory (moefx convert -o OUT) "
        "or an .onnx file (moefx export)"
    )


# -- an ONNX file ----------------------------------------------------------------------------------------


def _bench_onnx(path: Path, batches, seqs, threads, min_seconds, rounds, seed) -> BenchReport:
    try:
        import onnx  # optional: needs moefx[onnx]

        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}); is it complete? export "
                             "it again (moefx export)") from None
    if not proto.HasField("graph") or not proto.graph.node:
        # protobuf parses an empty file (and some others) as an empty model
        raise ModelLoadError(f"{path}: not a readable ONNX model (it has no graph); is it complete? export it "
                             "again (moefx export)")
    report = BenchReport(str(path))
    probe = ort_session(path, 1)
    name = path.stem
    report.costs[name] = count_onnx(str(path), synthesize_onnx_feed(probe, 1, seqs[0], seed=seed),
                                    tokens=seqs[0]).to_dict()
    cells = [(t, s, b) for t in threads for s in seqs for b in batches]
    with progress(total=len(cells), desc="bench", unit="size") as bar:
        for t, s, b in cells:
            feed = synthesize_onnx_feed(probe, b, s, seed=seed)
            with peak_memory() as mem:
                run = ort_runner(path, feed, t)
                run()
            timing = interleaved({name: run}, rounds=rounds, min_seconds=min_seconds)[name]
            report.measurements.append(_measurement(name, "ort", t, b, s, timing, mem["peak_mb"]))
            bar.update(1)
    return report


# -- a converted model against its dense source ----------------------------------------------------------


def _bench_converted(path: Path, batches, seqs, threads, runtimes, ffn, min_seconds, rounds,
                     trust_remote_code, seed, task_id) -> BenchReport:
    recipe = read_recipe(path)
    moe = load(path, trust_remote_code=trust_remote_code)
    with task_context(moe, task_id, str(path)):
        return _bench_converted_model(path, recipe, moe, batches, seqs, threads, runtimes, ffn, min_seconds,
                                      rounds, trust_remote_code, seed, task_id)


def _bench_converted_model(path, recipe, moe, batches, seqs, threads, runtimes, ffn, min_seconds, rounds,
                           trust_remote_code, seed, task_id) -> BenchReport:
    moe = set_mode(moe, False)
    dense = set_mode(rebuild_source(path, recipe["source"], trust_remote_code), False)
    example = getattr(getattr(moe, "moefx_info", None), "inputs", None)
    report = BenchReport(str(path))
    use_ort = any(r.startswith("ort") for r in runtimes)

    # One FFN alone: the first converted layer against the dense module it replaced.
    ffn_pair = None
    if ffn and recipe["layers"]:
        first = recipe["layers"][0]
        try:
            layer = moe.get_submodule(first["moe"])
            dense_ffn = dense.get_submodule(first["name"])
        except AttributeError:
            layer = dense_ffn = None
        if isinstance(layer, MoELayer) and dense_ffn is not None and not _only_the_ffn(dense_ffn, _info(moe, first)):
            report.notes.append(f"FFN alone not measured: the dense FFN's projections are spread over "
                                f"{first['name']!r}, which holds more than the FFN")
        elif isinstance(layer, MoELayer) and dense_ffn is not None and _callable_on_hidden(dense_ffn, first):
            ffn_pair = (first, dense_ffn, layer)
        else:
            report.notes.append(f"FFN alone not measured: the dense FFN {first['name']!r} is not a module that "
                                "maps [batch, seq, hidden] to [batch, seq, hidden]")

    for s in seqs:
        for b in batches:
            _check_runs(path, dense, example, b, s, seed)
    # Costs at the first batch size and each sequence length (FLOPs per token depend on the length through
    # attention, not on the batch).
    ideal: dict[tuple[str, int], float] = {}
    per_example: dict[int, float] = {}  # tokens per example of the whole model, by sequence length
    for s in seqs:
        args, kwargs = synthesize_inputs(dense, example, batches[0], s, seed=seed)
        moe_cost = count_torch(moe, args, kwargs)
        # Per token of the same count on both sides: the rows the MoE layers see.
        dense_cost = count_torch(dense, args, kwargs, ffn_modules=_dense_ffn_modules(dense, moe, recipe["layers"]),
                                 tokens=moe_cost.tokens)
        ideal[("model", s)] = dense_cost.flops_per_token / moe_cost.flops_per_token
        per_example[s] = moe_cost.tokens / batches[0]  # a ViT's patches, whatever --seq says
        if s == seqs[0]:
            report.costs["dense"] = dense_cost.to_dict()
            report.costs["moe"] = moe_cost.to_dict()
        if ffn_pair is not None:
            info, dense_ffn, layer = ffn_pair
            x = torch.randn(1, s, info["in_features"])
            d_ffn, m_ffn = count_torch(dense_ffn, (x,)), count_torch(layer, (x,))
            ideal[("ffn", s)] = d_ffn.flops_per_token / m_ffn.flops_per_token
            if s == seqs[0]:
                report.costs["ffn-dense"] = d_ffn.to_dict()
                report.costs["ffn-moe"] = m_ffn.to_dict()

    with tempfile.TemporaryDirectory(prefix="moefx-bench-") as tmp:
        files = _export_all(Path(tmp), dense, moe, example, ffn_pair, runtimes, seed) if use_ort else {}
        cells = [(t, s, b) for t in threads for s in seqs for b in batches]
        with progress(total=len(cells), desc="bench", unit="size") as bar:
            for t, s, b in cells:
                with torch_threads(t):
                    args, kwargs = synthesize_inputs(dense, example, b, s, seed=seed)
                    groups = {"model": {"dense": dense, "moe": moe}}
                    if ffn_pair is not None:
                        x = torch.randn(b, s, ffn_pair[0]["in_features"])
                        groups["ffn"] = {"dense": ffn_pair[1], "moe": ffn_pair[2]}
                    for scope, models in groups.items():
                        scope_args, scope_kwargs = (args, kwargs) if scope == "model" else ((x,), {})
                        candidates, memory = {}, {}
                        for runtime in (["torch"] if "torch" in runtimes else []) + (["ort"] if use_ort else []):
                            if runtime == "torch":
                                for name, model in models.items():
                                    with peak_memory() as mem:
                                        run = torch_runner(model, scope_args, scope_kwargs)
                                        run()
                                    candidates[(name, "torch")] = run
                                    memory[(name, "torch")] = mem["peak_mb"]
                                continue
                            for key, (file, names) in files.items():
                                if key[0] != scope:
                                    continue
                                feed = _task_feed(ort_session(file, 1), scope_args, scope_kwargs, names, task_id)
                                with peak_memory() as mem:
                                    run = ort_runner(file, feed, t)
                                    run()
                                candidates[key[1:]] = run
                                memory[key[1:]] = mem["peak_mb"]
                        timings = interleaved({f"{m}/{r}": fn for (m, r), fn in candidates.items()},
                                              rounds=rounds, min_seconds=min_seconds)
                        prefix = "" if scope == "model" else "ffn-"
                        for (m, r), _ in candidates.items():
                            tokens = round(b * per_example[s]) if scope == "model" else b * s
                            report.measurements.append(_measurement(prefix + m, r, t, b, s, timings[f"{m}/{r}"],
                                                                    memory[(m, r)], tokens))
                        report.speedups += _speedups(scope, candidates, timings, t, b, s, ideal.get((scope, s)))
                bar.update(1)
    report.notes.append("dense weights are the dense architecture rebuilt from the recipe (random weights: "
                        "timing does not depend on them)")
    report.notes.append("peak MB: resident-set growth while the runtime is set up at this size and runs once "
                        "(ORT: session with its weights; torch: activations only, weights were loaded before)")
    return report


def _check_runs(path: Path, model: nn.Module, example: Any, batch: int, seq: int, seed: int) -> None:
    """Fail in one line, before any timing, if the model does not run on inputs of this size."""
    args, kwargs = synthesize_inputs(model, example, batch, seq, seed=seed)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except MoefxError:
        raise
    except Exception as exc:
        raise MoefxError(f"{path}: the model does not run on batch {batch}, sequence {seq} ({first_line(exc)}); "
                         "pass sizes it takes with --batch and --seq: a sequence within its maximum length, or the "
                         "shapes a program exported with fixed shapes was exported at") from None


def _info(moe: nn.Module, layer: dict[str, Any]) -> dict[str, Any]:
    """The conversion's record of a recipe layer (it names the FFN's projections; the recipe does not)."""
    layers = getattr(getattr(moe, "moefx_info", None), "layers", None) or []
    return next((d for d in layers if d.get("name") == layer["name"]), layer)


def _dense_ffn_modules(dense: nn.Module, moe: nn.Module, layers: list[dict[str, Any]]) -> list[str | list[str]]:
    """What the dense model's FFN FLOPs are counted over: each FFN's projection modules (an FFN recorded under
    the module that holds it, a whole BERT layer say, is not all FFN), else its module."""
    modules = set(dict(dense.named_modules()))
    names: list[str | list[str]] = []
    for layer in layers:
        projections = _info(moe, layer).get("projections") or []
        names.append(projections if projections and set(projections) <= modules else layer["name"])
    return names


def _only_the_ffn(module: nn.Module, info: dict[str, Any]) -> bool:
    """Whether every weight of ``module`` (the FFN's recorded module) belongs to the FFN's projections."""
    projections = info.get("projections")
    if not projections:
        return True
    prefix, projections = f"{info['name']}." if info["name"] else "", set(projections)
    # a projection is a module (its weight and bias belong to it) or, for a functional FFN, a parameter
    return all(f"{prefix}{name}" in projections or f"{prefix}{name}".rpartition(".")[0] in projections
               for name, _ in module.named_parameters())


def _callable_on_hidden(module: nn.Module, info: dict[str, Any]) -> bool:
    try:
        with torch.no_grad():
            y = module(torch.randn(1, 3, info["in_features"]))
    except Exception:
        return False
    return isinstance(y, torch.Tensor) and tuple(y.shape) == (1, 3, info["out_features"])


def _export_all(tmp: Path, dense, moe, example, ffn_pair, runtimes, seed) -> dict[tuple, tuple[Path, list]]:
    """ONNX files keyed by (scope, model, runtime): dense in 'ort', the MoE side in 'ort-fused'/'-unfused'/'-gather'."""
    from ..onnx import export_onnx  # optional: needs moefx[onnx]

    files: dict[tuple, tuple[Path, list]] = {}
    args, kwargs = synthesize_inputs(dense, example, _EXPORT_BATCH, _EXPORT_SEQ, seed=seed)
    pairs = [("model", dense, moe, args, kwargs)]
    if ffn_pair is not None:
        x = torch.randn(_EXPORT_BATCH, _EXPORT_SEQ, ffn_pair[0]["in_features"])
        pairs.append(("ffn", ffn_pair[1], ffn_pair[2], (x,), {}))
    for scope, dense_model, moe_model, a, kw in pairs:
        file = tmp / f"{scope}-dense.onnx"
        names = export_dense_onnx(dense_model, a, kw, file)
        files[(scope, "dense", "ort")] = (file, names)
        for runtime in ("ort-fused", "ort-unfused", "ort-gather"):
            if runtime not in runtimes:
                continue
            file = tmp / f"{scope}-moe-{runtime}.onnx"
            report = export_onnx(moe_model, a, file, example_kwargs=kw, fused=runtime == "ort-fused", verify=False,
                                 gather_experts=runtime == "ort-gather", force=True)
            files[(scope, "moe", runtime)] = (file, [i["name"] for i in report.inputs])
    return files


def _task_feed(session, args: tuple, kwargs: dict, names: list, task_id: int | None) -> dict:
    """The ORT feed; a graph that takes task ids (an MoE side with task-routed layers) gets ``task_id`` for every
    example of the batch (or token, as the graph was exported)."""
    from ..onnx.export import TASK_IDS_INPUT  # optional: needs moefx[onnx]

    graph = {i.name: i for i in session.get_inputs()}
    if task_id is None or TASK_IDS_INPUT not in graph:
        return onnx_feed(session, args, kwargs, names)
    lead = tensor_leaves(args, kwargs)[0]
    shape = lead.shape[:len(graph[TASK_IDS_INPUT].shape)]
    return onnx_feed(session, args, {**kwargs, TASK_IDS_INPUT: torch.full(tuple(shape), task_id)},
                     [*names, TASK_IDS_INPUT] if names and TASK_IDS_INPUT not in names else names)


def _measurement(model, runtime, threads, batch, seq, timing, peak_mb, tokens: int | None = None) -> Measurement:
    """``tokens``: of the whole batch (default ``batch * seq``)."""
    tokens = batch * seq if tokens is None else tokens
    return Measurement(model, runtime, threads, batch, seq, tokens, timing.p50 * 1e3, timing.p90 * 1e3,
                       timing.p99 * 1e3, len(timing.samples), peak_mb)


def _speedups(scope, candidates, timings, t, b, s, ideal) -> list[Speedup]:
    out = []
    pairs = [("torch", ("dense", "torch"), ("moe", "torch")),
             ("ort-fused", ("dense", "ort"), ("moe", "ort-fused")),
             ("ort-unfused", ("dense", "ort"), ("moe", "ort-unfused")),
             ("ort-gather", ("dense", "ort"), ("moe", "ort-gather"))]
    for runtime, dense_key, moe_key in pairs:
        if dense_key in candidates and moe_key in candidates:
            d = timings["/".join(dense_key)].p50
            m = timings["/".join(moe_key)].p50
            out.append(Speedup(scope, runtime, t, b, s, d / m, ideal if ideal is not None else float("nan")))
    return out
