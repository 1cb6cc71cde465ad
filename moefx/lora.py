"""``init='lora'``: a mixture of low-rank adapter experts on a frozen, shared dense FFN (MoELoRA, MixLoRA).

The dense FFN is kept as it is (its weights frozen: ``requires_grad=False``) and runs for every token. Each
of the E experts is a set of rank-r adapters, one per projection (up, gate-up of a gated FFN, down); the
router picks k experts per token and their adapters, weighted by the gate values, add to each projection::

    h = act(W1 x + b1 + sum_j g_j B1_j A1_j x) [* (W3 x + b3 + sum_j g_j B3_j A3_j x)]
    y = W2 h + b2 + sum_j g_j B2_j A2_j h

``B`` starts at zero (``A`` like a fresh ``nn.Linear``), so the layer is exactly the dense FFN at
initialisation, and training only moves the adapters and the router: ``E * r * (2H + 2I + ...)`` parameters
instead of E copies of the FFN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .config import MoEConfig
from .layers import ExpertBank, MoELayer
from .passes.ffn_rules import FFNMatch
from .routers import assignment_load, build_router

__all__ = ["LoRAMoELayer", "build_lora_layer"]


class LoRAMoELayer(MoELayer):
    """A frozen dense FFN (``experts``: a bank of one) plus E routed low-rank adapters per projection."""

    def __init__(self, router: nn.Module, dense: ExpertBank, rank: int, *, hidden_dropout: float = 0.0,
                 source: str = "") -> None:
        super().__init__(router, dense, hidden_dropout=hidden_dropout, source=source)
        for param in dense.parameters():
            param.requires_grad_(False)
        num_experts = router.num_experts
        kw = {"dtype": dense.w1.dtype, "device": dense.w1.device}
        hidden, inner, out = dense.in_features, dense.expert_size, dense.out_features
        self.rank = rank
        self.up_a = nn.Parameter(torch.empty(num_experts, rank, hidden, **kw))
        self.up_b = nn.Parameter(torch.empty(num_experts, inner, rank, **kw))
        self.gate_up_a = nn.Parameter(torch.empty(num_experts, rank, hidden, **kw)) if dense.gated else None
        self.gate_up_b = nn.Parameter(torch.empty(num_experts, inner, rank, **kw)) if dense.gated else None
        self.down_a = nn.Parameter(torch.empty(num_experts, rank, inner, **kw))
        self.down_b = nn.Parameter(torch.empty(num_experts, out, rank, **kw))

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        group_size = lead[-1] if len(lead) >= 2 else tokens.shape[0]
        routing = self.router(tokens, group_size)
        index, weight = routing.expert_index, routing.combine_weight.to(tokens.dtype)  # [T, k]
        # Each token's gate values as a [T, E] matrix (zero for experts it did not pick or that dropped it).
        combine = assignment_load(index, self.num_experts, weight)
        d = self.experts
        pre = F.linear(tokens, d.w1[0], None if d.b1 is None else d.b1[0])
        pre = pre + self._adapt(tokens, combine, self.up_a, self.up_b)
        h = ACTIVATIONS[d.activation](pre)
        if d.gated:
            up = F.linear(tokens, d.w3[0], None if d.b3 is None else d.b3[0])
            h = h * (up + self._adapt(tokens, combine, self.gate_up_a, self.gate_up_b))
        if self.training and self.hidden_dropout > 0:
            h = F.dropout(h, self.hidden_dropout, training=True)
        y = F.linear(h, d.w2[0], None if d.b2 is None else d.b2[0])
        y = y + self._adapt(h, combine, self.down_a, self.down_b)
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def _adapt(x: torch.Tensor, combine: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``sum_e combine[t, e] * b[e] @ a[e] @ x[t]`` for each token t, as two GEMMs: every expert's rank-r
        projection of every token (``E * r`` columns, small beside the FFN's own GEMMs), weighted by
        ``combine [T, E]`` (zero where the token did not pick the expert), then back up. Gathering each
        token's adapters instead would copy ``T * k`` adapter matrices."""
        experts, rank, _ = a.shape
        low = F.linear(x, a.reshape(experts * rank, a.shape[-1]))  # [T, E * r]
        low = (low.view(-1, experts, rank) * combine.unsqueeze(-1)).reshape(-1, experts * rank)
        return F.linear(low, b.permute(1, 0, 2).reshape(b.shape[1], experts * rank))  # [T, O]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora_rank={self.rank}"


@torch.no_grad()
def build_lora_layer(match: FFNMatch, config: MoEConfig, generator: torch.Generator, source: str, *,
                     init: bool = True) -> LoRAMoELayer:
    """The LoRA-experts layer for one FFN; ``init=False`` allocates without initialising (for loading)."""
    kw = {"dtype": match.up_weight.dtype, "device": match.up_weight.device}
    dense = ExpertBank(1, match.in_features, match.hidden_features, match.out_features, match.activation,
                       gated=match.gated, up_bias=match.up_bias is not None, down_bias=match.down_bias is not None,
                       **kw)
    router = build_router(match.in_features, config).to(**kw)
    layer = LoRAMoELayer(router, dense, config.lora_rank, hidden_dropout=match.dropout_p, source=source)
    if not init:
        return layer
    for target, weight in [(dense.w1, match.up_weight), (dense.b1, match.up_bias), (dense.w3, match.gate_up_weight),
                           (dense.b3, match.gate_up_bias), (dense.w2, match.down_weight), (dense.b2, match.down_bias)]:
        if target is not None:
            target.copy_(weight.detach().unsqueeze(0))
    for param in router.parameters():
        param.copy_((torch.randn(param.shape, generator=generator) * config.router_init_std).to(param.dtype))
    for a, b in [(layer.up_a, layer.up_b), (layer.gate_up_a, layer.gate_up_b), (layer.down_a, layer.down_b)]:
        if a is None:
            continue
        bound = 1.0 / math.sqrt(a.shape[-1])  # A like a fresh nn.Linear, B zero: the adapters start at zero
        a.copy_((torch.rand(a.shape, generator=generator) * 2 * bound - bound).to(a.dtype))
        b.zero_()
    return layer
