"""Capture: turn the parts of a model that hold FFNs into torch.fx graphs, at the smallest granularity.

Tracing a whole Transformer rarely works (data-dependent control flow, cache objects) and, when it does, the
result loses the model's class (no ``.generate``). moefx therefore captures the *smallest submodule that
holds a whole FFN* and swaps the rewritten module back in place, so the outer model keeps its class, config
and methods.

Which submodules? With example inputs, one sample forward pass (``record_sample_pass``) records every
module's inputs and, through the autograd graph, which projection feeds which through elementwise ops only:
every such (up, down) pair is an FFN candidate and its smallest common ancestor is the container to capture.
Without inputs, every module holding two or more projections is tried, deepest first.

How? ``torch.fx.symbolic_trace`` (with GPT-2's ``Conv1D`` and activation modules as leaves) first; if that
fails, ``torch.export`` with the recorded inputs and dynamic dims. An exported container becomes a
:class:`CapturedModule`, which recaptures (like ``torch.compile`` recompiles) when it is called with an input
structure it has not seen (e.g. an attention mask that was ``None`` at capture) or in another train/eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import MoefxError
from .inputs import overlong_inputs
from .layers import MoELayer
from .passes.ffn_pass import rewrite_with_layers
from .passes.ffn_rules import is_conv1d

__all__ = [
    "CaptureAttempt",
    "CapturedModule",
    "FlatCall",
    "MoefxTracer",
    "SampleRecord",
    "export_module",
    "is_projection_module",
    "projection_containers",
    "quiet_torch_export",
    "record_sample_pass",
    "set_mode",
    "symbolic_trace_module",
]

log = logging.getLogger("moefx")

_PLAIN_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format)


def is_projection_module(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward) or is_conv1d(mod)


def set_mode(module: nn.Module, training: bool) -> nn.Module:
    """``module.train(training)`` where the module can switch; a loaded ``torch.export`` program cannot (its
    train/eval mode is baked into its graph, and ``train``/``eval`` raise): it is left as it is."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
    return module


# ---------------------------------------------------------------------------------------------------------
# symbolic_trace
# ---------------------------------------------------------------------------------------------------------


class MoefxTracer(fx.Tracer):
    """``symbolic_trace`` that keeps projections, activations and already-converted layers as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_conv1d(m) or isinstance(m, (MoELayer, CapturedModule)):
            return True
        if type(m).__module__ == "transformers.activations":
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace_module(module: nn.Module) -> fx.GraphModule:
    tracer = MoefxTracer()
    graph = tracer.trace(module)
    name = module.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


# ---------------------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------------------


class FlatCall(nn.Module):
    """Calls ``mod`` with the recorded argument structure, taking only the tensor leaves as inputs."""

    def __init__(self, mod: nn.Module, leaves: list[Any], spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.mod = mod
        self._leaves = leaves
        self._spec = spec

    def forward(self, *tensors: torch.Tensor):
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self._leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return self.mod(*args, **kwargs)


def _check_constant_leaves(leaves: list[Any]) -> None:
    for leaf in leaves:
        if not isinstance(leaf, (torch.Tensor, *_PLAIN_CONSTANTS)):
            raise TypeError(
                f"an input of type {type(leaf).__name__} is neither a tensor nor a constant, so the captured "
                "graph could not be reused for later calls"
            )


def call_key(leaves: list[Any], spec: pytree.TreeSpec, training: bool) -> tuple:
    """What a captured graph depends on: mode, argument structure, constants, tensor ranks and dtypes, and which
    dims have size 0 or 1 (``torch.export`` specialises those: a graph captured at batch 1 runs only batch 1)."""
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            # (a symbolic size, under a trace of the whole model, counts as neither: see CapturedModule._bind)
            ones = tuple(isinstance(s, int) and s <= 1 for s in leaf.shape)
            parts.append(("T", leaf.dim(), leaf.dtype, leaf.device.type, ones))
        else:
            parts.append(("C", repr(leaf)))
    return (training, str(spec), tuple(parts))


def _symbolic(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor of the call has a symbolic size (the call is being traced)."""
    leaves = pytree.tree_leaves((args, kwargs))
    return any(not isinstance(s, int) for t in leaves if isinstance(t, torch.Tensor) for s in t.shape)


