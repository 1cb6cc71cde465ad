"""ONNX translations of moefx's dispatch ops: one fused ``com.microsoft.MoE`` node, or standard ONNX ops.

Every ``moefx::`` dispatch op has one translation in :data:`TRANSLATIONS`, keyed by its ``OpOverload``; the
exporter hands it to ``torch.onnx.export`` as a ``custom_translation_table`` entry. A translation is a plain
function ``(options, *op_args) -> (output, Lowering)``: it emits onnxscript ops for one call of the op and says
how it lowered it and why. A router that brings its own dispatch op registers its translation with
:func:`register_translation`, built from the pieces here:

* :func:`fused_activation` - can ONNX Runtime's MoE kernel compute these experts, and with which attributes;
* :func:`ort_moe` - the fused node for softmax-top-k routing (router logits fed as ``router_probs``);
* :func:`ort_moe_weighted` - the fused node for any non-negative per-expert combine weights;
* :func:`ort_moe_unit` - the fused node for unit-weight top-k (``split`` experts), a shared expert and a bias;
* :func:`topk_combine`, :func:`assigned_combine` - a dense ``[tokens, experts]`` combine matrix;
* :func:`dense_experts` - all experts batched with MatMul, combined by that matrix (standard ops only);
* :func:`gather_experts` - per expert, its tokens gathered and MatMuls with constant weights (standard ops only);
* :func:`call_moe_ffn_function` - the unfused ``moe_ffn`` as one call of a model-local ONNX function
  ``moefx::moe_ffn_<activation>[_gated][_bias]`` whose body (:func:`moe_ffn_function`) is those standard ops, so
  the graph keeps one dispatch node per layer and any ONNX runtime runs it (the exporter adds the
  FunctionProtos, one per kind; ONNX Runtime inlines them).

Facts about ONNX Runtime's CPU MoE kernel (onnxruntime 1.32) this module relies on, each measured against a
NumPy reference: ``relu``/``silu``/``identity`` are exact; ``gelu`` is the tanh approximation (exact for
``gelu_tanh``, up to 4.7e-4 from erf GELU); ``swiglu`` needs ``swiglu_fusion=1`` (gate and up interleaved by row) and
computes ``g * sigmoid(alpha * g) * (u + beta)`` with no clamp unless ``swiglu_limit`` is set (defaults
``alpha=1, beta=0``); ``relu2`` and ``geglu`` are rejected on CPU (CUDA only). ``use_sparse_mixer`` is never set (the CPU kernel
ignores it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18 as op
from torch.onnx._internal.exporter import _building

from . import layer_ops  # noqa: F401 - registers moefx::unit_topk_moe
from .schemas import MOEFX_DOMAIN, moefx_function_opset, ort_moe_opset

__all__ = [
    "ATEN_TRANSLATIONS",
    "GELU_APPROXIMATION",
    "MOE_FFN_FUNCTIONS",
    "ONNX_ACTIVATIONS",
    "TRANSLATIONS",
    "ExpertWeights",
    "ExportOptions",
    "Lowering",
    "MoEFunctionSpec",
    "OrtActivation",
    "assigned_combine",
    "call_moe_ffn_function",
    "dense_experts",
    "fused_activation",
    "gather_experts",
    "moe_ffn_function",
    "ort_moe",
    "ort_moe_unit",
    "ort_moe_weighted",
    "register_translation",
    "topk_combine",
]

GELU_APPROXIMATION = (
    "exact (erf) GELU runs as ONNX Runtime's tanh-approximated GELU (|difference| <= 4.7e-4 per activation); "
    "export with exact=True (--exact) to keep the layer exact, unfused"
)
_FUNCTION_METHOD = ("one call of the model-local ONNX function {name} (standard ONNX ops: per expert, Gather of "
                    "its tokens, MatMuls, ScatterND-add into the output)")


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked of the ONNX export.

    Attributes:
        fused: translate each MoE layer to one ``com.microsoft.MoE`` node where ONNX Runtime can run it.
        exact: keep layers unfused where the fused kernel would approximate them (exact GELU).
        fuse_assigned: also fuse layers whose router assigns experts itself (capacity limits), by feeding
            the assignment to the fused node as log-weights (needs non-negative combine weights).
        gather_experts: lower every MoE layer to per-expert standard ops instead (:func:`gather_experts`):
            each expert gathers its tokens and runs MatMuls with constant 2-D weights, which ONNX Runtime
            pre-packs; faster than ``com.microsoft.MoE`` (which packs its weights on every run) for
            prefill-sized inputs, and exact (erf GELU stays erf).
    """

    fused: bool = True
    exact: bool = False
    fuse_assigned: bool = False
    gather_experts: bool = False


@dataclass(frozen=True)
class Lowering:
    """How one dispatch-op call was translated, and why."""

    fused: bool
    method: str
    reason: str
    approximations: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"fused": self.fused, "method": self.method, "reason": self.reason,
                "approximations": list(self.approximations), "attributes": dict(self.attributes)}


