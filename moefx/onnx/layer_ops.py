"""Export-time dispatch ops for MoE layers whose whole forward is one fused ONNX Runtime node.

A ``split`` layer (``init="split"``) sums its top-k experts with weight 1 (its router has ``unit_weights``),
may run an always-on shared expert and adds a bias to every token. Its eager forward is a
``moefx::moe_ffn`` call on an all-ones assignment plus the shared expert's and the bias's standard ops, which
ONNX export would turn into one ``moe_ffn`` function call and a dozen more nodes. While exporting fused,
:func:`export_forwards` gives such layers a forward that calls :func:`unit_topk_moe` instead: one op for the
routed experts, the shared expert and the bias, which :mod:`moefx.onnx.translations` lowers to one
``com.microsoft.MoE`` node. The torch model itself is not changed (the forwards are restored afterwards),
and the export's check against torch runs the model's own forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from .. import ops
from ..layers import MoELayer
from ..routers import TopKRouter

__all__ = ["export_forwards", "unit_topk_layer", "unit_topk_moe"]


@torch.library.custom_op("moefx::unit_topk_moe", mutates_args=())
def unit_topk_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    shared_w1: torch.Tensor | None,
    shared_b1: torch.Tensor | None,
    shared_w3: torch.Tensor | None,
    shared_b3: torch.Tensor | None,
    shared_w2: torch.Tensor | None,
    shared_b2: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    activation: str,
) -> torch.Tensor:
    """Top k of the router logits, each kept expert with weight 1, plus the shared expert (weight 1) and bias.

    ``shared_*`` is a bank of one expert (``[1, I_s, H]``, ...; ``I_s`` a multiple of the routed experts'
    ``I``) or all None; ``bias [O]`` or None.
    """
    index, _ = ops.route_topk(router_logits, k, False)
    weight = torch.ones(index.shape, dtype=x.dtype, device=x.device)
    y = ops.moe_ffn_kernel(x, index, weight, w1, b1, w3, b3, w2, b2, activation)
    if shared_w1 is not None:
        y = y + ops.expert_ffn(x, 0, shared_w1, shared_b1, shared_w3, shared_b3, shared_w2, shared_b2, activation)
    if bias is not None:
        y = y + bias
    return y


@unit_topk_moe.register_fake
def _unit_topk_moe_fake(x, router_logits, w1, b1, w3, b3, w2, b2, shared_w1, shared_b1, shared_w3, shared_b3,
                        shared_w2, shared_b2, bias, k, activation):
    return x.new_empty(x.shape[0], w2.shape[1])


def unit_topk_layer(layer: nn.Module) -> bool:
    """True for an MoE layer whose eval forward :func:`unit_topk_moe` computes: the plain ``MoELayer``
    forward, a dropless top-k router with unit weights, and a shared expert (if any) like the routed ones."""
    if not isinstance(layer, MoELayer) or type(layer).forward is not MoELayer.forward:
        return False
    router = layer.router
    if not (isinstance(router, TopKRouter) and getattr(router, "unit_weights", False)
            and router.capacity_factor is None):
        return False
    shared, experts = getattr(layer, "shared", None), layer.experts
    return shared is None or (  # a shared expert must cut into pieces like the routed experts
        shared.activation == experts.activation and shared.gated == experts.gated
        and shared.expert_size % experts.expert_size == 0 and (shared.b1 is None) == (experts.b1 is None))


def _unit_topk_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The eval forward of a split ``MoELayer`` as one :func:`unit_topk_moe` call (export only)."""
    lead = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    group_size = lead[-1] if len(lead) >= 2 else tokens.shape[0]
    routing = self.router(tokens, group_size)
    shared = self.shared.weights() if self.shared is not None else (None,) * 6
    y = torch.ops.moefx.unit_topk_moe(
        tokens, routing.logits, *self.experts.weights(), *shared, self.bias, self.router.top_k,
        self.experts.activation,
    )
    return y.reshape(*lead, y.shape[-1])


@contextlib.contextmanager
def export_forwards(model: nn.Module) -> Iterator[list[str]]:
    """Give every :func:`unit_topk_layer` of ``model`` the one-op forward while the block runs; yields their names."""
    patched = [(name, module) for name, module in model.named_modules() if unit_topk_layer(module)]
    for _, module in patched:
        module.forward = types.MethodType(_unit_topk_forward, module)
    try:
        yield [name for name, _ in patched]
    finally:
        for _, module in patched:
            del module.forward
