"""FFN patterns as data: linear forms and FFN rules, matched on torch.fx graphs.

Two registries:

* :data:`LINEAR_FORMS` — named recognisers for "a projection ``y = x W^T + b``" in its graph spellings:
  ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored transposed), ``F.linear``, and the ATen forms that
  ``torch.export`` produces (``aten.linear``, ``aten.addmm``, ``aten.mm`` + bias, with the views around them).
* :data:`FFN_RULES` — named instances of :class:`FFNRule`: ``mlp`` (``down(act(up(x)))``), ``glu``
  (``down(act(gate(x)) * up(x))``, SwiGLU/GeGLU) and ``fused-glu`` (one projection then ``chunk``).

A rule starts at a candidate down projection, walks back through the elementwise "hidden" subgraph to the up
projections, checks that the FFN is pure (its hidden activation is used nowhere else), and names the
activation by evaluating the extracted subgraph (see :mod:`moefx.activations`). It returns an
:class:`FFNMatch` or a :class:`FailedMatch` whose reason ``moefx inspect`` prints.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from moefx.activations import identify_activation, identify_gated_activation

__all__ = [
    "FFN_RULES",
    "LINEAR_FORMS",
    "FFNMatch",
    "FFNRule",
    "FailedMatch",
    "LinearSite",
    "find_linear_sites",
]

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------
# Linear forms
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LinearSite:
    """One projection ``y = x W^T + b`` found in a graph."""

    form: str
    input: fx.Node  # [..., in]; views that only flatten leading dims are stripped
    output: fx.Node  # [..., out]
    nodes: list[fx.Node]  # the projection's own nodes (views, transposes, the matmul), not weights
    weight: torch.Tensor  # [out, in] (may be a transposed view of the stored parameter)
    bias: torch.Tensor | None
    module: str  # owning module path relative to the graph module ("" if unknown)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _get_attr_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _param_module(node: fx.Node) -> str:
    """The projection's name: the owning module of a ``weight`` (nn.Linear, Conv1D), else the parameter."""
    owner, _, attr = node.target.rpartition(".")
    return owner if attr == "weight" and owner else node.target


_VIEW_TARGETS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_TRANSPOSE_TARGETS = {aten.t.default, aten.transpose.int, aten.permute.default, torch.t, torch.transpose, torch.permute}
_ADDMM_TARGETS = {aten.addmm.default, torch.addmm}
_MM_TARGETS = {aten.mm.default, aten.matmul.default, torch.mm, torch.matmul, operator.matmul}
_ADD_TARGETS = {aten.add.Tensor, operator.add, torch.add}