@dataclass(frozen=True)
class ExpertWeights:
    """The expert bank of one dispatch call as ONNX values (the op's ``w1, b1, w3, b3, w2, b2``)."""

    w1: ir.Value  # [E, I, H] (gate when gated)
    b1: ir.Value | None  # [E, I]
    w3: ir.Value | None  # [E, I, H] up of a gated FFN
    b3: ir.Value | None
    w2: ir.Value  # [E, O, I]
    b2: ir.Value | None  # [E, O]
    activation: str

    @property
    def gated(self) -> bool:
        return self.w3 is not None

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.w1.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.w2.shape[1])


# -- activations in standard ONNX ops -------------------------------------------------------------------


def _c(value: float, like: ir.Value) -> ir.Value:
    """The constant ``value`` in ``like``'s dtype (a bare Python float would be a float32 constant)."""
    return op.CastLike(op.Constant(value_float=value), like)


def _gelu(x: ir.Value) -> ir.Value:
    return op.Mul(op.Mul(x, _c(0.5, x)), op.Add(op.Erf(op.Mul(x, _c(math.sqrt(0.5), x))), _c(1.0, x)))


def _gelu_tanh(x: ir.Value) -> ir.Value:
    inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), _c(0.044715, x))), _c(math.sqrt(2.0 / math.pi), x))
    return op.Mul(op.Mul(x, _c(0.5, x)), op.Add(op.Tanh(inner), _c(1.0, x)))


def _relu2(x: ir.Value) -> ir.Value:
    r = op.Relu(x)
    return op.Mul(r, r)


#: Every activation in :data:`moefx.activations.ACTIVATIONS`, in standard ONNX ops (opset 18).
ONNX_ACTIVATIONS: dict[str, Callable[[ir.Value], ir.Value]] = {
    "relu": op.Relu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda x: op.Mul(x, op.Sigmoid(x)),
    "quick_gelu": lambda x: op.Mul(x, op.Sigmoid(op.Mul(x, _c(1.702, x)))),
    "relu2": _relu2,
    "tanh": op.Tanh,
    "sigmoid": op.Sigmoid,
}


# -- what ONNX Runtime's MoE kernel can compute ----------------------------------------------------------


@dataclass(frozen=True)
class OrtActivation:
    """ONNX Runtime MoE attributes that compute a moefx activation, and how fc1 must be laid out.

    ``fc1_layout``: ``"up"`` (fc1 = w1), ``"gate_up"`` (rows of w1 and w3 interleaved, swiglu_fusion=1) or
    ``"gate_zero"`` (rows of w1 interleaved with zero rows, so swiglu's up factor is ``0 + beta = 1``).
    """

    activation_type: str
    fc1_layout: str = "up"
    attributes: dict[str, Any] = field(default_factory=dict)
    approximation: str | None = None
    note: str = ""


_SWIGLU = {"activation_type": "swiglu", "fc1_layout": "gate_up"}
_ORT_ACTIVATIONS: dict[tuple[str, bool], OrtActivation] = {
    ("relu", False): OrtActivation("relu"),
    ("silu", False): OrtActivation("silu"),
    ("gelu_tanh", False): OrtActivation("gelu"),
    ("gelu", False): OrtActivation("gelu", approximation=GELU_APPROXIMATION),
    ("quick_gelu", False): OrtActivation(
        "swiglu", "gate_zero", {"swiglu_fusion": 1, "activation_alpha": 1.702, "activation_beta": 1.0},
        note="x*sigmoid(1.702x) as swiglu over zero up rows (fc1 twice as large)",
    ),
    ("silu", True): OrtActivation(**_SWIGLU, attributes={"swiglu_fusion": 1, "activation_alpha": 1.0,
                                                         "activation_beta": 0.0}),
    ("quick_gelu", True): OrtActivation(**_SWIGLU, attributes={"swiglu_fusion": 1, "activation_alpha": 1.702,
                                                               "activation_beta": 0.0}),
}
_NO_ORT_FORM: dict[tuple[str, bool], str] = {
    ("gelu", True): "GeGLU experts: ONNX Runtime's MoE runs geglu on CUDA only (its CPU kernel rejects it)",
    ("gelu_tanh", True): "GeGLU experts: ONNX Runtime's MoE runs geglu on CUDA only (its CPU kernel rejects it)",
    ("relu2", False): "squared-ReLU experts: ONNX Runtime's MoE runs relu2 on CUDA only (its CPU kernel rejects it)",
}
_FUSED_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def fused_activation(experts: ExpertWeights, x: ir.Value, options: ExportOptions) -> OrtActivation | str:
    """The ONNX Runtime MoE form of these experts, or the reason there is none (for the export report)."""
    key = (experts.activation, experts.gated)
    kind = ("gated " if experts.gated else "") + experts.activation
    if key in _NO_ORT_FORM:
        return _NO_ORT_FORM[key]
    form = _ORT_ACTIVATIONS.get(key)
    if form is None:
        return f"{kind} experts: ONNX Runtime's MoE kernel has no such activation"
    if form.approximation and options.exact:
        return "exact GELU experts: ONNX Runtime's MoE computes the tanh approximation, and exact export was asked for"
    if experts.out_features != experts.in_features:
        return (f"experts map {experts.in_features} -> {experts.out_features} features; ONNX Runtime's MoE "
                "needs the output width equal to the input width")
    if x.dtype is not None and x.dtype not in _FUSED_DTYPES:
        return f"{x.dtype.name} activations: ONNX Runtime's CPU MoE kernel runs float32 and float16 only"
    return form


