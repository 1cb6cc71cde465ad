"""``export_onnx``: a converted model to one ONNX file, each MoE layer a single fused node where it can be.

The route is ``torch.onnx.export(dynamo=True)``: torch.export keeps every MoE layer's dispatch as one
``moefx::`` custom-op node, and :data:`moefx.onnx.translations.TRANSLATIONS` turns each into ONNX, fused
(``com.microsoft.MoE``) or in standard ops (an assigned ``moe_ffn`` as one call of a model-local
``moefx::moe_ffn_*`` ONNX function, whose FunctionProto is added to the model after export). Each translation stamps the nodes it emits with how and why it
lowered the call; after export those stamps, together with the exporter's record of the module each node came
from, give the per-layer report, and the weight-only subgraphs the translations built (interleaved gate/up
rows, transposes) are folded into initializers.

The file is written to a temporary directory beside the output, checked with ``onnx.checker`` (full check,
the ``com.microsoft.MoE`` schema registered), run once with ONNX Runtime on the example inputs, and only then
renamed into place.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import itertools
import logging
import math
import os
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from onnxscript import optimizer
from torch import nn
from torch.utils import _pytree as pytree

from ..capture import CapturedModule, FlatCall, set_mode
from ..context import current_task_ids, normalize_task_ids, traced_task_ids
from ..context import task_ids as task_ids_context  # export_onnx has a task_ids argument
from ..errors import MoefxError, OutputExistsError, first_line
from ..files import atomic_write_text, staging_dir
from ..hf import is_hf_model
from ..inputs import normalize_inputs
from ..layers import moe_layers
from ..lora import LoRAMoELayer
from ..routers import TaskRouter
from .layer_ops import export_forwards
from .report import ExportReport, LayerExport
from .schemas import MOEFX_DOMAIN, MOEFX_DOMAIN_VERSION, MS_DOMAIN, ORT_MOE_INPUTS
from .translations import (
    ATEN_TRANSLATIONS,
    MOE_FFN_FUNCTIONS,
    TRANSLATIONS,
    ExportOptions,
    Lowering,
    moe_ffn_function,
)

__all__ = ["OnnxExportError", "export_onnx"]

#: Initializer bytes above which the weights go to an external data file (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
_DISPATCH_KEY = "moefx.dispatch"
_MOE_LAYER_CLASS = "moefx.layers.MoELayer"
_SHIM_PREFIX = "mod."  # FlatCall holds the model as .mod


class OnnxExportError(MoefxError):
    """torch.onnx could not export the model, or the file it produced failed a check (a moefx bug)."""

    exit_code = 1


#: The newest standard-op opset export_onnx accepts: from 26 on, torch.onnx emits opset-23 ``Attention`` nodes
#: that onnx's checker rejects under the newer domain version.
MAX_OPSET = 25


def check_opset(opset: int | None) -> None:
    """A one-line error for an opset export_onnx cannot write (None: torch's default)."""
    if opset is not None and opset < 18:
        raise MoefxError(f"opset {opset} is too old: torch.onnx exports opset 18 or newer; pass --opset 18 or above")
    if opset is not None and opset > MAX_OPSET:
        raise MoefxError(f"opset {opset} is newer than {MAX_OPSET}, the newest torch.onnx's translations export "
                         f"correctly (newer ones fail onnx's checker); pass --opset {MAX_OPSET} or below")


def export_onnx(
    model: nn.Module,
    example_inputs: Any = None,
    path: str | os.PathLike = "model.onnx",
    *,
    example_kwargs: dict[str, Any] | None = None,
    fused: bool = True,
    exact: bool = False,
    fuse_assigned: bool = False,
    gather_experts: bool = False,
    force: bool = False,
    opset: int | None = None,
    external_data: bool | None = None,
    verify: bool = True,
    report_path: str | os.PathLike | None = None,
    task_ids: Any = None,
) -> ExportReport:
    """Export a converted model to ONNX; each MoE layer becomes one ``com.microsoft.MoE`` node where it can.

    Args:
        model: a model converted by :func:`moefx.convert` (or loaded with :func:`moefx.load`).
        example_inputs: positional inputs (a tensor or a tuple), or a dict of keyword inputs. ``None`` uses the
            inputs recorded at conversion (``model.moefx_info.inputs``). Batch and sequence sizes of 2 or more
            keep those axes dynamic.
        path: the ``.onnx`` file to write.
        example_kwargs: keyword inputs, besides positional ``example_inputs``.
        fused: translate each MoE layer to one fused node where ONNX Runtime's MoE kernel computes it; layers
            it cannot (an activation it lacks, GeGLU, capacity-limited routing) fall back to standard ops and
            the report says why. ``False``: standard ONNX ops only.
        exact: keep layers unfused where the fused kernel would approximate them (exact GELU).
        fuse_assigned: also fuse layers whose router assigns experts itself (capacity limits), feeding the
            assignment to the fused node as log-weights.
        gather_experts: lower every MoE layer to standard ops where each expert gathers its own tokens and runs
            MatMuls with constant weights, which ONNX Runtime pre-packs: faster than the fused node for
            prefill-sized inputs (its CPU kernel packs the weights on every run), exact, any ONNX runtime;
            the graph then has no com.microsoft.MoE node and several nodes per expert.
        force: replace an existing file.
        opset: ONNX opset of the standard-op domain (default: torch's default, at least 18).
        external_data: write the weights to ``<path>.data``; ``None`` does so above 1.5 GiB of weights.
        verify: run the written model once with ONNX Runtime and compare it with torch (in the report).
        report_path: also write the report as JSON there.
        task_ids: for a model with ``router="task"`` layers: example task ids, which become the graph input
            ``task_ids`` (int64): a 1-D ``[batch]`` tensor or sequence (one id per example) or a 2-D
            ``[batch, seq]`` tensor (one id per token); one int is one id per example, all equal; ``"example"``
            or ``"token"`` pick the layout and let moefx make up the ids (``arange % num_tasks``, sized from the
            first example input). ``None`` takes the ids of an enclosing ``moefx.task_ids(...)`` block, else is
            ``"example"``. Refused for a model without task-routed layers.

    Raises:
        MoefxError: the model has no MoE layers, or the output path exists (without ``force``) or cannot be
            written, or ``task_ids`` is given for a model without task-routed layers.
        OnnxExportError: torch.onnx failed on the model, or the written file failed a check.
    """
    start = time.perf_counter()
    layers = moe_layers(model)
    if not layers:
        raise MoefxError(
            f"{type(model).__name__} has no MoE layers: convert it first with moefx.convert (or `moefx convert`), "
            "then export the converted model"
        )
    check_opset(opset)
    options = ExportOptions(fused=fused, exact=exact, fuse_assigned=fuse_assigned, gather_experts=gather_experts)
    path = Path(path)
    if report_path is not None:
        report_file = Path(report_path)
        if report_file.resolve() in (path.resolve(), path.with_name(f"{path.name}.data").resolve()):
            raise MoefxError(f"{report_path}: is where the ONNX model goes; write the JSON report somewhere else")
        if not report_file.parent.is_dir():
            raise MoefxError(f"{report_path}: the directory for the JSON report does not exist; create it first")
        if report_file.exists() and not force:
            raise OutputExistsError(f"{report_path}: already exists; pass force=True to replace it")
    args, kwargs = _resolve_inputs(model, example_inputs, example_kwargs)
    notes: list[str] = []
    if _wants_no_cache(model, kwargs):
        kwargs["use_cache"] = False
        notes.append("exported with use_cache=False (no key/value cache inputs or outputs)")
    tasks = _task_ids_input(layers, task_ids, args, kwargs)
    if tasks is not None:
        per = "token ([batch, seq])" if tasks.dim() == 2 else "example ([batch])"
        notes.append(f"task-routed layers read the graph input {TASK_IDS_INPUT!r} (int64, one task id per {per}; "
                     "an id outside [0, num_tasks) fails the run)")

    with _output_staging(path, force) as staging:
        with _eval_mode(model), torch.no_grad(), _task_context(tasks):
            _prime_captured_containers(model, args, kwargs)
            reference = model(*args, **kwargs)
            onnx_model, input_names, dispatches = _torch_onnx_export(model, args, kwargs, reference, options, opset,
                                                                     tasks)
        _add_local_functions(onnx_model)
        _fold_weight_preparation(onnx_model)
        _strip_shim_prefix(onnx_model)
        layer_reports = _layer_reports(onnx_model, layers, dispatches)
        external = external_data if external_data is not None else (
            _initializer_bytes(onnx_model) > EXTERNAL_DATA_THRESHOLD)
        data_name = f"{path.name}.data" if external else None
        staged = staging / path.name
        ir.save(onnx_model, staged, external_data=data_name)
        _check(staged)
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        tensors += [tasks] if tasks is not None else []
        verification = _verify(staged, tensors, reference, input_names) if verify else None
        file_bytes = staged.stat().st_size + ((staging / data_name).stat().st_size if data_name else 0)
        _publish(staging, path, data_name)

    notes += _static_input_notes(onnx_model)
    report = ExportReport(
        path=str(path),
        data_path=str(path.with_name(data_name)) if data_name else None,
        file_bytes=file_bytes,
        opset=onnx_model.opset_imports.get("", 0),
        options={"fused": fused, "exact": exact, "fuse_assigned": fuse_assigned, "gather_experts": gather_experts},
        layers=layer_reports,
        op_counts=_op_counts(onnx_model),
        inputs=[_describe_value(v) for v in onnx_model.graph.inputs],
        outputs=[_describe_value(v) for v in onnx_model.graph.outputs],
        verification=verification,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
    if report_path is not None:
        try:
            atomic_write_text(report_path, report.to_json(), what="the JSON report")
        except MoefxError as exc:
            raise MoefxError(f"{exc} ({path} was written)") from None
    return report


# -- inputs ----------------------------------------------------------------------------------------------


def _resolve_inputs(model: nn.Module, example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        example_inputs, example_kwargs = None, {**example_inputs, **(example_kwargs or {})}
    inputs = normalize_inputs(example_inputs, example_kwargs)
    if inputs is None:
        inputs = getattr(getattr(model, "moefx_info", None), "inputs", None)
        if inputs is None:
            raise MoefxError(
                f"no example inputs for {type(model).__name__}: pass example_inputs (on the CLI, pass --inputs "
                "FILE; the model was converted without any, so none were recorded)"
            )
    args, kwargs = inputs
    return tuple(args), dict(kwargs)


def _wants_no_cache(model: nn.Module, kwargs: dict) -> bool:
    """Hugging Face models return a cache object by default, which is not a tensor output."""
    if "use_cache" in kwargs or not is_hf_model(model):
        return False
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _prime_captured_containers(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Let captured containers see, eagerly, the attention mask that torch.export will show them.

    Hugging Face models skip the attention mask in eager mode when nothing is padded but always build it under
    torch.export. A container captured at conversion (a ``CapturedModule``, e.g. ``BertLayer``) would meet
    that mask for the first time inside the export, where it cannot capture again. One eager pass with a
    padded position makes it capture that input structure now. (A workaround: remove it once
    ``CapturedModule`` can capture a new input structure while being exported.)
    """
    if not is_hf_model(model) or not any(isinstance(m, CapturedModule) for m in model.modules()):
        return
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*args, **kwargs)  # positional inputs by their names too
    except (TypeError, ValueError):
        return
    params, named = signature.parameters, bound.arguments
    padded = {}
    for ids_name, mask_name in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask")):
        ids, mask = named.get(ids_name), named.get(mask_name)
        if mask_name not in params or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            continue
        mask = torch.ones_like(ids) if mask is None else mask.clone()
        mask[0, -1] = 0
        padded[mask_name] = mask
    if padded:
        named.update(padded)
        try:
            model(*bound.args, **bound.kwargs)
        except Exception as exc:  # only a warm-up: the export reports what goes wrong
            logging.getLogger("moefx").debug("priming captured containers failed: %s", exc)


#: The graph input that carries the task ids of a model with task-routed layers.
TASK_IDS_INPUT = "task_ids"


class _TaskIdsCall(FlatCall):
    """:class:`~moefx.capture.FlatCall` whose last input is the task ids, handed to the task routers for the
    call."""

    def forward(self, *tensors: torch.Tensor):
        *inputs, ids = tensors
        with traced_task_ids(ids):  # the traced tensor itself: task_ids() would read its values
            return super().forward(*inputs)


def _task_ids_input(layers: list[tuple[str, nn.Module]], task_ids: Any, args: tuple,
                    kwargs: dict) -> torch.Tensor | None:
    """The example task ids (int64, ``[batch]`` or ``[batch, seq]``) for a model with task routers, else None."""
    routers = [layer.router for _, layer in layers if isinstance(layer.router, TaskRouter)]
    if not routers:
        if task_ids is not None:
            raise MoefxError("task_ids were given, but the model has no task-routed MoE layer (router='task')")
        return None
    ids = task_ids if task_ids is not None else current_task_ids()
    if ids is None:
        ids = "example"
    if isinstance(ids, str) and ids not in ("example", "token"):
        raise MoefxError(f"task_ids={ids!r}: give task ids, or 'example' / 'token' for one id per example / token")
    if not isinstance(ids, str):
        ids = normalize_task_ids(ids)
        if not isinstance(ids, int):
            return ids.long()
    rank = 2 if ids == "token" else 1
    first = next((leaf for leaf in pytree.tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor) and leaf.dim() >= rank), None)
    if first is None:
        raise MoefxError("cannot tell the batch (and sequence) size of the task_ids input from the example inputs: "
                         "pass task_ids as a tensor")
    if isinstance(ids, int):
        return torch.full((first.shape[0],), ids, dtype=torch.long)
    num_tasks = min(router.num_tasks for router in routers)
    return (torch.arange(math.prod(first.shape[:rank])) % num_tasks).reshape(first.shape[:rank])


@contextlib.contextmanager
def _task_context(ids: torch.Tensor | None) -> Iterator[None]:
    if ids is None:
        yield
        return
    with task_ids_context(ids):
        yield


def _named_leaves(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec, list[str]]:
    """Flatten ``(args, kwargs)``; name each leaf after the forward parameter it is (or sits in)."""
    leaves_with_path, spec = pytree.tree_flatten_with_path((args, kwargs))
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = []
    for key_path, _ in leaves_with_path:
        parts = [_key_text(k) for k in key_path[1:]]
        if key_path[0].idx == 0 and parts and parts[0].isdigit() and int(parts[0]) < len(params):
            parts[0] = params[int(parts[0])]
        names.append("_".join(parts) or "input")
    return [leaf for _, leaf in leaves_with_path], spec, _unique(names)


def _key_text(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _unique(names: list[str]) -> list[str]:
    counts = Counter(names)
    seen: Counter = Counter()
    out = []
    for name in names:
        if counts[name] > 1:
            out.append(f"{name}_{seen[name]}")
            seen[name] += 1
        else:
            out.append(name)
    return out


def _output_names(reference: Any) -> list[str] | None:
    leaves_with_path, _ = pytree.tree_flatten_with_path(reference)
    if not leaves_with_path or not all(isinstance(leaf, torch.Tensor) for _, leaf in leaves_with_path):
        return None
    names = ["_".join(_key_text(k) for k in key_path) or "output" for key_path, _ in leaves_with_path]
    return _unique([name if not name[0].isdigit() else f"output_{name}" for name in names])


# -- torch.onnx.export -----------------------------------------------------------------------------------


def export_dims(tensors: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """``torch.onnx.export``'s dynamic shapes for these inputs: batch and sequence (the first two axes) dynamic,
    the rest as in the example (a feature axis that no op ties to a weight would otherwise stay symbolic, and
    ONNX Runtime users could not tell its size)."""
    return tuple({i: torch.export.Dim.AUTO if i < 2 else torch.export.Dim.STATIC for i in range(t.dim())}
                 for t in tensors)


def _torch_onnx_export(model: nn.Module, args: tuple, kwargs: dict, reference: Any, options: ExportOptions,
                       opset: int | None, tasks: torch.Tensor | None = None,
                       ) -> tuple[ir.Model, list[str], dict[str, tuple[str, Lowering]]]:
    """``torch.onnx.export`` with the dispatch translations; also returns the input names and each dispatch
    call's ``(op, Lowering)`` by the id its nodes are stamped with. ``tasks``: the task ids, an extra last
    input (``task_ids``) that the task routers read through the ``moefx.task_ids`` context."""
    leaves, spec, names = _named_leaves(model, args, kwargs)
    tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
    input_names = [name for name, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)]
    if tasks is not None:
        tensors += (tasks,)
        input_names = _unique([*input_names, TASK_IDS_INPUT])
    dims = export_dims(tensors)
    dispatches: dict[str, tuple[str, Lowering]] = {}
    table = {**ATEN_TRANSLATIONS,
             **{op: _bind_translation(op, fn, options, dispatches) for op, fn in TRANSLATIONS.items()}}
    export_kwargs: dict[str, Any] = {}
    if opset is not None:
        export_kwargs["opset_version"] = opset
    try:
        shim = set_mode((FlatCall if tasks is None else _TaskIdsCall)(model, leaves, spec), False)
        # Fused: split layers (unit-weight top-k, shared expert, bias) become one moefx::unit_topk_moe call.
        with _quiet_torch_onnx(), (export_forwards(model) if options.fused else contextlib.nullcontext()):
            program = torch.onnx.export(
                shim, tensors, dynamo=True, custom_translation_table=table,
                dynamic_shapes=(dims,), input_names=input_names, output_names=_output_names(reference),
                verbose=False, **export_kwargs,
            )
    except Exception as exc:
        if logging.getLogger("moefx").isEnabledFor(logging.DEBUG):
            raise
        raise OnnxExportError(
            f"torch.onnx.export failed on {type(model).__name__}: {_explain_failure(exc)} "
            "(rerun with --debug for the traceback)"
        ) from exc
    return program.model, input_names, dispatches


def _explain_failure(exc: BaseException) -> str:
    """The innermost cause of a torch.onnx failure, or what to do when a known limitation caused it."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        for frame, _ in traceback.walk_tb(error.__traceback__):
            if frame.f_code.co_name == "_recapture" and Path(frame.f_code.co_filename).match("moefx/capture.py"):
                container = getattr(frame.f_locals.get("self"), "source_class", "a captured container")
                return (
                    f"{container} (captured at conversion) was called under torch.export with inputs it did not "
                    "see in the eager sample pass, and cannot be captured again while exporting (e.g. an attention "
                    "mask the eager pass skipped); convert with example inputs that include it (an attention_mask "
                    "with padding), then export"
                )
    root = chain[-1]
    return f"{type(root).__name__}: {first_line(root)}"


def _bind_translation(op_overload, fn, options: ExportOptions, dispatches: dict[str, tuple[str, Lowering]]):
    """``fn(options, *args)`` as the plain function of the op's arguments that torch.onnx calls.

    The wrapper stamps every node the translation emitted with an id under which it records the lowering.
    """
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())[1:]
    op_name = op_overload.name().replace(".default", "")
    counter = itertools.count()

    def translation(*args, **kwargs):
        bound = inspect.Signature(params).bind(*args, **kwargs)
        bound.apply_defaults()
        output, lowering = fn(options, *bound.args, **bound.kwargs)
        dispatch_id = f"{op_name}#{next(counter)}"
        dispatches[dispatch_id] = (op_name, lowering)
        arguments = {id(v) for v in pytree.tree_leaves((bound.args, bound.kwargs)) if isinstance(v, ir.Value)}
        _stamp_subgraph(output, arguments, dispatch_id)
        return output

    translation.__name__ = fn.__name__
    translation.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return translation


def _stamp_subgraph(output: ir.Value, stop: set[int], value: str) -> None:
    """Mark every node between the translation's arguments and its output."""
    stack, seen = [output], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in stop:
            continue
        node = current.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        node.metadata_props[_DISPATCH_KEY] = value
        stack.extend(node.inputs)


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    # torch.onnx logs every torchlib op it skips (torchvision) and every recoverable specialisation at WARNING;
    # the onnxscript and onnx_ir passes log every fold and deduplication at INFO.
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript",
             "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    quiet = not logging.getLogger("moefx").isEnabledFor(logging.DEBUG)
    for lg in loggers:
        if quiet:
            lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    set_mode(model, False)
    try:
        yield
    finally:
        set_mode(model, was_training)


# -- after export: functions, fold, attribute nodes to layers, count ------------------------------------------------


def _add_local_functions(model: ir.Model) -> None:
    """Give every ``moefx::moe_ffn_*`` call its FunctionProto (one per kind, shared by the layers calling it)."""
    version = model.opset_imports.get("", 18)
    for node in model.graph.all_nodes():
        if node.domain != MOEFX_DOMAIN:
            continue
        identifier = (MOEFX_DOMAIN, node.op_type, "")
        if identifier not in model.functions:
            model.functions[identifier] = moe_ffn_function(MOE_FFN_FUNCTIONS[node.op_type], version)
        model.opset_imports[MOEFX_DOMAIN] = MOEFX_DOMAIN_VERSION


def _fold_weight_preparation(model: ir.Model) -> None:
    """Fold the translations' weight-only subgraphs (gate/up interleaving, transposes) into initializers."""
    with _quiet_torch_onnx():
        optimizer.fold_constants(
            model,
            output_size_limit=2**62,
            should_fold=lambda node: True if _DISPATCH_KEY in node.metadata_props else None,
        )
        optimizer.remove_unused_nodes(model)


_LORA_LOWERING = Lowering(
    False, "standard ONNX ops: the frozen dense FFN plus every expert's rank-r adapters, masked by the routing",
    "lora layers (a shared dense FFN with routed adapters): no fused op computes them")


def _layer_reports(model: ir.Model, layers: list[tuple[str, nn.Module]],
                   dispatches: dict[str, tuple[str, Lowering]]) -> list[LayerExport]:
    """Attribute the stamped nodes to MoE layers (and name them after it); one report per layer."""
    counts: dict[str, Counter] = {key: Counter() for key in dispatches}
    owner: dict[str, str] = {}
    for node in model.graph.all_nodes():
        key = node.metadata_props.pop(_DISPATCH_KEY, None)
        if key is None or key not in counts:
            continue
        counts[key][_op_name(node)] += 1
        layer = _layer_of(node)
        if layer is not None:
            owner.setdefault(key, layer)
            node.metadata_props["moefx.layer"] = layer
            _name_initializer_inputs(model.graph, node, layer)
    # A layer called more than once has one dispatch per call; a dispatch whose nodes lost the exporter's
    # module metadata goes to the first layer without one, in model order.
    unclaimed = [key for key in dispatches if key not in owner]
    reports = []
    for name, layer in layers:
        if isinstance(layer, LoRAMoELayer):  # no dispatch op: its graph is standard ops
            reports.append(LayerExport(name, "", _LORA_LOWERING))
            continue
        keys = [key for key in dispatches if owner.get(key) == name] or unclaimed[:1]
        if not keys:
            reports.append(LayerExport(name, "", None))
            continue
        if keys[0] in unclaimed:
            unclaimed.remove(keys[0])
        op_name, lowering = dispatches[keys[0]]
        nodes = sum((counts[key] for key in keys), Counter())
        reports.append(LayerExport(name, op_name, lowering, dict(nodes)))
    return reports


def _name_initializer_inputs(graph: ir.Graph, node: ir.Node, layer: str) -> None:
    """Give the folded weights of a fused node readable names: ``<layer>.fc1_experts_weights``, ..."""
    if node.domain != MS_DOMAIN:
        return
    for value, role in zip(node.inputs, ORT_MOE_INPUTS):
        if value is None or not value.is_initializer() or not (value.name or "").startswith("val_"):
            continue
        name = f"{layer}.{role}"
        if name not in graph.initializers:
            value.name = name


def _strip_shim_prefix(model: ir.Model) -> None:
    """Initializers are named after the wrapper that flattened the inputs (``mod.``); use the model's names."""
    for value in list(model.graph.initializers.values()):
        name = value.name or ""
        if name.startswith(_SHIM_PREFIX) and name[len(_SHIM_PREFIX):] not in model.graph.initializers:
            value.name = name[len(_SHIM_PREFIX):]


def _layer_of(node: ir.Node) -> str | None:
    """The MoE layer a node was exported from, from the exporter's module-stack metadata."""
    try:
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return None
    for scope, cls in reversed(list(zip(scopes, classes))):
        if cls == _MOE_LAYER_CLASS:
            return scope[len(_SHIM_PREFIX):] if scope.startswith(_SHIM_PREFIX) else scope
    return None


def _static_input_notes(model: ir.Model) -> list[str]:
    """Inputs whose leading (batch) axis torch.export specialised, typically because the example had size 1."""
    return [
        f"input {value.name!r} has a fixed leading axis of {value.shape[0]}: export with example inputs of batch "
        "(and sequence) size 2 or more for dynamic axes"
        for value in model.graph.inputs
        if value.shape is not None and len(value.shape) >= 1 and isinstance(value.shape[0], int)
    ]


def _op_name(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _op_counts(model: ir.Model) -> dict[str, int]:
    return dict(Counter(_op_name(node) for node in model.graph).most_common())


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _describe_value(value: ir.Value) -> dict[str, Any]:
    shape = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype is not None else None, "shape": shape}


# -- output: staging, checks, publishing -----------------------------------------------------------------


@contextlib.contextmanager
def _output_staging(path: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside ``path`` (made before the export, so a bad path fails fast)."""
    if path.is_dir():
        raise MoefxError(f"{path}: is a directory; give the .onnx file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force (force=True) to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise MoefxError(f"{path}: the directory {parent} does not exist; create it first or choose another path")
    with staging_dir(path) as staging:
        yield staging


def _publish(staging: Path, path: Path, data_name: str | None) -> None:
    """Move the staged file (and its data file first) into place; drop a stale data file of an old export."""
    stale = path.with_name(f"{path.name}.data")
    try:
        if data_name:
            os.replace(staging / data_name, path.with_name(data_name))
        os.replace(staging / path.name, path)
        if not data_name and stale.exists():
            stale.unlink()
    except OSError as exc:
        raise MoefxError(f"{path}: writing failed ({exc.strerror or exc})") from None


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError
        raise OnnxExportError(f"the exported model fails onnx.checker: {first_line(exc)} (a bug in moefx)") from exc


def _has_bfloat16(path: Path) -> bool:
    """Whether the (staged) ONNX file holds bfloat16 weights, read without their data."""
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer)


def _verify(path: Path, tensors: list[torch.Tensor], reference: Any, input_names: list[str]) -> dict[str, Any]:
    """Run the file once with ONNX Runtime on the example inputs and compare with the torch outputs."""
    try:
        import onnxruntime as ort  # optional: the file is checked with ORT where it is installed
    except ImportError:
        return {"compared": False, "reason": "onnxruntime is not installed"}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if "NOT_IMPLEMENTED" in str(exc) and (any(t.dtype == torch.bfloat16 for t in tensors) or _has_bfloat16(path)):
            raise MoefxError(
                f"ONNX Runtime's CPU provider cannot run this bfloat16 model ({first_line(exc)}); export it as "
                "float16 or float32 (moefx export --dtype float16), or skip the check with --no-verify for a "
                "runtime that has bfloat16 kernels"
            ) from None
        raise OnnxExportError(f"ONNX Runtime cannot load the exported model: {first_line(exc)} (a bug in moefx)") from exc
    by_name = dict(zip(input_names, tensors))
    graph_inputs = [i.name for i in session.get_inputs()]
    if not set(graph_inputs) <= set(by_name):  # renamed by the exporter: inputs keep their order
        by_name = dict(zip(graph_inputs, tensors))
    feed = {name: by_name[name].detach().cpu().numpy() for name in graph_inputs}
    outputs = session.run(None, feed)
    expected = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    if len(expected) != len(outputs):
        return {"compared": False, "reason": f"{len(outputs)} ONNX outputs vs {len(expected)} torch outputs"}
    errors, scale = [], 0.0
    for got, want in zip(outputs, expected):
        if not want.is_floating_point():
            continue
        want = want.detach().float().cpu()
        errors.append(float((torch.from_numpy(got).float() - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    if not errors:
        return {"compared": False, "reason": "no floating-point outputs"}
    return {"compared": True, "max_abs_error": max(errors), "max_abs_reference": scale,
            "per_output": errors}