def _is_view(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in (*_VIEW_TARGETS, torch.reshape):
        return True
    return node.op == "call_method" and node.target in ("view", "reshape")


def _strip_input_view(node: fx.Node, in_features: int) -> tuple[fx.Node, list[fx.Node]]:
    """``view(x, [-1, in])`` -> ``x`` when the view only flattens leading dims and has one user."""
    if _is_view(node) and len(node.users) == 1:
        src = node.args[0]
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if val is None or (hasattr(val, "shape") and val.shape[-1] == in_features):
            return src, [node]
    return node, []


def _extend_output_view(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``view(y, [..., out])`` after a 2-D matmul: the projection's output is the view."""
    if len(node.users) == 1:
        (user,) = node.users
        if _is_view(user) and user.args[0] is node:
            return user, [user]
    return node, []


def _linear_module(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
        return None
    return LinearSite("nn.Linear", node.args[0], node, [node], mod.weight, mod.bias, node.target)


def _conv1d_module(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if not is_conv1d(mod):
        return None
    return LinearSite("Conv1D", node.args[0], node, [node], mod.weight.t(), mod.bias, node.target)


def is_conv1d(mod: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W [in, out]``."""
    # Read _parameters directly: during fx tracing, module attribute access returns proxies.
    weight = mod._parameters.get("weight") if type(mod).__name__ == "Conv1D" else None
    return weight is not None and weight.dim() == 2 and weight.shape[1] == getattr(mod, "nf", None)


def _functional_linear(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op != "call_function" or node.target not in (F.linear, torch._C._nn.linear, aten.linear.default):
        return None
    args = list(node.args) + [None] * 3
    weight = _get_attr_tensor(gm, args[1])
    bias_node = args[2] if args[2] is not None else node.kwargs.get("bias")
    bias = _get_attr_tensor(gm, bias_node)
    if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
        return None
    form = "aten.linear" if node.target is aten.linear.default else "F.linear"
    return LinearSite(form, args[0], node, [node], weight, bias, _param_module(args[1]))


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _TRANSPOSE_TARGETS:
        if node.target in (aten.permute.default, torch.permute):
            return list(node.args[1]) == [1, 0]
        return True
    return (node.op == "call_method" and node.target in ("t", "T")) or (
        node.op == "call_method" and node.target == "transpose" and sorted(node.args[1:3]) in ([0, 1], [-1, 0])
    )


def _weight_operand(gm: fx.GraphModule, node) -> tuple[torch.Tensor, str, list[fx.Node]] | None:
    """The ``[out, in]`` weight behind the right operand of ``x2d @ W'`` (``W' = W^T`` or Conv1D's ``W``)."""
    if not isinstance(node, fx.Node):
        return None
    if _is_transpose(node):
        w = _get_attr_tensor(gm, node.args[0])
        if w is not None and w.dim() == 2 and len(node.users) == 1:
            return w, _param_module(node.args[0]), [node]
        return None
    w = _get_attr_tensor(gm, node)
    if w is not None and w.dim() == 2:  # stored as [in, out] (Conv1D)
        return w.t(), _param_module(node), []
    return None


def _aten_addmm(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op != "call_function" or node.target not in _ADDMM_TARGETS:
        return None
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias = _get_attr_tensor(gm, node.args[0])
    operand = _weight_operand(gm, node.args[2])
    if bias is None or bias.dim() != 1 or operand is None:
        return None
    weight, module, wnodes = operand
    x, in_views = _strip_input_view(node.args[1], weight.shape[1])
    out, out_views = _extend_output_view(node)
    return LinearSite("aten.addmm", x, out, [*in_views, *wnodes, node, *out_views], weight, bias, module)


def _aten_mm_bias(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op != "call_function" or node.target not in _MM_TARGETS:
        return None
    operand = _weight_operand(gm, node.args[1])
    if operand is None:
        return None
    weight, module, wnodes = operand
    x, in_views = _strip_input_view(node.args[0], weight.shape[1])
    nodes = [*in_views, *wnodes, node]
    out, bias = node, None
    if len(node.users) == 1:
        (user,) = node.users
        if user.op == "call_function" and user.target in _ADD_TARGETS and user.args[0] is node:
            b = _get_attr_tensor(gm, user.args[1])
            if b is not None and b.dim() == 1 and b.shape[0] == weight.shape[0]:
                out, bias = user, b
                nodes.append(user)
    out, out_views = _extend_output_view(out)
    return LinearSite("aten.mm+bias", x, out, nodes + out_views, weight, bias, module)


#: Named recognisers of a projection node. Each takes ``(graph_module, node)`` and returns a LinearSite.
LINEAR_FORMS: dict[str, Callable[[fx.GraphModule, fx.Node], LinearSite | None]] = {
    "nn.Linear": _linear_module,
    "Conv1D": _conv1d_module,
    "F.linear": _functional_linear,
    "aten.addmm": _aten_addmm,
    "aten.mm+bias": _aten_mm_bias,
}


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        for recognise in LINEAR_FORMS.values():
            site = recognise(gm, node)
            if site is not None:
                sites.append(site)
                break
    return sites


# ---------------------------------------------------------------------------------------------------------
# The elementwise hidden subgraph
# ---------------------------------------------------------------------------------------------------------

_POINTWISE_PY = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.neg, torch.tanh, torch.sigmoid, torch.erf,
    torch.exp, torch.square, torch.relu, torch.sqrt, torch.clamp, torch.where,
    F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.mish, F.elu, F.leaky_relu, F.hardtanh, F.relu6,
    F.hardswish, F.softplus,
}
_POINTWISE_METHODS = {
    "mul", "add", "sub", "div", "pow", "neg", "tanh", "sigmoid", "relu", "exp", "erf", "square",
    "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "clamp",
}
_DROPOUT_TARGETS = {F.dropout, aten.dropout.default, torch.dropout}
_IGNORED_USERS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
_SPLIT_TARGETS = {
    torch.chunk, torch.split, aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default, "chunk", "split",
}


def _dropout_p(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """Dropout probability if ``node`` is a dropout (0.0 for one baked inactive into the graph), else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return float(mod.p) if isinstance(mod, nn.Dropout) else None
    if node.op == "call_function" and node.target in _DROPOUT_TARGETS:
        p = float(node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5))
        stack = node.meta.get("nn_module_stack")
        if gm.meta.get("moefx.recapturable") and stack and "Dropout" in str(list(stack.values())[-1][-1]):
            return p  # from an nn.Dropout in a graph moefx recaptures per train/eval mode: it is live
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
        return p if training else 0.0
    return None


def _is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            if torch.Tag.pointwise in node.target.tags:
                return True
            return node.target in (aten._to_copy.default, aten.to.dtype, aten.clone.default)
        return node.target in _POINTWISE_PY
    if node.op == "call_method":
        if node.target == "to":  # only dtype casts
            return all(not isinstance(a, (str, torch.device)) for a in node.args[1:])
        return node.target in _POINTWISE_METHODS
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        module_path = type(mod).__module__
        return isinstance(mod, nn.Identity) or module_path in (
            "torch.nn.modules.activation",
            "transformers.activations",
        )
    return False


def describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        target = getattr(target, "__name__", str(target))
    return f"{node.name} ({node.op} {target})"


def is_ignored_user(node: fx.Node) -> bool:
    """A use of a value that reads nothing of it (torch.export's metadata and scalar assertions): the FFN
    rules and the rewrite look past it."""
    return node.op == "call_function" and node.target in _IGNORED_USERS


_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}
_SHAPE_FUNCTIONS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
_INT_ARITH = {operator.getitem, operator.add, operator.mul, operator.sub, operator.floordiv, getattr}


def _is_shape_read(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in _SHAPE_ATTRS
        return node.target in _SHAPE_FUNCTIONS
    return False


def _feeds_only(node: fx.Node, inside: set[fx.Node], depth: int = 0) -> bool:
    """Every transitive user of the shape value ``node`` is inside the FFN or more shape arithmetic on it."""
    if depth > 8:
        return False
    for user in node.users:
        if user in inside:
            continue
        if user.op == "call_function" and user.target in _INT_ARITH and _feeds_only(user, inside, depth + 1):
            continue
        return False
    return True


@dataclass
class _Source:
    site: LinearSite
    part: int | None = None  # chunk index for fused gate_up
    split: fx.Node | None = None
    node: fx.Node | None = None  # the node the hidden graph reads (site output or getitem)


@dataclass
class _Hidden:
    sources: list[_Source]
    nodes: list[fx.Node]  # elementwise nodes, in graph order
    dropout_p: float
    problems: list[str] = field(default_factory=list)


def _split_parts(node: fx.Node, site_by_output: dict[fx.Node, LinearSite]) -> _Source | None:
    """``getitem(chunk(site_out, 2, -1), i)`` -> a source for part i."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    split, index = node.args
    if not isinstance(split, fx.Node) or split.target not in _SPLIT_TARGETS:
        return None
    if split.op not in ("call_function", "call_method"):
        return None
    site = site_by_output.get(split.args[0])
    if site is None:
        return None
    return _Source(site, part=int(index), split=split, node=node)


def _collect_hidden(gm: fx.GraphModule, down: LinearSite, site_by_output: dict[fx.Node, LinearSite]) -> _Hidden:
    sources: dict[fx.Node, _Source] = {}
    nodes: set[fx.Node] = set()
    problems: list[str] = []
    dropout_p = 0.0
    queue = deque([down.input])
    seen: set[fx.Node] = set()
    while queue:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if len(seen) > 128:
            problems.append("the hidden subgraph is too large to be an activation")
            break
        site = site_by_output.get(node)
        if site is not None and site is not down:
            sources[node] = _Source(site, node=node)
            continue
        part = _split_parts(node, site_by_output)
        if part is not None:
            sources[node] = part
            continue
        p = _dropout_p(gm, node)
        if p is None and not _is_pointwise(gm, node):
            if node.op == "get_attr":
                problems.append(f"the hidden path reads the tensor {node.target!r} (not a pure activation)")
            else:
                problems.append(f"the hidden path goes through {describe(node)}, which is not elementwise")
            continue
        if p is not None:
            dropout_p = max(dropout_p, p)
        nodes.add(node)
        for arg in node.all_input_nodes:
            queue.append(arg)
    ordered = [n for n in gm.graph.nodes if n in nodes]
    return _Hidden(list(sources.values()), ordered, dropout_p, problems)


def _hidden_function(gm: fx.GraphModule, hidden: _Hidden, down_input: fx.Node, inputs: list[fx.Node]):
    """The hidden subgraph as a callable of its source tensors, dropouts removed (identity)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"h{i}")
    for node in hidden.nodes:
        if _dropout_p(gm, node) is not None:
            env[node] = env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[down_input])
    return fx.GraphModule(gm, graph)


# ---------------------------------------------------------------------------------------------------------
# FFN rules
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FailedMatch:
    """Why a candidate is not a convertible FFN (``interesting`` = it looked like one)."""

    rule: str
    reason: str
    interesting: bool = True


@dataclass
class FFNMatch:
    """A pure dense FFN found in a graph, with everything needed to build experts from it."""

    rule: str
    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node]  # every node the rewrite removes (projections and hidden subgraph)
    up_weight: torch.Tensor  # [I, H] (the gate projection when gated)
    up_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor | None  # [I, H] the "up" of a gated FFN (multiplied by act(gate))
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor  # [O, I]
    down_bias: torch.Tensor | None
    activation: str
    dropout_p: float
    modules: list[str]  # the projection modules, relative to the graph module
    forms: list[str]

    @property
    def gated(self) -> bool:
        return self.gate_up_weight is not None

    @property
    def in_features(self) -> int:
        return self.up_weight.shape[1]

    @property
    def hidden_features(self) -> int:
        return self.up_weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.down_weight.shape[0]

    def describe(self) -> str:
        kind = f"gated {self.activation}" if self.gated else self.activation
        return f"{self.rule}: {self.in_features} -> {self.hidden_features} ({kind}) -> {self.out_features}"


@dataclass(frozen=True)
class FFNRule:
    """One FFN shape. ``sources`` is how many tensors feed the hidden subgraph; ``fused`` = one chunked."""

    name: str
    sources: int
    fused: bool
    description: str

    def applies(self, hidden: _Hidden) -> bool:
        sites = {id(s.site) for s in hidden.sources}
        is_fused = any(s.part is not None for s in hidden.sources)
        return len(hidden.sources) == self.sources and is_fused == self.fused and len(sites) == (1 if self.fused else self.sources)

    def match(self, gm: fx.GraphModule, down: LinearSite, hidden: _Hidden) -> FFNMatch | FailedMatch:
        fail = lambda reason: FailedMatch(self.name, f"{down.module or down.output.name}: {reason}")  # noqa: E731
        if hidden.problems:
            return fail(hidden.problems[0])
        sites = []
        for s in hidden.sources:
            if s.site not in sites:
                sites.append(s.site)
        x = sites[0].input
        if any(site.input is not x for site in sites):
            return fail("the up projections read different inputs")
        # Purity: nothing outside the FFN may read the hidden activation or the up projections.
        inside = set(hidden.nodes) | set(down.nodes)
        for site in sites:
            inside |= set(site.nodes)
        for s in hidden.sources:
            inside.add(s.node)
            if s.split is not None:
                inside.add(s.split)
        for node in inside - set(down.nodes):
            for user in node.users:
                if user in inside or is_ignored_user(user):
                    continue
                if _is_shape_read(user) and _feeds_only(user, inside):
                    continue  # reads only the shape, to reshape the FFN's own output
                return fail(
                    f"the hidden activation {node.name} is also used by {describe(user)}, so the FFN is "
                    "not pure (converting it would change what that user sees)"
                )
        ordered_inputs = [s.node for s in hidden.sources]
        if self.fused:
            split = hidden.sources[0].split
            parts = sorted(hidden.sources, key=lambda s: s.part)
            if len(split.users) != 2 or [s.part for s in parts] != [0, 1] or not _splits_last_dim_in_half(split, sites[0]):
                return fail("the fused projection is not split into two halves along the last dim")
            ordered_inputs = [s.node for s in parts]
        try:
            fn = _hidden_function(gm, hidden, down.input, ordered_inputs)
        except Exception as exc:  # pragma: no cover - defensive: odd node arguments
            return fail(f"cannot extract the activation subgraph ({exc})")
        up_bias = gate_up_bias = gate_up_weight = None
        if self.sources == 1 and not self.fused:
            activation = identify_activation(fn)
            if activation is None:
                return fail("the activation between the projections is not one moefx knows " f"({_ops_summary(hidden)})")
            up_weight, up_bias = sites[0].weight, sites[0].bias
        else:
            found = identify_gated_activation(fn)
            if found is None:
                return fail(f"the gated hidden function is not act(gate) * up ({_ops_summary(hidden)})")
            activation, first_is_gate = found
            if self.fused:
                w, b = sites[0].weight, sites[0].bias
                half = w.shape[0] // 2
                halves = [(w[:half], None if b is None else b[:half]), (w[half:], None if b is None else b[half:])]
            else:
                halves = [(sites[0].weight, sites[0].bias), (sites[1].weight, sites[1].bias)]
                if [s.site for s in hidden.sources] != sites[:2]:
                    halves = [halves[sites.index(s.site)] for s in hidden.sources]
            gate, up = (halves[0], halves[1]) if first_is_gate else (halves[1], halves[0])
            up_weight, up_bias = gate
            gate_up_weight, gate_up_bias = up
            if gate_up_weight.shape != up_weight.shape:
                return fail("the gate and up projections have different shapes")
        if down.in_features != up_weight.shape[0]:
            return fail(f"the down projection takes {down.in_features} features, the up gives {up_weight.shape[0]}")
        if down.out_features != up_weight.shape[1]:
            # A Transformer FFN adds its output to its input; a pair that changes the width is a head
            # (pooler -> classifier) or a projection between two widths.
            return fail(f"it maps {up_weight.shape[1]} features to {down.out_features}, not back to its input "
                        "width: a head or a projection, not a residual FFN")
        if not _same_leading_shape(x, down.output):
            return fail("the FFN output does not keep the input's leading dims")
        nodes = list(dict.fromkeys([*[n for site in sites for n in site.nodes], *hidden.nodes,
                                    *[s.node for s in hidden.sources if s.part is not None],
                                    *[s.split for s in hidden.sources if s.split is not None], *down.nodes]))
        return FFNMatch(
            rule=self.name, input=x, output=down.output, nodes=nodes,
            up_weight=up_weight, up_bias=up_bias, gate_up_weight=gate_up_weight, gate_up_bias=gate_up_bias,
            down_weight=down.weight, down_bias=down.bias, activation=activation, dropout_p=hidden.dropout_p,
            modules=[site.module for site in sites] + [down.module], forms=[site.form for site in sites] + [down.form],
        )


def _splits_last_dim_in_half(split: fx.Node, site: LinearSite) -> bool:
    args = [*split.args, None, None]
    size = args[1]
    dim = split.kwargs.get("dim", args[2] if args[2] is not None else 0)  # chunk/split default to dim 0
    if dim != -1 and not _is_last_dim(site.output, dim):
        return False
    out = site.out_features
    if split.target in (torch.chunk, aten.chunk.default, "chunk"):
        return size == 2 and out % 2 == 0
    if isinstance(size, (list, tuple)):
        return len(size) == 2 and size[0] == size[1] == out // 2
    return out % 2 == 0 and size == out // 2


def _is_last_dim(node: fx.Node, dim: int) -> bool:
    val = node.meta.get("val")
    return val is not None and hasattr(val, "dim") and dim == val.dim() - 1


def _same_leading_shape(x: fx.Node, out: fx.Node) -> bool:
    xv, ov = x.meta.get("val"), out.meta.get("val")
    if xv is None or ov is None or not hasattr(xv, "shape") or not hasattr(ov, "shape"):
        return True
    return xv.dim() == ov.dim() and all(
        str(a) == str(b) for a, b in zip(xv.shape[:-1], ov.shape[:-1])
    )


def _ops_summary(hidden: _Hidden) -> str:
    names = []
    for n in hidden.nodes:
        t = n.target
        names.append(getattr(t, "__name__", str(t)).split(".")[-1] if n.op != "call_module" else str(t))
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if names else "no ops"


#: The FFN shapes moefx converts, tried in this order.
FFN_RULES: dict[str, FFNRule] = {
    rule.name: rule
    for rule in (
        FFNRule("mlp", 1, False, "down(act(up(x))), optional dropout before down"),
        FFNRule("glu", 2, False, "down(act(gate(x)) * up(x)) (SwiGLU, GeGLU)"),
        FFNRule("fused-glu", 2, True, "gate_up = proj(x); a, b = chunk(gate_up, 2); down(act(a) * b)"),
    )
}


def match_ffn(gm: fx.GraphModule, down: LinearSite, site_by_output: dict[fx.Node, LinearSite]) -> FFNMatch | FailedMatch:
    """Try every rule with ``down`` as the down projection."""
    hidden = _collect_hidden(gm, down, site_by_output)
    if not hidden.sources:
        return FailedMatch("", "no up projection feeds it through elementwise ops", interesting=False)
    if not hidden.nodes and all(s.part is None for s in hidden.sources):
        return FailedMatch("", "two projections with no activation between them", interesting=False)
    for rule in FFN_RULES.values():
        if rule.applies(hidden):
            return rule.match(gm, down, hidden)
    n = len({id(s.site) for s in hidden.sources})
    return FailedMatch("", f"{down.module or down.output.name}: {n} projections feed its hidden activation; "
                       f"no FFN rule takes that shape ({', '.join(FFN_RULES)})")