# -- fused: com.microsoft.MoE ----------------------------------------------------------------------------


def _interleave_rows(first: ir.Value, second: ir.Value) -> ir.Value:
    """``[E, I, ...]`` x 2 -> ``[E, 2I, ...]`` with rows ``first[0], second[0], first[1], ...``."""
    shape = [int(d) for d in first.shape]
    pairs = op.Concat(op.Unsqueeze(first, [2]), op.Unsqueeze(second, [2]), axis=2)  # [E, I, 2, ...]
    return op.Reshape(pairs, op.Constant(value_ints=[shape[0], 2 * shape[1], *shape[2:]]))


def _zeros_like(value: ir.Value) -> ir.Value:
    zero = op.CastLike(op.Constant(value_float=0.0), value)
    return op.Expand(zero, op.Constant(value_ints=[int(d) for d in value.shape]))


def _fc1(experts: ExpertWeights, layout: str) -> tuple[ir.Value, ir.Value | None]:
    """fc1 weights and bias in the layout ``layout`` (weight-only subgraphs, folded after export)."""
    w1, b1 = experts.w1, experts.b1
    if layout == "up":
        return w1, b1
    if layout == "gate_up":
        w3, b3 = experts.w3, experts.b3
        assert w3 is not None
        bias = None
        if b1 is not None or b3 is not None:
            bias = _interleave_rows(b1 if b1 is not None else _zeros_like(b3),
                                    b3 if b3 is not None else _zeros_like(b1))
        return _interleave_rows(w1, w3), bias
    if layout == "gate_zero":
        bias = None if b1 is None else _interleave_rows(b1, _zeros_like(b1))
        return _interleave_rows(w1, _zeros_like(w1)), bias
    raise ValueError(f"unknown fc1 layout {layout!r}")


def _ort_attributes(form: OrtActivation, k: int, normalize: bool) -> dict[str, Any]:
    return {"k": int(k), "activation_type": form.activation_type, "normalize_routing_weights": int(normalize),
            **form.attributes}


def ort_moe(x: ir.Value, router_logits: ir.Value, experts: ExpertWeights, form: OrtActivation, *, k: int,
            normalize: bool) -> tuple[ir.Value, Lowering]:
    """One ``com.microsoft.MoE`` node: softmax over the logits, top k, optional renormalisation, experts.

    That is exactly ``moefx::topk_moe``, so the router logits go in as ``router_probs`` unchanged.
    """
    fc1, fc1_bias = _fc1(experts, form.fc1_layout)
    probs = router_logits if router_logits.dtype == x.dtype else op.CastLike(router_logits, x)  # [T, E]
    attributes = _ort_attributes(form, k, normalize)
    y = ort_moe_opset().MoE(x, probs, fc1, fc1_bias, experts.w2, experts.b2, **attributes)
    return y, _fused_lowering(form, attributes, "token-choice top-k routing is what com.microsoft.MoE computes")


def ort_moe_weighted(x: ir.Value, combine: ir.Value, experts: ExpertWeights, form: OrtActivation, *,
                     k: int) -> tuple[ir.Value, Lowering]:
    """One ``com.microsoft.MoE`` node for arbitrary non-negative combine weights ``combine [T, E]``.

    The kernel weights expert e by ``softmax(router_probs)[e]`` over the top k (renormalised). Feeding
    ``router_probs = log(w)`` (``-1e4`` where ``w == 0``) makes that ``w_e / sum(w)`` on the at most k
    experts with ``w > 0``; multiplying the output by ``sum(w)`` restores ``sum_e w_e * expert_e(x)``. A
    token with no expert (all dropped) has ``sum(w) = 0`` and gets zero, as in torch. ``k`` must be at least
    the number of non-zero weights per token.
    """
    fc1, fc1_bias = _fc1(experts, form.fc1_layout)
    combine = op.Cast(combine, to=ir.DataType.FLOAT)  # [T, E]
    log_weight = op.Where(op.Greater(combine, 0.0), op.Log(combine), -1.0e4)  # exp(-1e4) == 0 in float32
    total = op.ReduceSum(combine, op.Constant(value_ints=[1]), keepdims=1)  # [T, 1]
    attributes = _ort_attributes(form, k, True)
    y = ort_moe_opset().MoE(x, op.CastLike(log_weight, x), fc1, fc1_bias, experts.w2, experts.b2, **attributes)
    y = op.Mul(y, op.CastLike(total, y))
    return y, _fused_lowering(
        form, attributes,
        "the router's assignment is fed to com.microsoft.MoE as log-weights and the output rescaled by their sum",
    )