def _general_key(key: tuple) -> tuple:
    """``key`` with no dim of size 0 or 1: a graph captured so has those dims dynamic and runs size 1 too."""
    training, spec, parts = key
    return (training, spec, tuple((*p[:4], tuple(False for _ in p[4])) if p[0] == "T" else p for p in parts))


def export_module(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """``torch.export`` ``module`` on the given call, all tensor dims dynamic where the code allows.

    Returns the exported GraphModule with parameter and submodule names as in ``module`` (no prefix).
    """
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    _check_constant_leaves(leaves)
    tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
    dims = tuple({i: torch.export.Dim.AUTO for i in range(t.dim())} for t in tensors)
    shim = FlatCall(module, leaves, spec)
    with quiet_torch_export():
        ep = torch.export.export(shim, tensors, dynamic_shapes=(dims,), strict=False)
    gm = ep.module()
    _hoist_attrs(gm, "mod")
    gm.meta["moefx.recapturable"] = True  # dropouts baked here follow the captured module's mode
    return gm


@contextlib.contextmanager
def quiet_torch_export() -> Iterator[None]:
    # torch.export logs recoverable specialisations at WARNING and prints the partial graph of a failed
    # export to stderr; moefx reports the failure itself, in one line.
    names = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _hoist_attrs(gm: fx.GraphModule, prefix: str) -> None:
    """Move ``gm.<prefix>.*`` to ``gm.*`` and retarget the graph, so names match the captured module."""
    holder = getattr(gm, prefix)
    delattr(gm, prefix)
    for name, child in holder._modules.items():
        gm.add_module(name, child)
    for name, param in holder._parameters.items():
        gm.register_parameter(name, param)
    for name, buf in holder._buffers.items():
        gm.register_buffer(name, buf, persistent=name not in holder._non_persistent_buffers_set)
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target.startswith(prefix + "."):
            node.target = node.target[len(prefix) + 1 :]
    gm.recompile()


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class CapturedModule(nn.Module):
    """An exported-and-rewritten submodule, called exactly like the module it replaces.

    Its children are the original module's children (same objects, so attributes such as
    ``self_attn.batch_first`` and state-dict keys are unchanged), minus the dense FFN projections, plus the
    MoE layers. Each distinct call structure (see :func:`call_key`) has its own graph; an unseen one is
    captured from the original module (kept out of the module tree, with its dense FFN weights replaced by
    zero-storage placeholders) and its FFNs are routed to the existing MoE layers.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        key: tuple,
        source: nn.Module,
        ffn_layers: dict[tuple[str, ...], str],
        source_class: str,
    ) -> None:
        super().__init__()
        for name, child in source._modules.items():
            self.add_module(name, child)
        for name, param in source._parameters.items():
            self.register_parameter(name, param)
        for name, buf in source._buffers.items():
            self.register_buffer(name, buf, persistent=name not in source._non_persistent_buffers_set)
        for name, value in source.__dict__.items():
            if not name.startswith("_") and name != "training" and not hasattr(self, name):
                object.__setattr__(self, name, value)
        for modules in ffn_layers:
            for path in modules:
                _own_path(self, path)
                parent, _, leaf = path.rpartition(".")
                owner = self.get_submodule(parent)
                (owner._parameters if leaf in owner._parameters else owner._modules).pop(leaf)
        for name in ffn_layers.values():
            parent, _, leaf = name.rpartition(".")
            _own_path(self, name)
            self.get_submodule(parent).add_module(leaf, gm.get_submodule(name))
        self.training = source.training  # the mode of the module it replaces (its children share it)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_graphs", {key: gm})
        object.__setattr__(self, "_bound", {})
        self.ffn_layers = dict(ffn_layers)  # FFN projection modules -> name of the MoE layer replacing it
        self.source_class = source_class
        self.register_load_state_dict_post_hook(lambda module, keys: module._bound.clear())

    @property
    def num_variants(self) -> int:
        return len(self._graphs)

    @property
    def captured_from(self) -> nn.Module:
        """The original module (kept out of the module tree) that unseen input structures are captured from."""
        return self._source

    def rebind(self) -> None:
        """Forget the graphs bound to module objects: the next call binds again, to the children as they are now
        (after a child was swapped or its tensors replaced)."""
        self._bound.clear()

    def forward(self, *args: Any, **kwargs: Any):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = call_key(leaves, spec, self.training)
        fn = self._bound.get(key)
        if fn is None:
            fn = self._bind(key, args, kwargs)
        return fn(*[leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])

    def _bind(self, key: tuple, args: tuple, kwargs: dict) -> fx.GraphModule:
        gm = self._graphs.get(key)
        if gm is None:
            gm = self._graphs.get(_general_key(key))
        if gm is None and _symbolic(args, kwargs):
            # Traced with symbolic sizes (torch.export / ONNX export of the whole model): any graph of this input
            # structure, whatever sizes it was captured at, is what the trace inlines.
            gm = next((g for k, g in self._graphs.items() if _general_key(k) == _general_key(key)), None)
        if gm is None:
            gm = self._recapture(key, args, kwargs)
        # Bind every attribute the graph reads to *this* module's current objects (not the capture's).
        root: dict[str, Any] = {}
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                try:
                    root[node.target] = _fetch(self, node.target)
                except AttributeError:
                    root[node.target] = _fetch(gm, node.target)
        bound = fx.GraphModule(root, gm.graph, gm.__class__.__name__)
        self._bound[key] = bound
        return bound

    def _recapture(self, key: tuple, args: tuple, kwargs: dict) -> fx.GraphModule:
        if len(self._graphs) >= 16:
            log.warning("%s has been captured for %d input structures", self.source_class, len(self._graphs))
        log.info("moefx: capturing %s again for a new input structure", self.source_class)
        source = self._source
        source.train(self.training)
        _reghost(source, _device_of(self))
        gm = export_module(source, args, kwargs)
        rewrite_with_layers(gm, self, self.ffn_layers)
        self._graphs[key] = gm
        return gm

    def _apply(self, fn, recurse=True):
        self._bound.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"captured={self.source_class}, variants={len(self._graphs)}"


def _own_path(root: nn.Module, path: str) -> None:
    """Give ``root`` private shallow copies of the modules on ``path``'s parent chain.

    The children of a CapturedModule are shared with the original module that recaptures use; before a
    child is changed (a projection removed, an MoE layer added) it is copied, so the original keeps its own.
    """
    node = root
    for part in path.split(".")[:-1]:
        child = node._modules[part]
        if not child.__dict__.get("_moefx_owned", False):
            child = copy.copy(child)
            child._modules = dict(child._modules)
            child._parameters = dict(child._parameters)
            child._buffers = dict(child._buffers)
            child.__dict__["_moefx_owned"] = True
            node._modules[part] = child
        node = child


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def ghost_parameters(root: nn.Module, path: str) -> None:
    """Replace the parameters at ``path`` (a module or one parameter) by zero-storage tensors of the same
    shape: the original module stays traceable for recaptures without holding the dense FFN weights."""
    owner_path, _, leaf = path.rpartition(".")
    owner = root.get_submodule(owner_path)
    if leaf in owner._parameters:
        targets = [(owner, leaf)]
    else:
        module = owner.get_submodule(leaf)
        targets = [(module, name) for name in module._parameters]
    for module, name in targets:
        param = module._parameters[name]
        if param is not None:
            ghost = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
            module._parameters[name] = nn.Parameter(ghost, requires_grad=False)
            module._parameters[name]._moefx_ghost = True


def _reghost(source: nn.Module, device: torch.device) -> None:
    for mod in source.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None and getattr(param, "_moefx_ghost", False) and param.device != device:
                ghost = torch.zeros((), dtype=param.dtype, device=device).expand(param.shape)
                mod._parameters[name] = nn.Parameter(ghost, requires_grad=False)
                mod._parameters[name]._moefx_ghost = True


# ---------------------------------------------------------------------------------------------------------
# The sample pass: recorded inputs and FFN candidates from the autograd graph
# ---------------------------------------------------------------------------------------------------------

_ELEMENTWISE_BACKWARD = re.compile(
    r"^(Gelu|Relu|Silu|Sigmoid|Tanh|Mul|Add|Sub|Div|Pow|Neg|Exp|Erf|NativeDropout|ToCopy|Clone|Threshold|"
    r"Hardtanh|Clamp|ClampMin|ClampMax|Split|SplitWithSizes|UnsafeSplit|LeakyRelu|Elu|Mish|Softplus|"
    r"Hardswish|Sqrt|Rsub|Square|Where|Alias)Backward\d+$"
)


@dataclass
class SampleRecord:
    """What one forward pass on example inputs showed."""

    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # module -> (args, kwargs)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (up projection, down projection)
    output: Any = None


def record_sample_pass(model: nn.Module, args: tuple, kwargs: dict) -> SampleRecord:
    """Run ``model(*args, **kwargs)`` once (eval mode, grad on) and record what capture needs."""
    record = SampleRecord()
    projections = {name: m for name, m in model.named_modules() if is_projection_module(m)}
    containers = projection_containers(model, projections)
    grad_fn_in: dict[str, Any] = {}
    grad_fn_out: dict[int, str] = {}
    handles = []

    def pre_hook(name):
        def hook(mod, a, kw):
            if name not in record.inputs:
                record.inputs[name] = pytree.tree_map(_detach, (a, kw))

        return hook

    def proj_hook(name):
        def hook(mod, a, out):
            if a and isinstance(a[0], torch.Tensor) and a[0].grad_fn is not None:
                grad_fn_in.setdefault(name, a[0].grad_fn)
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                grad_fn_out.setdefault(id(out.grad_fn), name)
                keep.append(out.grad_fn)

        return hook

    keep: list[Any] = []  # keep grad_fn objects alive so their ids stay unique
    for name in containers:
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook(name), with_kwargs=True))
    for name, mod in projections.items():
        handles.append(mod.register_forward_hook(proj_hook(name)))
    was_training = model.training
    frozen = [p for m in projections.values() for p in m.parameters() if not p.requires_grad]
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves((args, kwargs)))
        with torch.enable_grad(), _MetaScalars() if on_meta else contextlib.nullcontext():
            try:
                out = model(*args, **kwargs)
            except Exception as exc:
                overlong = overlong_inputs(model, args, kwargs)
                why = ("their {} tokens exceed the model's {} positions; pass shorter inputs".format(*overlong)
                       if overlong else "pass inputs its forward accepts")
                raise MoefxError(f"the model failed on its example inputs ({_one_line(exc)}); {why} "
                                 "(--inputs FILE, or example_inputs=)") from exc
        record.output = pytree.tree_map(_detach, out)
        memo: dict[int, set[str] | None] = {}
        for down, fn in grad_fn_in.items():
            for up in sorted(_elementwise_sources(fn, grad_fn_out, memo) or ()):
                if up != down:
                    record.pairs.append((up, down))
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return record


class _MetaScalars(TorchDispatchMode):
    """A sample pass on the meta device (planning a streamed conversion) has no values to read: model code
    that reads one (``pad_token_id in input_ids``, ``mask.all()`` in input checks) gets 0 / False instead
    of an error. Only values, never shapes, are made up, and FFNs are found from shapes and the graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _elementwise_sources(fn, outputs: dict[int, str], memo: dict[int, set[str] | None]) -> set[str] | None:
    """The projections that *every* input path of ``fn`` reaches through elementwise autograd nodes.

    None if some path reaches anything else (a parameter, a normalisation, the residual stream): then the
    value is not a pure function of projection outputs, so it is no FFN hidden activation.
    """
    key = id(fn)
    if key in memo:
        return memo[key]
    memo[key] = None  # guards against cycles while this node is being resolved
    result: set[str] | None
    if key in outputs:
        result = {outputs[key]}
    elif not _ELEMENTWISE_BACKWARD.match(type(fn).__name__):
        result = None
    else:
        result = set()
        for next_fn, _ in fn.next_functions:
            if next_fn is None:  # a constant or a tensor without grad
                continue
            sub = _elementwise_sources(next_fn, outputs, memo)
            if sub is None:
                result = None
                break
            result |= sub
    memo[key] = result
    return result


def weight_like(model: nn.Module) -> set[str]:
    """Names of everything that can be an FFN projection: projection modules, and 2-D parameters used
    functionally (``F.linear(x, self.w1)``) outside projection modules and embeddings."""
    names = set()
    for name, mod in model.named_modules():
        if is_projection_module(mod):
            names.add(name)
        elif not isinstance(mod, nn.Embedding):
            for pname, param in mod.named_parameters(recurse=False):
                if param.dim() == 2:
                    names.add(f"{name}.{pname}" if name else pname)
    return names


def projection_containers(model: nn.Module, projections) -> list[str]:
    """Modules holding at least two projections (candidate FFN containers), deepest first."""
    counts: dict[str, int] = {}
    for name in projections:
        parts = name.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i])
            counts[prefix] = counts.get(prefix, 0) + 1
    names = [n for n, c in counts.items() if c >= 2 and _has_forward(model.get_submodule(n))]
    return sorted(names, key=lambda n: -len(n.split("."))) if names else []


