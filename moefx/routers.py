"""Routers: which experts each token goes to, with what weight, and the losses that keep routing healthy.

Every router is a small ``nn.Module`` behind one interface: ``forward(x [T, H]) -> Routing``. A
:class:`Routing` carries the router logits and either a token-choice assignment (``expert_index`` and
``combine_weight``, ``[T, k]``, ``-1`` marking a dropped assignment) or a flag that the assignment is plain
dropless softmax top-k, which the MoE layer runs as the fused ``moefx::topk_moe`` op. Routers register
themselves in :data:`ROUTER_TYPES` by name; ``MoEConfig.router`` picks one.

After a forward pass (outside tracing) each router keeps its auxiliary losses in ``last_aux`` (already
weighted, with gradients) and detached routing statistics in ``last_stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .ops import route_topk

__all__ = ["ROUTER_TYPES", "Router", "Routing", "RoutingStats", "TopKRouter", "build_router"]


@dataclass
class RoutingStats:
    """Routing statistics of one forward pass (detached)."""

    tokens: int
    load: torch.Tensor  # [E] assignments each expert processed
    dropped_fraction: float  # assignments dropped by capacity / all assignments
    entropy: float  # mean per-token routing entropy (nats)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "load": [int(v) for v in self.load.tolist()],
            "dropped_fraction": self.dropped_fraction,
            "entropy": self.entropy,
        }


@dataclass
class Routing:
    logits: torch.Tensor  # [T, E], float32
    expert_index: torch.Tensor | None = None  # [T, k] int64, -1 = dropped
    combine_weight: torch.Tensor | None = None  # [T, k]
    dropless_topk: bool = False  # the assignment is softmax top-k without drops (fused op applies)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Base class: subclasses set ``name`` and implement ``forward``."""

    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: RoutingStats | None = None

    def _record(self, logits: torch.Tensor, index: torch.Tensor, aux: dict[str, torch.Tensor]) -> None:
        if _tracing():
            return
        num_experts = logits.shape[-1]
        kept = index[index >= 0]
        load = torch.bincount(kept, minlength=num_experts).detach().cpu()
        probs = torch.softmax(logits.detach().float(), dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()
        self.last_stats = RoutingStats(
            tokens=int(logits.shape[0]),
            load=load,
            dropped_fraction=float((index < 0).sum()) / max(index.numel(), 1),
            entropy=float(entropy),
        )
        self.last_aux = aux


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class TopKRouter(Router):
    """Token-choice top-k routing (Switch k=1; GShard/GLaM k=2; Mixtral-style renormalised top-k).

    ``gates = softmax(W x)``; each token picks its k largest gates. With a capacity factor, each expert takes
    at most ``C = ceil(T * cf / E)`` assignments, filled in priority order "every token's first choice before
    any token's second choice" (GShard); assignments past capacity are dropped and contribute zero, so the
    token passes through the residual connection.
    """

    name = "topk"

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.normalize_weights = config.normalize_weights
        self.load_balance_weight = config.load_balance_weight
        self.z_loss_weight = config.z_loss_weight
        self.gate = nn.Linear(hidden_size, config.num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        assert self.capacity_factor is not None
        return math.ceil(num_tokens * self.capacity_factor / self.num_experts)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x).float()  # [T, E]
        index, weight = route_topk(logits, self.top_k, self.normalize_weights)  # [T, k]
        dropless = self.capacity_factor is None
        if not dropless:
            index, weight = self._apply_capacity(index, weight, self.capacity(x.shape[0]))
        aux = self._aux_losses(logits, index)
        self._record(logits, index, aux)
        return Routing(logits, index, weight, dropless_topk=dropless, aux=aux)

    def _apply_capacity(
        self, index: torch.Tensor, weight: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, k = index.shape
        # Priority order: choice 0 of every token, then choice 1 of every token, ... -> [k*T, E]
        one_hot = F.one_hot(index.t().reshape(-1), self.num_experts)
        position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(-1)  # 1-based slot in the expert's buffer
        keep = (position <= capacity).reshape(k, num_tokens).t()  # [T, k]
        index = torch.where(keep, index, torch.full_like(index, -1))
        weight = torch.where(keep, weight, torch.zeros_like(weight))
        return index, weight

    def _aux_losses(self, logits: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        aux: dict[str, torch.Tensor] = {}
        if _tracing():
            return aux
        if self.load_balance_weight > 0:
            probs = torch.softmax(logits, dim=-1)
            top1 = index[:, 0]
            fraction = torch.bincount(top1[top1 >= 0], minlength=self.num_experts).float() / max(len(top1), 1)
            aux["load_balance"] = self.load_balance_weight * self.num_experts * (fraction * probs.mean(0)).sum()
        if self.z_loss_weight > 0:
            aux["z_loss"] = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        return aux

    def extra_repr(self) -> str:
        cf = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return f"experts={self.num_experts}, top_k={self.top_k}, {cf}, normalize={self.normalize_weights}"


#: Router classes by ``MoEConfig.router`` name.
ROUTER_TYPES: dict[str, type[Router]] = {"topk": TopKRouter}


def build_router(hidden_size: int, config: MoEConfig) -> Router:
    return ROUTER_TYPES[config.router](hidden_size, config)