#: What ``router_probs`` holds for experts a token does not use: ``exp(-1e4)`` is 0 in float32 and float16.
_NOT_CHOSEN = -1.0e4


def _shaped(value: ir.Value, shape: list[int]) -> ir.Value:
    value.shape = ir.Shape(shape)
    return value


def _const(value: float, shape: list[int], like: ir.Value) -> ir.Value:
    return _shaped(op.Expand(op.CastLike(op.Constant(value_float=value), like), op.Constant(value_ints=shape)), shape)


def _shared_pieces(shared: ExpertWeights, size: int) -> tuple[int, list[ir.Value | None]]:
    """A shared bank of one expert ``[1, s*I, ...]`` as ``s`` always-on experts of ``I`` neurons each.

    Cutting an FFN's hidden neurons into groups and summing the groups' outputs is the FFN (the activation is
    per neuron), so the pieces with weight 1 each are the shared expert. Its down bias goes to piece 0 only.
    Returns ``(s, [w1, b1, w3, b3, w2, b2])`` with ``b2`` None when the shared expert has none.
    """
    hidden, out = shared.in_features, shared.out_features
    pieces = int(shared.w1.shape[1]) // size

    def rows(value: ir.Value | None, *rest: int) -> ir.Value | None:  # [1, s*I, *rest] -> [s, I, *rest]
        if value is None:
            return None
        return _shaped(op.Reshape(value, op.Constant(value_ints=[pieces, size, *rest])), [pieces, size, *rest])

    w2 = op.Transpose(op.Reshape(shared.w2, op.Constant(value_ints=[out, pieces, size])), perm=[1, 0, 2])
    b2 = shared.b2
    if b2 is not None and pieces > 1:
        b2 = op.Concat(b2, _const(0.0, [pieces - 1, out], b2), axis=0)
    return pieces, [rows(shared.w1, hidden), rows(shared.b1), rows(shared.w3, hidden), rows(shared.b3),
                    _shaped(w2, [pieces, out, size]), None if b2 is None else _shaped(b2, [pieces, out])]


def ort_moe_unit(x: ir.Value, router_logits: ir.Value, experts: ExpertWeights, shared: ExpertWeights | None,
                 bias: ir.Value | None, form: OrtActivation, *, k: int) -> tuple[ir.Value, Lowering]:
    """One ``com.microsoft.MoE`` node for ``sum of the top-k experts (weight 1) + shared expert + bias``.

    ``router_probs`` is 0 on each token's top k (of the softmax of the logits, as in torch) and ``-1e4``
    elsewhere, so with ``normalize_routing_weights=1`` the kernel weights each of them ``1/k``. A shared
    expert of ``s`` expert-sized groups of neurons joins as ``s`` more experts whose ``router_probs`` is
    always 0 (``k + s`` of them run, each weighted ``1/(k + s)``). fc2 weights and biases are multiplied by
    ``K = k + s`` (folded into the initializers), which restores weight 1. The layer's bias is added to the
    down bias of the first shared piece, or ``bias / k`` to every routed expert's when there is no shared
    expert (the k chosen ones add up to it).
    """
    num_experts, size, out = experts.num_experts, int(experts.w1.shape[1]), experts.out_features
    pieces, extra = _shared_pieces(shared, size) if shared is not None else (0, [None] * 6)
    total = num_experts + pieces
    scale = k + pieces

    def joined(routed: ir.Value | None, piece: ir.Value | None, shape: list[int]) -> ir.Value | None:
        if routed is None and piece is None:
            return None
        if pieces == 0:
            return routed
        routed = routed if routed is not None else _const(0.0, [num_experts, *shape], piece)
        piece = piece if piece is not None else _const(0.0, [pieces, *shape], routed)
        return _shaped(op.Concat(routed, piece, axis=0), [total, *shape])

    hidden = experts.in_features
    b2_routed, b2_shared = experts.b2, extra[5]
    if bias is not None:
        if pieces:
            first = op.Unsqueeze(bias, [0])  # [1, O]: onto piece 0
            rest = [_const(0.0, [pieces - 1, out], bias)] if pieces > 1 else []
            add = op.Concat(first, *rest, axis=0) if rest else first
            b2_shared = _shaped(add if b2_shared is None else op.Add(b2_shared, add), [pieces, out])
        else:
            share = op.Unsqueeze(op.Div(bias, op.CastLike(op.Constant(value_float=float(k)), bias)), [0])
            b2_routed = _shaped(op.Expand(share, op.Constant(value_ints=[num_experts, out])) if b2_routed is None
                                else op.Add(b2_routed, share), [num_experts, out])
    fc2_bias = joined(b2_routed, b2_shared, [out])
    combined = ExpertWeights(
        joined(experts.w1, extra[0], [size, hidden]), joined(experts.b1, extra[1], [size]),
        joined(experts.w3, extra[2], [size, hidden]), joined(experts.b3, extra[3], [size]),
        joined(experts.w2, extra[4], [out, size]), fc2_bias, experts.activation,
    )
    fc1, fc1_bias = _fc1(combined, form.fc1_layout)
    factor = op.CastLike(op.Constant(value_float=float(scale)), combined.w2)
    fc2 = op.Mul(combined.w2, factor)
    fc2_bias = None if fc2_bias is None else op.Mul(fc2_bias, factor)

    probs = op.Softmax(op.Cast(router_logits, to=ir.DataType.FLOAT), axis=-1)  # [T, E]; torch picks on these
    _, index = op.TopK(probs, op.Constant(value_ints=[int(k)]), axis=-1)  # [T, k]
    chosen = op.ScatterElements(op.Expand(op.Constant(value_float=_NOT_CHOSEN), op.Shape(probs)), index,
                                op.Expand(op.Constant(value_float=0.0), op.Shape(index)), axis=1)  # [T, E]
    if pieces:
        always = op.Concat(op.Shape(probs, start=0, end=1), op.Constant(value_ints=[pieces]), axis=0)
        chosen = op.Concat(chosen, op.Expand(op.Constant(value_float=0.0), always), axis=1)  # [T, E + s]
    attributes = _ort_attributes(form, scale, True)
    y = ort_moe_opset().MoE(x, op.CastLike(chosen, x), fc1, fc1_bias, fc2, fc2_bias, **attributes)
    what = f"{k} of {num_experts} routed experts" + (f" and the shared expert as {pieces} always-on expert(s)"
                                                      if pieces else "")
    return y, _fused_lowering(
        form, attributes,
        f"unit-weight top-k (split experts): {what}, each fed router_probs 0 (others -1e4) with fc2 scaled by "
        f"{scale}" + ("; the layer bias folded into the fc2 biases" if bias is not None else ""),
    )


