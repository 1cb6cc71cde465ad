"""The MoE dispatch as ``torch.library`` custom ops.

Two ops, so that ``torch.export`` keeps one node per MoE layer and the ONNX exporter can translate that node
into one fused dispatch op:

``moefx::topk_moe(x, router_logits, w1, b1, w3, b3, w2, b2, k, normalize, activation)``
    Dropless token-choice top-k: softmax over the router logits, top k, optional renormalisation, experts,
    weighted sum. The same contract as ONNX Runtime's ``com.microsoft.MoE``.

``moefx::moe_ffn(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation)``
    A given assignment: token t goes to experts ``expert_index[t, :]`` (``-1`` = dropped) with weights
    ``combine_weight[t, :]``. Routers with capacity limits or their own assignment rule use it.

Shapes: ``x [T, H]``, ``w1 [E, I, H]`` (up, or gate when gated), ``w3 [E, I, H]`` (up of a gated FFN, else
None), ``w2 [E, O, I]``, biases ``[E, I]`` / ``[E, O]``; result ``[T, O]``.

The eager kernel (:func:`moe_ffn_kernel`) groups tokens by expert with one stable sort and runs one GEMM chain
per expert that has tokens (never a loop over tokens), adding each expert's weighted rows into the output in
place (``index_add_``); a single token (decoding) skips the sort. Its GEMMs go through oneDNN's matmul
where that is available and the expert has enough rows (see :func:`_linear`): on this project's AMD CPUs the
MKL GEMM behind ``F.linear`` runs at about half of oneDNN's speed for these shapes.
Backward recomputes the forward under autograd with the differentiable :func:`moe_ffn_reference` (like
activation checkpointing), so the op stores no hidden activations.

:func:`moe_ffn_kernel` is also what ``MoELayer`` calls directly in eager inference (no autograd, no tracing),
with the assignment its router already computed: the dispatcher round trip of a custom op and a second top-k
are then skipped. Under ``torch.export``, ``torch.compile``, FX tracing, a dispatch mode or autograd the layer
calls the ops, so the graph still holds one node per MoE layer.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS

__all__ = [
    "expert_ffn",
    "moe_ffn",
    "moe_ffn_kernel",
    "moe_ffn_reference",
    "route_topk",
    "topk_moe",
    "topk_moe_reference",
]


def route_topk(router_logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top k, optional renormalisation. Returns ``(index [T, k], weight [T, k])``."""
    logits = router_logits.float()
    if normalize:
        # Softmax, top k, renormalise = the softmax of the k largest logits: the same function (and gradient),
        # without a softmax over all experts (at 512 tokens x 8 experts 4x cheaper on CPU).
        weight, index = torch.topk(logits, k, dim=-1)  # [T, k], largest first
        weight = torch.exp(weight - weight[..., :1])
        return index, weight / weight.sum(dim=-1, keepdim=True)
    probs = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # softmax; torch.softmax is slow on short rows
    probs = probs / probs.sum(dim=-1, keepdim=True)  # [T, E]
    weight, index = torch.topk(probs, k, dim=-1)  # [T, k]
    return index, weight


