"""The Mixture-of-Experts layer that replaces a dense FFN.

``MoELayer`` = a router + an :class:`ExpertBank` (stacked expert weights in the layout ONNX Runtime's
``com.microsoft.MoE`` takes: up ``[E, I, H]``, down ``[E, O, I]``) + the dense FFN's activation, biases and
hidden dropout. It maps ``[..., H]`` to ``[..., O]`` like the FFN it replaces.

Routers see the tokens as groups: for an input ``[..., S, H]`` a group is one sequence (the ``S`` tokens
along the second-to-last dimension); a 2-D input ``[T, H]`` is one group. Token-mixing routers (Soft MoE,
Expert Choice) mix tokens only within a group, so one sequence's output never depends on another's.

:func:`moe_layers` lists a model's MoE layers, :func:`aux_loss` sums their auxiliary losses and
:func:`routing_stats` reads their routing statistics after a forward pass.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
from torch import nn

from . import ops
from .activations import ACTIVATIONS
from .routers import Router, Routing, RoutingStats, SoftMoERouter, unobserved

__all__ = ["ExpertBank", "MoELayer", "aux_loss", "moe_layers", "routing_stats"]


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

    def select_experts(self, experts: list[int]) -> ExpertBank:
        """A new bank holding copies of the given experts, in the given order."""
        first = self.w1
        bank = ExpertBank(
            len(experts), self.in_features, self.expert_size, self.out_features, self.activation,
            gated=self.gated, up_bias=self.b1 is not None, down_bias=self.b2 is not None,
            dtype=first.dtype, device=first.device,
        )
        index = torch.tensor(experts, dtype=torch.long, device=first.device)
        with torch.no_grad():
            for name in ("w1", "b1", "w3", "b3", "w2", "b2"):
                source = getattr(self, name)
                if source is not None:
                    getattr(bank, name).copy_(source.index_select(0, index))
        return bank

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to ``x [N, H]`` (a plain reference, used by tests and tools)."""
        return ops.expert_ffn(x, e, *self.weights(), self.activation)

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
        shared: an optional bank of one always-on expert that every token runs with weight 1 (CMoE).
        bias: an optional ``[O]`` bias added to every token's output (a split FFN's down bias, added once).
    """

    def __init__(
        self,
        router: Router,
        experts: ExpertBank,
        *,
        hidden_dropout: float = 0.0,
        source: str = "",
        shared: ExpertBank | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.hidden_dropout = float(hidden_dropout)
        self.source = source
        if shared is not None and shared.num_experts != 1:
            raise ValueError(f"the shared expert bank must hold one expert, got {shared.num_experts}")
        self.shared = shared  # an always-on expert every token runs with weight 1 (CMoE, DeepSeekMoE)
        self.bias = None if bias is None else nn.Parameter(bias)  # added to every token's output

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        return self.router.last_aux

    @property
    def last_stats(self) -> RoutingStats | None:
        """The router's :class:`~moefx.routers.RoutingStats` of the last forward pass (None before one)."""
        return self.router.last_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])  # [T, H]
        group_size = lead[-1] if len(lead) >= 2 else tokens.shape[0]  # a group is one sequence
        serial_router = _serial_router(tokens, self.num_experts)
        # The output zeroed on an expert worker while this thread routes (eager inference, token routers).
        zeroed = (ops.zeros_ahead(tokens.shape[0], self.experts.out_features, tokens)
                  if serial_router and not isinstance(self.router, SoftMoERouter)
                  and unobserved(tokens, *self.experts.weights()) else None)
        with ops.serial_glue(serial_router):
            routing = self.router(tokens, group_size)
        if routing.dispatch is not None:
            y = self._soft_forward(tokens, routing)
        else:
            y = self._run_experts(tokens, routing, zeroed)
        if self.shared is not None:
            dropout = self.hidden_dropout if self.training else 0.0
            y = y + ops.expert_ffn(tokens, 0, *self.shared.weights(), self.shared.activation, dropout=dropout)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])

    def _run_experts(self, tokens: torch.Tensor, routing: Routing, zeroed: Future | None = None) -> torch.Tensor:
        w1, b1, w3, b3, w2, b2 = self.experts.weights()
        activation = self.experts.activation
        if self.training and self.hidden_dropout > 0:
            # Dropout on the expert hidden activations is random: the differentiable reference, not the op.
            return ops.moe_ffn_reference(
                tokens, routing.expert_index, routing.combine_weight.to(tokens.dtype),
                w1, b1, w3, b3, w2, b2, activation, dropout=self.hidden_dropout,
            )
        if _plain_inference(tokens, routing.combine_weight, self.experts):
            # Eager inference: the kernel itself, on the assignment the router already made (for a dropless
            # top-k router it is exactly the op's own softmax top-k), without the dispatcher round trip.
            return ops.moe_ffn_kernel(
                tokens, routing.expert_index, routing.combine_weight.to(tokens.dtype),
                w1, b1, w3, b3, w2, b2, activation, zeroed,
            )
        if routing.dropless_topk:
            return ops.topk_moe(
                tokens, routing.logits, w1, b1, w3, b3, w2, b2,
                routing.expert_index.shape[-1], self.router.normalize_weights, activation,
            )
        return ops.moe_ffn(
            tokens, routing.expert_index, routing.combine_weight.to(tokens.dtype),
            w1, b1, w3, b3, w2, b2, activation,
        )

    def _soft_forward(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Soft MoE: slots = dispatch-weighted token averages; experts on slots; combine-weighted slot averages."""
        dispatch = routing.dispatch.to(tokens.dtype)  # [G, m, S]
        combine = routing.combine.to(tokens.dtype)  # [G, m, S]
        groups, m, num_slots = dispatch.shape
        hidden = tokens.shape[-1]
        slots = torch.einsum("gms,gmh->gsh", dispatch, tokens.reshape(groups, m, hidden))  # [G, S, H]
        slots = slots.reshape(groups * num_slots, hidden)  # [G*S, H]
        # Slot s of every group belongs to expert s // p; each slot goes to its expert with weight 1.
        slot_expert = torch.arange(num_slots, device=tokens.device) // routing.slots_per_expert  # [S]
        index = slot_expert.expand(groups, num_slots).reshape(groups * num_slots, 1)  # [G*S, 1]
        slot_routing = Routing(routing.logits, index, slots.new_ones(groups * num_slots, 1))
        y = self._run_experts(slots, slot_routing)  # [G*S, O]
        out_features = y.shape[-1]
        y = torch.einsum("gms,gso->gmo", combine, y.reshape(groups, num_slots, out_features))  # [G, m, O]
        return y.reshape(groups * m, out_features)

    def extra_repr(self) -> str:
        return f"source={self.source!r}" + (f", hidden_dropout={self.hidden_dropout}" if self.hidden_dropout else "")


def _serial_router(tokens: torch.Tensor, num_experts: int) -> bool:
    """Whether to route on one thread: eager CPU inference where the router's GEMM is small.

    Its ops (a ``[T, H] x [H, E]`` GEMM, softmax and top-k over ``E``) are too small to gain from a second
    thread, and each costs a pool wake-up under ``OMP_WAIT_POLICY=PASSIVE`` (see :func:`ops.serial_glue`).
    """
    return (
        ops.SERIAL_GLUE
        and tokens.device.type == "cpu"
        and not torch.is_grad_enabled()
        and tokens.shape[0] * tokens.shape[1] * num_experts <= _SERIAL_ROUTER_MACS
        and torch.get_num_threads() > 1
    )


_SERIAL_ROUTER_MACS = 1 << 23  # about 0.1 ms on one core: above this the gate GEMM gains from more threads


def _plain_inference(tokens: torch.Tensor, combine_weight: torch.Tensor, experts: ExpertBank) -> bool:
    """True when nothing observes the dispatch: no autograd, tracer, export, compile or dispatch mode.

    Then the layer may call the eager kernel directly; otherwise it calls the custom op, so that graphs keep
    one node per layer, FLOP counters see the op and backward recomputes instead of storing activations.
    """
    return unobserved(tokens, combine_weight, *experts.weights())


def routing_stats(model: nn.Module) -> dict[str, dict]:
    """Routing statistics of every MoE layer's last forward pass: ``{layer name: stats dict}`` in model order.

    Each dict has ``router``, ``tokens``, ``load`` (per expert), ``balance`` (mean load / max load, 1.0 when
    balanced), ``load_cv`` (coefficient of variation of the load), ``dropped_fraction``,
    ``routing_success_rate`` (``1 - dropped_fraction``, LIMoE) and ``entropy`` (mean per-token routing
    entropy, nats), plus ``modalities`` (the same per modality id) after a forward under
    ``moefx.tasks.modality``. Layers that have not run since conversion are left out.
    """
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and module.router.last_stats is not None:
            stats[name] = module.router.last_stats.to_dict()
    return stats


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``[(qualified_name, MoELayer), ...]`` in model order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoELayer)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every MoE layer's weighted auxiliary losses from the last forward pass (0 if none)."""
    total = None
    for _, layer in moe_layers(model):
        for value in layer.aux_losses.values():
            total = value if total is None else total + value
    if total is None:
        ref = next(iter(model.parameters()), None)
        return torch.zeros((), device=ref.device if ref is not None else "cpu")
    return total