def _fused_lowering(form: OrtActivation, attributes: dict[str, Any], reason: str) -> Lowering:
    method = "com.microsoft.MoE(" + ", ".join(f"{k}={v}" for k, v in attributes.items()) + ")"
    if form.note:
        method += f"; {form.note}"
    approximations = (form.approximation,) if form.approximation else ()
    return Lowering(True, method, reason, approximations, dict(attributes))


# -- unfused: standard ONNX ops --------------------------------------------------------------------------


def topk_combine(router_logits: ir.Value, k: int, normalize: bool) -> ir.Value:
    """Softmax top-k routing as a dense combine matrix ``[T, E]`` (zero outside each token's top k)."""
    probs = op.Softmax(router_logits, axis=-1)  # [T, E]
    weight, index = op.TopK(probs, op.Constant(value_ints=[int(k)]), axis=-1)  # [T, k]
    if normalize:
        weight = op.Div(weight, op.ReduceSum(weight, op.Constant(value_ints=[-1]), keepdims=1))
    zeros = op.CastLike(op.ConstantOfShape(op.Shape(probs)), probs)
    return op.ScatterElements(zeros, index, weight, axis=1)


def assigned_combine(expert_index: ir.Value, combine_weight: ir.Value, num_experts: int) -> ir.Value:
    """A given assignment (``expert_index [T, k]``, ``-1`` = dropped) as a dense combine matrix ``[T, E]``."""
    zero_index = op.CastLike(op.Constant(value_int=0), expert_index)  # int64 or int32
    kept = op.GreaterOrEqual(expert_index, zero_index)  # [T, k]
    index = op.Where(kept, expert_index, zero_index)
    weight = _accumulated(combine_weight)
    weight = op.Where(kept, weight, op.CastLike(op.Constant(value_float=0.0), weight))
    shape = op.Concat(op.Shape(expert_index, start=0, end=1), op.Constant(value_ints=[num_experts]), axis=0)
    zeros = op.CastLike(op.ConstantOfShape(shape), weight)
    return op.ScatterElements(zeros, index, weight, axis=1, reduction="add")  # dropped slots add 0


#: Dtypes ONNX Runtime's CPU ScatterND and ScatterElements cannot add in: they accumulate in float32.
_HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _accumulated(value: ir.Value, dtype: ir.DataType | None = None) -> ir.Value:
    """``value`` (of ``dtype``, if its own is not known yet) in the dtype a ScatterND/ScatterElements ``add``
    accumulates it in: float32 for 16-bit floats."""
    return op.Cast(value, to=ir.DataType.FLOAT) if (dtype or value.dtype) in _HALF_TYPES else value


def _project(x: ir.Value, weight: ir.Value, bias: ir.Value | None) -> ir.Value:
    """``x [T, H]`` through every expert's ``weight [E, N, H]`` -> ``[E, T, N]``."""
    y = op.MatMul(x, op.Transpose(weight, perm=[0, 2, 1]))
    return y if bias is None else op.Add(y, op.Unsqueeze(bias, [1]))