def expert_ffn(
    x: torch.Tensor,
    e: int,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Expert ``e`` of a stacked bank applied to rows ``x [N, H]``; differentiable (dropout: training only)."""
    h = ACTIVATIONS[activation](F.linear(x, w1[e], None if b1 is None else b1[e]))
    if w3 is not None:
        h = h * F.linear(x, w3[e], None if b3 is None else b3[e])
    if dropout > 0:
        h = F.dropout(h, dropout, training=True)
    return F.linear(h, w2[e], None if b2 is None else b2[e])


def _group_by_expert(expert_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token-expert assignments grouped by expert: ``(order, token, counts)``.

    ``order [kept]`` indexes the flattened ``[T*k]`` assignments, expert by expert; ``token [kept]`` is the
    token of each; ``counts [E]`` how many each expert got. Dropped assignments (-1) are left out.
    """
    k = expert_index.shape[1]
    flat_expert = expert_index.reshape(-1)  # [T*k]
    # Dropped assignments sort into an extra bucket past the last expert, which is then cut off.
    flat_expert = torch.where(flat_expert < 0, num_experts, flat_expert)
    order = torch.sort(flat_expert, stable=True)[1]
    counts = torch.bincount(flat_expert, minlength=num_experts + 1).tolist()
    order = order[: len(order) - counts[num_experts]]
    token = torch.div(order, k, rounding_mode="floor")
    return order, token, counts[:num_experts]


def moe_ffn_reference(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Grouped expert FFN for a given assignment; differentiable (the op's backward and the dropout path)."""
    out = x.new_zeros(expert_index.shape[0], w2.shape[1])
    order, token, counts = _group_by_expert(expert_index, w1.shape[0])
    if not len(order):
        return out
    x_sorted = x.index_select(0, token)  # [kept, H]
    outputs = []
    start = 0
    for e, count in enumerate(counts):
        if count:
            segment = x_sorted[start : start + count]
            outputs.append(expert_ffn(segment, e, w1, b1, w3, b3, w2, b2, activation, dropout))
            start += count
    y = torch.cat(outputs, dim=0)  # [kept, O]
    gate = combine_weight.reshape(-1).index_select(0, order).to(y.dtype)
    return out.index_add(0, token, y * gate.unsqueeze(-1))


def moe_ffn_kernel(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The forward of :func:`moe_ffn_reference`, faster and not differentiable (in-place ops, ``out=`` GEMMs).

    Same arguments and result; ``combine_weight`` is used in ``x``'s dtype.
    """
    act = ACTIVATIONS[activation]
    num_tokens = expert_index.shape[0]
    out_features = w2.shape[1]
    if num_tokens == 1:
        # Decoding: k expert calls on one row; no sort, no gather, no scatter.
        out = None
        for e, gate in zip(expert_index[0].tolist(), combine_weight[0].tolist()):
            if e < 0:
                continue
            y = _expert_rows(x, e, w1, b1, w3, b3, w2, b2, act)
            out = y.mul_(gate) if out is None else out.add_(y, alpha=gate)
        return x.new_zeros(1, out_features) if out is None else out
    threads = torch.get_num_threads()
    with _serial_glue(threads > 1 and x.device.type == "cpu" and _SERIAL_GLUE):
        out = x.new_zeros(num_tokens, out_features)
        order, token, counts = _group_by_expert(expert_index, w1.shape[0])
        if not len(order):
            return out
        x_sorted = x.index_select(0, token)  # [kept, H]
        gate = combine_weight.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(-1)  # [kept, 1]
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            y = _expert_rows(x_sorted[start:end], e, w1, b1, w3, b3, w2, b2, act, threads)  # [count, O]
            out.index_add_(0, token[start:end], y.mul_(gate[start:end]))
            start = end
    return out


#: Whether the eager kernel runs everything but its GEMMs on one thread (``MOEFX_SERIAL_GLUE=0``: off).
_SERIAL_GLUE = os.environ.get("MOEFX_SERIAL_GLUE", "1") != "0"


@contextlib.contextmanager
def _serial_glue(enabled: bool):
    """Run the block's ops on one intra-op thread (GEMMs inside it switch back, see :func:`_expert_rows`).

    The gathers, activations and scatters between expert GEMMs are small (one expert's rows): split over
    threads, each costs a wake-up of the pool, tens of microseconds under ``OMP_WAIT_POLICY=PASSIVE`` (the
    setting for shared machines), more than the work itself; at 2 threads this made a 512-token layer 1.7x
    slower. The intra-op thread count is process-wide, so ops that other Python threads run meanwhile also
    run on one thread (correct, if slower).
    """
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _expert_rows(x, e, w1, b1, w3, b3, w2, b2, act, threads: int | None = None) -> torch.Tensor:
    """Expert ``e`` on rows ``x``; ``threads``: run the GEMMs on that many threads (the rest on the current)."""
    h = act(_linear(x, w1[e], None if b1 is None else b1[e], threads))
    if w3 is not None:
        h.mul_(_linear(x, w3[e], None if b3 is None else b3[e], threads))
    return _linear(h, w2[e], None if b2 is None else b2[e], threads)


def _onednn_linear():
    """oneDNN's fp32 matmul (``torch.ops.mkldnn._linear_pointwise``), or None where this build lacks it."""
    if os.environ.get("MOEFX_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        x = torch.randn(8, 4)
        w = torch.randn(3, 4)
        if not torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), rtol=1e-5, atol=1e-6):
            return None
    except Exception:  # an op or a build without it
        return None
    return op


#: oneDNN matmul for the expert GEMMs of the eager kernel: on CPUs where the BLAS behind ``F.linear`` is slow
#: (MKL on AMD: about half of oneDNN's speed at these shapes) it is what makes the grouped experts fast.
#: ``MOEFX_ONEDNN=0`` in the environment turns it off.
_ONEDNN_LINEAR = _onednn_linear()
_ONEDNN_MIN_ROWS = 8  # below this oneDNN's per-call overhead outweighs its faster GEMM


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D ``x``, through oneDNN where that is faster (fp32 CPU, >= 8 rows); on
    ``threads`` intra-op threads if given (and back to the current count afterwards)."""
    current = torch.get_num_threads()
    if threads is None or threads == current:
        return _linear_here(x, w, b)
    torch.set_num_threads(threads)
    try:
        return _linear_here(x, w, b)
    finally:
        torch.set_num_threads(current)


def _linear_here(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if (
        _ONEDNN_LINEAR is not None
        and x.shape[0] >= _ONEDNN_MIN_ROWS
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and w.is_contiguous()
    ):
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def topk_moe_reference(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    k: int,
    normalize: bool,
    activation: str,
) -> torch.Tensor:
    index, weight = route_topk(router_logits, k, normalize)
    return moe_ffn_reference(x, index, weight.to(x.dtype), w1, b1, w3, b3, w2, b2, activation)


# -- moefx::moe_ffn ---------------------------------------------------------------------------------------


@torch.library.custom_op("moefx::moe_ffn", mutates_args=())
def moe_ffn(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return moe_ffn_kernel(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation)


@moe_ffn.register_fake
def _moe_ffn_fake(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation):
    return x.new_empty(x.shape[0], w2.shape[1])


# -- moefx::topk_moe --------------------------------------------------------------------------------------


@torch.library.custom_op("moefx::topk_moe", mutates_args=())
def topk_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    k: int,
    normalize: bool,
    activation: str,
) -> torch.Tensor:
    index, weight = route_topk(router_logits, k, normalize)
    return moe_ffn_kernel(x, index, weight.to(x.dtype), w1, b1, w3, b3, w2, b2, activation)


@topk_moe.register_fake
def _topk_moe_fake(x, router_logits, w1, b1, w3, b3, w2, b2, k, normalize, activation):
    return x.new_empty(x.shape[0], w2.shape[1])


# -- autograd: recompute the forward, differentiate the reference -----------------------------------------


def _make_autograd(reference, tensor_positions: tuple[int, ...], num_inputs: int):
    def setup_context(ctx, inputs, output):
        ctx.static = [None if i in tensor_positions else inputs[i] for i in range(num_inputs)]
        ctx.save_for_backward(*[inputs[i] for i in tensor_positions])

    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        args = list(ctx.static)
        wants = []
        for pos, tensor in zip(tensor_positions, saved):
            if tensor is not None and ctx.needs_input_grad[pos] and tensor.is_floating_point():
                tensor = tensor.detach().requires_grad_(True)
                wants.append((pos, tensor))
            args[pos] = tensor
        grads: list[torch.Tensor | None] = [None] * num_inputs
        if wants:
            with torch.enable_grad():
                out = reference(*args)
                computed = torch.autograd.grad(out, [t for _, t in wants], grad_output, allow_unused=True)
            for (pos, _), g in zip(wants, computed):
                grads[pos] = g
        return tuple(grads)

    return setup_context, backward


_setup, _backward = _make_autograd(moe_ffn_reference, tuple(range(9)), 10)
moe_ffn.register_autograd(_backward, setup_context=_setup)
_setup, _backward = _make_autograd(topk_moe_reference, tuple(range(8)), 11)
topk_moe.register_autograd(_backward, setup_context=_setup)
del _setup, _backward
