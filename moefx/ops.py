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

The eager kernel groups tokens by expert with one stable argsort and runs one GEMM pair per expert that has
tokens (never a loop over tokens). Backward recomputes the forward under autograd (like activation
checkpointing), so the op stores no hidden activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS

__all__ = ["moe_ffn", "moe_ffn_reference", "route_topk", "topk_moe", "topk_moe_reference"]


def route_topk(router_logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top k, optional renormalisation. Returns ``(index [T, k], weight [T, k])``."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weight, index = torch.topk(probs, k, dim=-1)  # [T, k]
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return index, weight


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
) -> torch.Tensor:
    """Grouped expert FFN for a given assignment; differentiable, used as the eager kernel."""
    act = ACTIVATIONS[activation]
    num_tokens, k = expert_index.shape
    num_experts = w1.shape[0]
    out_features = w2.shape[1]
    flat_expert = expert_index.reshape(-1)  # [T*k]
    # Dropped assignments (-1) sort into an extra bucket past the last expert and are never computed.
    flat_expert = torch.where(flat_expert < 0, torch.full_like(flat_expert, num_experts), flat_expert)
    order = torch.argsort(flat_expert, stable=True)  # [T*k], grouped by expert
    counts = torch.bincount(flat_expert, minlength=num_experts + 1).tolist()
    kept = len(order) - counts[num_experts]
    order = order[:kept]
    token = torch.div(order, k, rounding_mode="floor")  # [kept]
    x_sorted = x.index_select(0, token)  # [kept, H]
    outputs = []
    start = 0
    for e in range(num_experts):
        count = counts[e]
        if count == 0:
            continue
        segment = x_sorted[start : start + count]
        h = F.linear(segment, w1[e], None if b1 is None else b1[e])
        if w3 is None:
            h = act(h)
        else:
            h = act(h) * F.linear(segment, w3[e], None if b3 is None else b3[e])
        outputs.append(F.linear(h, w2[e], None if b2 is None else b2[e]))
        start += count
    out = x.new_zeros(num_tokens, out_features)
    if not outputs:
        return out
    y = torch.cat(outputs, dim=0)  # [kept, O]
    gate = combine_weight.reshape(-1).index_select(0, order).to(y.dtype)
    return out.index_add(0, token, y * gate.unsqueeze(-1))


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
    return moe_ffn_reference(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation)


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
    return topk_moe_reference(x, router_logits, w1, b1, w3, b3, w2, b2, k, normalize, activation)


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