def dense_experts(x: ir.Value, combine: ir.Value, experts: ExpertWeights) -> ir.Value:
    """Every expert on every token (batched MatMul), weighted by ``combine [T, E]`` and summed -> ``[T, O]``."""
    h = ONNX_ACTIVATIONS[experts.activation](_project(x, experts.w1, experts.b1))  # [E, T, I]
    if experts.w3 is not None:
        h = op.Mul(h, _project(x, experts.w3, experts.b3))
    y = _project(h, experts.w2, experts.b2)  # [E, T, O]
    gate = op.Unsqueeze(op.Transpose(combine, perm=[1, 0]), [2])  # [E, T, 1]
    if combine.dtype != x.dtype:
        gate = op.CastLike(gate, x)
    return op.ReduceSum(op.Mul(y, gate), op.Constant(value_ints=[0]), keepdims=0)


# -- per-expert gather + MatMul with constant weights ----------------------------------------------------

_GATHER_METHOD = ("standard ONNX ops: per expert, Gather of its tokens, MatMuls with constant 2-D weights "
                  "(pre-packed by ONNX Runtime), ScatterND-add into the output")
_GATHER_REASON = ("gather_experts=True (--gather-experts): per-expert MatMuls with constant weights that ONNX Runtime "
                  "pre-packs, faster than com.microsoft.MoE (which packs its weights on every run) at prefill sizes")


def _expert_matrix(weight: ir.Value, e: int) -> ir.Value:
    """Expert ``e`` of ``weight [E, N, H]`` as the MatMul operand ``[H, N]`` (folded into an initializer)."""
    return op.Transpose(op.Gather(weight, op.Constant(value_int=e), axis=0), perm=[1, 0])


def _expert_bias(bias: ir.Value | None, e: int) -> ir.Value | None:
    return None if bias is None else op.Gather(bias, op.Constant(value_int=e), axis=0)


def _linear(x: ir.Value, weight: ir.Value, bias: ir.Value | None) -> ir.Value:
    y = op.MatMul(x, weight)
    return y if bias is None else op.Add(y, bias)


def expert_ffn(x: ir.Value, experts: ExpertWeights, e: int) -> ir.Value:
    """Expert ``e`` on the rows ``x [N, H]`` with constant 2-D weights -> ``[N, O]``."""
    h = ONNX_ACTIVATIONS[experts.activation](_linear(x, _expert_matrix(experts.w1, e), _expert_bias(experts.b1, e)))
    if experts.w3 is not None:
        h = op.Mul(h, _linear(x, _expert_matrix(experts.w3, e), _expert_bias(experts.b3, e)))
    return _linear(h, _expert_matrix(experts.w2, e), _expert_bias(experts.b2, e))


def gather_experts(x: ir.Value, combine: ir.Value, experts: ExpertWeights, num_experts: int | None = None) -> ir.Value:
    """``sum_e combine[:, e] * expert_e(x)`` with each expert run on its own tokens only -> ``[T, O]``.

    Per expert: the tokens with a non-zero weight (``NonZero``), their rows (``Gather``), the expert FFN as
    MatMuls with 2-D weights taken from the bank (constant initializers once ONNX Runtime folds the slicing,
    so it pre-packs them at session start), the rows weighted and added into the output (``ScatterND``,
    reduction ``add``). Standard ops only. ``num_experts``: where the bank's shape is not known (inside a
    function body).
    """
    combine = op.CastLike(combine, x)  # [T, E]
    shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(experts.w2, start=1, end=2), axis=0)
    half = x.dtype in _HALF_TYPES  # then the output accumulates in float32 (see _accumulated)
    out = op.ConstantOfShape(shape) if half else op.CastLike(op.ConstantOfShape(shape), x)  # [T, O]
    for e in range(experts.num_experts if num_experts is None else num_experts):
        weight = op.Gather(combine, op.Constant(value_int=e), axis=1)  # [T]
        # NonZero of a bool mask: ORT's CPU provider has NonZero for bool, not for float64.
        chosen = op.Not(op.Equal(weight, op.CastLike(op.Constant(value_float=0.0), weight)))  # [T]
        rows = op.Transpose(op.NonZero(chosen), perm=[1, 0])  # [n_e, 1]
        index = op.Reshape(rows, op.Constant(value_ints=[-1]))  # [n_e]
        y = expert_ffn(op.Gather(x, index, axis=0), experts, e)  # [n_e, O]
        y = op.Mul(y, op.Unsqueeze(op.Gather(weight, index, axis=0), [1]))
        out = op.ScatterND(out, rows, _accumulated(y, x.dtype), reduction="add")
    return op.CastLike(out, x) if half else out


def _gathered(x: ir.Value, combine: ir.Value, experts: ExpertWeights) -> tuple[ir.Value, Lowering]:
    return gather_experts(x, combine, experts), Lowering(False, _GATHER_METHOD, _GATHER_REASON)


# -- unfused as a model-local ONNX function (domain "moefx") ---------------------------------------------


