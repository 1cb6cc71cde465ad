"""The Mixture-of-Experts layer that replaces a dense FFN.

``MoELayer`` = a router + an :class:`ExpertBank` (stacked expert weights in the layout ONNX Runtime's
``com.microsoft.MoE`` takes: up ``[E, I, H]``, down ``[E, O, I]``) + the dense FFN's activation, biases and
hidden dropout. It maps ``[..., H]`` to ``[..., O]`` like the FFN it replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .activations import ACTIVATIONS
from .routers import Router

__all__ = ["ExpertBank", "MoELayer"]


class ExpertBank(nn.Module):
    """E expert FFNs stored as stacked tensors.

    ``w1 [E, I, H]`` is the up projection (the gate projection of a gated FFN), ``w3 [E, I, H]`` the up
    projection of a gated FFN (``act(w1 x) * w3 x``), ``w2 [E, O, I]`` the down projection.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        expert_size: int,
        out_features: int,
        activation: str,
        *,
        gated: bool,
        up_bias: bool,
        down_bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        kw = {"dtype": dtype, "device": device}
        self.num_experts = num_experts
        self.in_features = in_features
        self.expert_size = expert_size
        self.out_features = out_features
        self.activation = activation
        self.gated = gated
        self.w1 = nn.Parameter(torch.empty(num_experts, expert_size, in_features, **kw))
        self.b1 = nn.Parameter(torch.empty(num_experts, expert_size, **kw)) if up_bias else None
        self.w3 = nn.Parameter(torch.empty(num_experts, expert_size, in_features, **kw)) if gated else None
        self.b3 = nn.Parameter(torch.empty(num_experts, expert_size, **kw)) if gated and up_bias else None
        self.w2 = nn.Parameter(torch.empty(num_experts, out_features, expert_size, **kw))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_features, **kw)) if down_bias else None

    def weights(self) -> tuple[torch.Tensor | None, ...]:
        """``(w1, b1, w3, b3, w2, b2)`` in the order the dispatch ops take them."""
        return self.w1, self.b1, self.w3, self.b3, self.w2, self.b2

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to ``x [N, H]`` (a plain reference, used by tests and tools)."""
        act = ACTIVATIONS[self.activation]
        h = F.linear(x, self.w1[e], None if self.b1 is None else self.b1[e])
        h = act(h)
        if self.w3 is not None:
            h = h * F.linear(x, self.w3[e], None if self.b3 is None else self.b3[e])
        return F.linear(h, self.w2[e], None if self.b2 is None else self.b2[e])

    def extra_repr(self) -> str:
        kind = "gated " if self.gated else ""
        return (
            f"experts={self.num_experts}, {self.in_features} -> {self.expert_size} -> {self.out_features}, "
            f"{kind}{self.activation}, bias=({self.b1 is not None}, {self.b2 is not None})"
        )


class MoELayer(nn.Module):
    """A router and a bank of experts in place of one dense FFN.

    Args:
        router: decides, per token, which experts run and how their outputs combine.
        experts: the stacked expert weights.
        hidden_dropout: dropout between activation and down projection, carried over from the dense FFN
            (applied in training only).
        source: the qualified name of the dense FFN this layer replaced (for reports).
    """

    def __init__(self, router: Router, experts: ExpertBank, *, hidden_dropout: float = 0.0, source: str = "") -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.hidden_dropout = float(hidden_dropout)
        self.source = source

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        return self.router.last_aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])  # [T, H]
        routing = self.router(tokens)
        w1, b1, w3, b3, w2, b2 = self.experts.weights()
        activation = self.experts.activation
        if self.training and self.hidden_dropout > 0:
            y = _moe_ffn_with_dropout(tokens, routing, self.experts, self.hidden_dropout)
        elif routing.dropless_topk:
            y = ops.topk_moe(
                tokens, routing.logits, w1, b1, w3, b3, w2, b2,
                routing.expert_index.shape[-1], self.router.normalize_weights, activation,
            )
        else:
            y = ops.moe_ffn(
                tokens, routing.expert_index, routing.combine_weight.to(tokens.dtype),
                w1, b1, w3, b3, w2, b2, activation,
            )
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"source={self.source!r}" + (f", hidden_dropout={self.hidden_dropout}" if self.hidden_dropout else "")


def _moe_ffn_with_dropout(tokens: torch.Tensor, routing, experts: ExpertBank, p: float) -> torch.Tensor:
    """Training path with dropout on the expert hidden activations (random, so not the custom op)."""
    act = ACTIVATIONS[experts.activation]
    out = tokens.new_zeros(tokens.shape[0], experts.out_features)
    index, weight = routing.expert_index, routing.combine_weight.to(tokens.dtype)
    for e in range(experts.num_experts):
        token, slot = torch.nonzero(index == e, as_tuple=True)
        if token.numel() == 0:
            continue
        x = tokens.index_select(0, token)
        h = F.linear(x, experts.w1[e], None if experts.b1 is None else experts.b1[e])
        h = act(h)
        if experts.w3 is not None:
            h = h * F.linear(x, experts.w3[e], None if experts.b3 is None else experts.b3[e])
        h = F.dropout(h, p, training=True)
        y = F.linear(h, experts.w2[e], None if experts.b2 is None else experts.b2[e])
        out = out.index_add(0, token, y * weight[token, slot].unsqueeze(-1))
    return out