def _has_forward(mod: nn.Module) -> bool:
    return type(mod).forward is not nn.Module.forward


def common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def container_of(model: nn.Module, names: list[str]) -> str:
    """The smallest module with a forward that contains all of ``names`` (projection module paths)."""
    prefix = common_prefix(names)
    while True:
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            mod = None
        if mod is not None and _has_forward(mod) and not is_projection_module(mod):
            return prefix
        if not prefix:
            return ""
        prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""


@dataclass
class CaptureAttempt:
    """The result of capturing one container: a graph, or the reasons each tracer gave."""

    container: str
    method: str | None = None  # "symbolic_trace" | "torch.export"
    graph_module: fx.GraphModule | None = None
    errors: dict[str, str] = field(default_factory=dict)
    key: tuple | None = None  # the call key of an export capture (see ``call_key``)

    @property
    def ok(self) -> bool:
        return self.graph_module is not None


def capture_container(model: nn.Module, name: str, record: SampleRecord | None) -> CaptureAttempt:
    """Capture ``model.<name>``: symbolic_trace first, torch.export with the recorded inputs second."""
    attempt = CaptureAttempt(name)
    module = model.get_submodule(name)
    try:
        attempt.graph_module = symbolic_trace_module(module)
        attempt.method = "symbolic_trace"
        return attempt
    except Exception as exc:
        attempt.errors["symbolic_trace"] = _one_line(exc)
    if record is None or name not in record.inputs:
        attempt.errors["torch.export"] = "no recorded inputs (pass example inputs to capture it with torch.export)"
        return attempt
    args, kwargs = record.inputs[name]
    was_training = module.training
    try:
        module.eval()
        attempt.graph_module = export_module(module, args, kwargs)
        attempt.method = "torch.export"
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        attempt.key = call_key(leaves, spec, training=False)
    except Exception as exc:
        attempt.errors["torch.export"] = _one_line(exc)
    finally:
        module.train(was_training)
    return attempt


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]