@dataclass(frozen=True)
class MoEFunctionSpec:
    """One ``moefx::moe_ffn_*`` function: the expert kind it computes, and which optional weights it takes."""

    activation: str
    num_experts: int
    inputs: tuple[str, ...]  # x, expert_index, combine_weight, w1, [b1], [w3], [b3], w2, [b2]
    dtype: ir.DataType
    index_dtype: ir.DataType
    weight_dtype: ir.DataType

    @property
    def name(self) -> str:
        gated = "w3" in self.inputs
        biases = [b for b in ("b1", "b3", "b2") if b in self.inputs]
        expected = ["b1", "b3", "b2"] if gated else ["b1", "b2"]
        suffix = "" if not biases else "_bias" if biases == expected else "_" + "".join(biases)
        types = "" if (self.dtype, self.index_dtype, self.weight_dtype) == (
            ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.FLOAT) else (
            f"_{self.dtype.name.lower()}_{self.index_dtype.name.lower()}_{self.weight_dtype.name.lower()}")
        return f"moe_ffn_{self.activation}{'_gated' if gated else ''}_e{self.num_experts}{suffix}{types}"


#: The functions the unfused ``moe_ffn`` translation called, by name; the exporter adds their bodies to the model.
MOE_FFN_FUNCTIONS: dict[str, MoEFunctionSpec] = {}


def moe_ffn_function(spec: MoEFunctionSpec, opset_version: int = 18) -> ir.Function:
    """The body of ``moefx::<spec.name>``: the assignment as a combine matrix, then :func:`gather_experts` (each
    expert on its own tokens) in standard ops."""
    values = {name: ir.Value(name=name) for name in spec.inputs}
    values["x"].dtype = spec.dtype
    values["expert_index"].dtype = spec.index_dtype
    values["combine_weight"].dtype = spec.weight_dtype
    for name in spec.inputs[3:]:
        values[name].dtype = spec.dtype
    recorder = _building.OpRecorder(op, {})
    with onnxscript.evaluator.default_as(recorder):
        experts = ExpertWeights(values["w1"], values.get("b1"), values.get("w3"), values.get("b3"), values["w2"],
                                values.get("b2"), spec.activation)
        combine = assigned_combine(values["expert_index"], values["combine_weight"], spec.num_experts)  # [T, E]
        output = gather_experts(values["x"], combine, experts, spec.num_experts)
    output.name = "output"
    graph = ir.Graph([values[name] for name in spec.inputs], [output], nodes=recorder.nodes,
                     opset_imports={"": opset_version}, name=spec.name)
    return ir.Function(MOEFX_DOMAIN, spec.name, "", graph=graph, attributes=())


def call_moe_ffn_function(x: ir.Value, expert_index: ir.Value, combine_weight: ir.Value,
                          experts: ExpertWeights) -> tuple[ir.Value, str]:
    """One ``moefx::moe_ffn_*`` node computing :func:`gather_experts` for a given assignment; returns its name."""
    args = {"x": x, "expert_index": expert_index, "combine_weight": combine_weight, "w1": experts.w1,
            "b1": experts.b1, "w3": experts.w3, "b3": experts.b3, "w2": experts.w2, "b2": experts.b2}
    args = {name: value for name, value in args.items() if value is not None}
    float_type = ir.DataType.FLOAT
    spec = MoEFunctionSpec(experts.activation, experts.num_experts, tuple(args), x.dtype or float_type,
                           expert_index.dtype or ir.DataType.INT64, combine_weight.dtype or float_type)
    MOE_FFN_FUNCTIONS[spec.name] = spec
    node = getattr(moefx_function_opset(spec.name, list(args)), spec.name)
    return node(*args.values()), spec.name


# -- the registry ----------------------------------------------------------------------------------------

#: ``(options, *op_args) -> (output, Lowering)``
Translation = Callable[..., tuple[ir.Value, Lowering]]

#: Translations of the dispatch ops, by op overload.
TRANSLATIONS: dict[torch._ops.OpOverload, Translation] = {}


def register_translation(op_overload: torch._ops.OpOverload) -> Callable[[Translation], Translation]:
    """Decorator: register ``fn`` as the ONNX translation of the dispatch op ``op_overload``.

    ``fn(options, *args)`` takes :class:`ExportOptions` and the op's arguments (tensors as ONNX values,
    ``None`` for absent optional tensors, Python values for the rest) and returns ``(output, Lowering)``.
    """

    def register(fn: Translation) -> Translation:
        TRANSLATIONS[op_overload] = fn
        return fn

    return register


#: ATen ops that routers use and torch.onnx has no translation for: op overload -> onnxscript function.
ATEN_TRANSLATIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {}


def _aten_sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``torch.sort(..., stable=True)`` (``argsort(stable=True)``, Batch Priority Routing).

    ONNX TopK over the whole axis breaks ties by the lower index first, which is exactly a stable sort.
    """
    axis = dim % len(self.shape)
    count = op.Shape(self, start=axis, end=axis + 1)
    values, indices = op.TopK(self, count, axis=axis, largest=int(bool(descending)), sorted=1)
    return values, indices


ATEN_TRANSLATIONS[torch.ops.aten.sort.stable] = _aten_sort_stable


def _unfused_reason(options: ExportOptions, fused_form: OrtActivation | str) -> str:
    if not options.fused:
        return "unfused export was asked for"
    return fused_form if isinstance(fused_form, str) else ""


@register_translation(torch.ops.moefx.topk_moe.default)
def translate_topk_moe(options: ExportOptions, x, router_logits, w1, b1, w3, b3, w2, b2, k: int, normalize: bool,
                       activation: str) -> tuple[ir.Value, Lowering]:
    """Dropless softmax top-k: fused as com.microsoft.MoE, else standard ops (each expert on its own tokens)."""
    experts = ExpertWeights(w1, b1, w3, b3, w2, b2, activation)
    if options.gather_experts:
        return _gathered(x, topk_combine(router_logits, k, normalize), experts)
    form = fused_activation(experts, x, options)
    if options.fused and isinstance(form, OrtActivation):
        return ort_moe(x, router_logits, experts, form, k=k, normalize=normalize)
    # Standard ops: the gathered form, not dense_experts (every expert on every token is slower than dense).
    combine = topk_combine(router_logits, k, normalize)
    return gather_experts(x, combine, experts), Lowering(False, _GATHER_METHOD, _unfused_reason(options, form))


_ASSIGNED_REASON = (
    "its router assigns experts itself (capacity limits drop tokens; expert choice, soft slots), which "
    "com.microsoft.MoE's softmax top-k routing does not compute; fuse_assigned=True (--fuse-assigned) fuses it "
    "with log-weights"
)


@register_translation(torch.ops.moefx.moe_ffn.default)
def translate_moe_ffn(options: ExportOptions, x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2,
                      activation: str) -> tuple[ir.Value, Lowering]:
    """A given assignment: one call of a model-local ``moefx::moe_ffn_*`` function (standard ops inside), or
    (``fuse_assigned``) com.microsoft.MoE fed with log-weights."""
    experts = ExpertWeights(w1, b1, w3, b3, w2, b2, activation)
    if options.gather_experts:
        return _gathered(x, assigned_combine(expert_index, combine_weight, experts.num_experts), experts)
    form = fused_activation(experts, x, options)
    if options.fused and options.fuse_assigned and isinstance(form, OrtActivation):
        combine = assigned_combine(expert_index, combine_weight, experts.num_experts)  # [T, E]
        return ort_moe_weighted(x, combine, experts, form, k=int(expert_index.shape[1]))
    reason = _unfused_reason(options, form) or _ASSIGNED_REASON
    y, name = call_moe_ffn_function(x, expert_index, combine_weight, experts)
    return y, Lowering(False, _FUNCTION_METHOD.format(name=f"{MOEFX_DOMAIN}::{name}"), reason)


@register_translation(torch.ops.moefx.unit_topk_moe.default)
def translate_unit_topk_moe(options: ExportOptions, x, router_logits, w1, b1, w3, b3, w2, b2, shared_w1, shared_b1,
                            shared_w3, shared_b3, shared_w2, shared_b2, bias, k: int,
                            activation: str) -> tuple[ir.Value, Lowering]:
    """Unit-weight top-k plus shared expert and bias (a ``split`` layer): one com.microsoft.MoE node, else the
    ``moefx::moe_ffn_*`` function on an all-ones assignment with the shared expert and bias in standard ops."""
    experts = ExpertWeights(w1, b1, w3, b3, w2, b2, activation)
    shared = None if shared_w1 is None else ExpertWeights(shared_w1, shared_b1, shared_w3, shared_b3, shared_w2,
                                                          shared_b2, activation)
    if options.gather_experts:
        probs = op.Softmax(op.Cast(router_logits, to=ir.DataType.FLOAT), axis=-1)
        _, index = op.TopK(probs, op.Constant(value_ints=[int(k)]), axis=-1)  # [T, k]
        ones = op.Expand(op.Constant(value_float=1.0), op.Shape(index))
        y, lowering = _gathered(x, op.ScatterElements(op.Expand(op.Constant(value_float=0.0), op.Shape(probs)), index,
                                                      ones, axis=1), experts)
        if shared is not None:
            y = op.Add(y, expert_ffn(x, shared, 0))
        return (y if bias is None else op.Add(y, bias)), lowering
    form = fused_activation(experts, x, options)
    if options.fused and isinstance(form, OrtActivation):
        return ort_moe_unit(x, router_logits, experts, shared, bias, form, k=k)
    probs = op.Softmax(op.Cast(router_logits, to=ir.DataType.FLOAT), axis=-1)
    _, index = op.TopK(probs, op.Constant(value_ints=[int(k)]), axis=-1)  # [T, k]
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(index))  # [T, k]
    y, name = call_moe_ffn_function(x, index, ones, experts)
    if shared is not None:
        first = op.Slice(ones, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))
        y = op.Add(y, dense_experts(x, first, shared))  # [T, 1] weight 1 on the one shared expert
    if bias is not None:
        y = op.Add(y, bias)
    method = _FUNCTION_METHOD.format(name=f"{MOEFX_DOMAIN}::{name}") + " on an all-ones assignment" + (
        ", the shared expert and the bias in standard ops" if shared is not None or bias is not None else "")
    return y, Lowering(False, method, _unfused_reason(options, form))
