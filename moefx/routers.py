"""Routers: which experts each token goes to, with what weight, and the losses that keep routing healthy.

Every router is a small ``nn.Module`` behind one interface: ``forward(x [T, H], group_size) -> Routing``,
where the ``T`` tokens are ``T // group_size`` groups (sequences) of ``group_size`` consecutive tokens. A
:class:`Routing` carries the router logits and one of three plans:

* a token-choice assignment (``expert_index`` and ``combine_weight``, ``[T, k]``, ``-1`` marking a dropped
  assignment), run by the ``moefx::moe_ffn`` op;
* the same, flagged ``dropless_topk``: plain softmax top-k of ``logits`` without drops, which the MoE layer
  runs as the fused ``moefx::topk_moe`` op (``topk`` without capacity, ``task``);
* Soft MoE slot weights (``dispatch`` and ``combine``, ``[groups, group_size, slots]``): the experts run on
  weighted averages of the tokens of a group (slots) and every token gets a weighted average of all slots.

Routers register themselves in :data:`ROUTER_TYPES` by name; ``MoEConfig.router`` picks one.

=================  ================================  ============================  =====================
router             paper                             mixes tokens of a sequence    drops
=================  ================================  ============================  =====================
``topk``           Switch, GShard/GLaM, Mixtral      no                            past capacity
``bpr``            V-MoE Batch Priority Routing      no                            lowest priority first
``expert-choice``  Zhou et al. 2022                  yes (not causal)              tokens no expert took
``soft``           Puigcerver et al. 2023            yes (not causal)              never
``task``           Kudugunta et al. 2021 (Task-MoE)  no                            never
=================  ================================  ============================  =====================

After a forward pass (outside tracing and export) each router keeps its auxiliary losses in ``last_aux``
(already weighted, with gradients) and detached routing statistics in ``last_stats``. The losses, each on
when its weight in :class:`~moefx.config.MoEConfig` is positive:

* ``load_balance``: Switch ``E * sum_e f_e * P_e`` (``f_e``: fraction of tokens whose first choice is e,
  ``P_e``: mean router probability); token-choice routers only (Expert Choice and Soft MoE are balanced by
  construction).
* ``z_loss``: ST-MoE ``mean(logsumexp(logits)^2)``.
* ``local_entropy``: LIMoE, mean per-token entropy of the routing distribution over experts (minimised).
* ``global_entropy``: LIMoE, ``-H(mean routing distribution)``, or ``max(0, tau - H)`` with a threshold.

For Soft MoE a token's routing distribution is its combine mass on each expert's slots, and the z-loss reads
the slot logits. The LIMoE losses are computed per modality when the forward runs under ``moefx.tasks.modality(mask)``
(one id per token) and averaged over the modalities present; the statistics are then also kept per modality.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.utils import _python_dispatch

from . import ops
from .config import MoEConfig
from .context import current_modality, current_task_ids
from .errors import ConfigError
from .ops import route_topk

__all__ = [
    "ROUTER_TYPES",
    "BatchPriorityRouter",
    "ExpertChoiceRouter",
    "Router",
    "Routing",
    "RoutingStats",
    "SoftMoERouter",
    "StaticRouter",
    "TaskRouter",
    "TopKRouter",
    "assignment_load",
    "build_router",
    "check_router_causality",
    "model_causality",
    "unobserved",
]


@dataclass
class RoutingStats:
    """Routing statistics of one forward pass (detached).

    ``load`` counts the assignments each expert processed (for Soft MoE: the combine mass the tokens put on
    each expert's slots). ``dropped_fraction`` is the mean over tokens of the fraction of a token's
    assignments that were dropped (token choice), or the fraction of tokens no expert took (Expert Choice);
    ``1 - dropped_fraction`` is LIMoE's routing success rate. ``modalities`` holds the same numbers per
    modality id when the forward ran under ``moefx.tasks.modality``.
    """

    tokens: int
    load: torch.Tensor  # [E]
    dropped_fraction: float
    entropy: float  # mean per-token routing entropy (nats)
    router: str = ""
    modalities: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def routing_success_rate(self) -> float:
        return 1.0 - self.dropped_fraction

    def to_dict(self) -> dict[str, Any]:
        return {
            "router": self.router,
            "tokens": self.tokens,
            **_load_summary(self.load),
            "dropped_fraction": self.dropped_fraction,
            "routing_success_rate": self.routing_success_rate,
            "entropy": self.entropy,
            **({"modalities": {m: dict(v) for m, v in self.modalities.items()}} if self.modalities else {}),
        }


def _load_summary(load: torch.Tensor) -> dict[str, Any]:
    values = [int(v) if float(v).is_integer() else round(float(v), 4) for v in load.tolist()]
    mean = float(load.float().mean()) if load.numel() else 0.0
    peak = float(load.float().max()) if load.numel() else 0.0
    std = float(load.float().std(unbiased=False)) if load.numel() else 0.0
    return {
        "load": values,
        # vLLM's "balancedness": 1.0 when every expert has the same load.
        "balance": mean / peak if peak > 0 else 1.0,
        "load_cv": std / mean if mean > 0 else 0.0,  # coefficient of variation, 0 when balanced
    }


@dataclass
class Routing:
    logits: torch.Tensor  # [T, E] (Soft MoE: [T, slots]), float32
    expert_index: torch.Tensor | None = None  # [T, k] int64, -1 = dropped
    combine_weight: torch.Tensor | None = None  # [T, k]
    dropless_topk: bool = False  # the assignment is softmax top-k of logits without drops (fused op applies)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    dispatch: torch.Tensor | None = None  # Soft MoE [groups, group_size, slots], softmax over group_size
    combine: torch.Tensor | None = None  # Soft MoE [groups, group_size, slots], softmax over slots
    slots_per_expert: int = 0  # Soft MoE: slot s belongs to expert s // slots_per_expert


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def unobserved(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """True when nothing observes ops on ``x`` and ``others``: ``x`` a plain tensor, and no autograd, tracer,
    export, compile or dispatch mode (FLOP counters). Eager inference may then take shortcuts that graphs
    must not hold."""
    if type(x) is not torch.Tensor or x.is_meta:  # FX proxies, fake and functional tensors, tensor subclasses;
        return False  # meta tensors take the ops' shape-only implementations
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return False
    return not _tracing() and _python_dispatch._get_current_dispatch_mode() is None


def _gate_logits(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gate(x)``; for a plain ``nn.Linear`` in unobserved eager inference, through the eager kernel's GEMM
    routine (:func:`moefx.ops.linear_here`: oneDNN where it is faster; the router's ``[T, H] x [H, E]``
    GEMM at 512 tokens takes 75 us there against 127 us in ``F.linear`` on this project's CPU). Autocast,
    hooks and weights of a tensor subclass (quantized, say) get the module call."""
    if (
        type(gate) is nn.Linear
        and not (gate._forward_hooks or gate._forward_pre_hooks)
        and not (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)
        and all(p is None or type(p.data) is torch.Tensor for p in (gate.weight, gate.bias))
        and not _autocast_enabled(x.device.type)
        and unobserved(x, gate.weight, gate.bias)
    ):
        return ops.linear_here(x, gate.weight, gate.bias)
    return gate(x)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


class Router(nn.Module):
    """Base class: subclasses set ``name`` and implement ``forward(x [T, H], group_size) -> Routing``.

    ``mixes_tokens`` is True for routers whose output for one token depends on the other tokens of its
    group (Soft MoE, Expert Choice): they are not causal.
    """

    name: str = ""
    mixes_tokens: bool = False

    def __init__(self, config: MoEConfig | None = None) -> None:
        super().__init__()
        config = config or MoEConfig()
        self.num_experts = config.num_experts
        self.load_balance_weight = config.load_balance_weight
        self.z_loss_weight = config.z_loss_weight
        self.local_entropy_weight = config.local_entropy_weight
        self.global_entropy_weight = config.global_entropy_weight
        self.global_entropy_threshold = config.global_entropy_threshold
        self.last_aux: dict[str, torch.Tensor] = {}
        self._last_stats: RoutingStats | None = None
        self._pending_stats: tuple | None = None

    @property
    def last_stats(self) -> RoutingStats | None:
        """:class:`RoutingStats` of the last forward pass (None before one), summarised when first read."""
        if self._pending_stats is not None:
            pending, self._pending_stats = self._pending_stats, None
            self._last_stats = self._summarise(*pending)
        return self._last_stats

    @last_stats.setter
    def last_stats(self, stats: RoutingStats | None) -> None:
        self._pending_stats = None
        self._last_stats = stats

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's losses are part of its autograd graph: copies and pickles start without them
        # (copy.deepcopy refuses non-leaf tensors); the statistics are detached and kept.
        self.last_stats  # noqa: B018 - summarise pending statistics before copying
        state = self.__dict__.copy()
        state["last_aux"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "last_stats" in state:  # pickled before the statistics became lazy
            state["_last_stats"] = state.pop("last_stats")
        state.setdefault("_last_stats", None)
        state.setdefault("_pending_stats", None)
        super().__setstate__(state)

    # -- shared bookkeeping ------------------------------------------------------------------------------
    def _finish(
        self,
        logits: torch.Tensor,
        log_probs: _Lazy,
        token_load: _Lazy,
        token_dropped: _Lazy,
        first_choice: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Aux losses (returned and kept in ``last_aux``) and statistics (``last_stats``) of one forward.

        Args:
            logits: the router logits ``[T, *]`` (z-loss).
            log_probs: log of each token's routing distribution over experts ``[T, E]`` (entropy losses).
            token_load: what each token gave each expert ``[T, E]`` (load statistics).
            token_dropped: fraction of each token's routing that was dropped ``[T]``.
            first_choice: each token's first-choice expert ``[T]``, before any capacity limit, for the
                Switch loss; None for routers that are balanced by construction.

        ``log_probs``, ``token_load`` and ``token_dropped`` may be zero-argument callables that compute the
        tensor: nothing is computed for the statistics until ``last_stats`` is read, nor, in eval mode, for
        the losses until ``last_aux`` is read (an inference forward pays only for routing itself). In
        training the losses are computed here, as part of the forward.
        """
        if _tracing():
            return {}
        modality = _modality_ids(logits.shape[0], logits.device)
        if self.training:
            log_probs = _resolve(log_probs)
            aux = self._aux_losses(logits, log_probs, first_choice, modality)
        else:
            grad = torch.is_grad_enabled()

            def losses() -> dict[str, torch.Tensor]:
                with torch.set_grad_enabled(grad):
                    return self._aux_losses(logits, _resolve(log_probs), first_choice, modality)

            aux = _DeferredLosses(losses) if self._has_losses(first_choice) else {}
        self._pending_stats = (log_probs, token_load, token_dropped, modality, logits.shape[0])
        self.last_aux = aux
        return aux

    def _has_losses(self, first_choice: torch.Tensor | None) -> bool:
        return (
            (self.load_balance_weight > 0 and first_choice is not None)
            or self.z_loss_weight > 0
            or self.local_entropy_weight > 0
            or self.global_entropy_weight > 0
        )

    def _aux_losses(
        self,
        logits: torch.Tensor,
        log_probs: torch.Tensor,
        first_choice: torch.Tensor | None,
        modality: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        aux: dict[str, torch.Tensor] = {}
        probs = log_probs.exp()  # [T, E]
        if self.load_balance_weight > 0 and first_choice is not None:
            # (a scatter-add rather than bincount, which has no meta kernel)
            counts = probs.new_zeros(self.num_experts).index_add_(0, first_choice, probs.new_ones(len(first_choice)))
            fraction = counts / max(len(first_choice), 1)
            aux["load_balance"] = self.load_balance_weight * self.num_experts * (fraction * probs.mean(0)).sum()
        if self.z_loss_weight > 0:
            aux["z_loss"] = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        if self.local_entropy_weight > 0 or self.global_entropy_weight > 0:
            # LIMoE: each modality's losses on its own tokens, averaged over the modalities present.
            masks = [None] if modality is None else [modality == m for m in torch.unique(modality)]
            local, glob = [], []
            for mask in masks:
                p, lp = (probs, log_probs) if mask is None else (probs[mask], log_probs[mask])
                local.append(-(p * lp).sum(-1).mean())  # mean per-token entropy
                mean = p.mean(0)  # [E] the modality's mean routing distribution
                entropy = -(mean * torch.log(mean.clamp_min(1e-20))).sum()
                tau = self.global_entropy_threshold
                glob.append(-entropy if tau is None else torch.clamp(tau - entropy, min=0.0))
            if self.local_entropy_weight > 0:
                aux["local_entropy"] = self.local_entropy_weight * torch.stack(local).mean()
            if self.global_entropy_weight > 0:
                aux["global_entropy"] = self.global_entropy_weight * torch.stack(glob).mean()
        return aux

    @torch.no_grad()
    def _summarise(
        self,
        log_probs: _Lazy,
        token_load: _Lazy,
        token_dropped: _Lazy,
        modality: torch.Tensor | None,
        num_tokens: int,
    ) -> RoutingStats:
        log_probs = _resolve(log_probs).detach().float()
        token_entropy = -(log_probs.exp() * log_probs).sum(-1)  # [T]
        token_load = _resolve(token_load).detach().float()
        token_dropped = _resolve(token_dropped).detach().float()
        per_modality: dict[int, dict[str, Any]] = {}
        if modality is not None:
            for m in torch.unique(modality).tolist():
                sel = modality == m
                dropped = float(token_dropped[sel].mean())
                per_modality[int(m)] = {
                    "tokens": int(sel.sum()),
                    **_load_summary(token_load[sel].sum(0).cpu()),
                    "dropped_fraction": dropped,
                    "routing_success_rate": 1.0 - dropped,
                    "entropy": float(token_entropy[sel].mean()),
                }
        return RoutingStats(
            tokens=int(num_tokens),
            load=token_load.sum(0).cpu(),
            dropped_fraction=float(token_dropped.mean()) if token_dropped.numel() else 0.0,
            entropy=float(token_entropy.mean()) if token_entropy.numel() else 0.0,
            router=self.name,
            modalities=per_modality,
        )


#: A tensor, or a zero-argument callable that computes it when (and if) it is needed.
_Lazy = torch.Tensor | Callable[[], torch.Tensor]


def _resolve(value: _Lazy) -> torch.Tensor:
    return value() if callable(value) else value


class _DeferredLosses(dict):
    """The aux losses of an eval-mode forward: a dict that computes its entries when first read."""

    __slots__ = ("_compute",)

    def __init__(self, compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute

    def _fill(self) -> None:
        compute, self._compute = self._compute, None
        if compute is not None:
            super().update(compute())

    def __getitem__(self, key):
        self._fill()
        return super().__getitem__(key)

    def __iter__(self):
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()

    def __contains__(self, key) -> bool:
        self._fill()
        return super().__contains__(key)

    def __eq__(self, other) -> bool:
        self._fill()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._fill()
        return super().__repr__()

    def __reduce__(self):
        self._fill()
        return (dict, (dict(super().items()),))

    def get(self, key, default=None):
        self._fill()
        return super().get(key, default)

    def keys(self):
        self._fill()
        return super().keys()

    def values(self):
        self._fill()
        return super().values()

    def items(self):
        self._fill()
        return super().items()

    def copy(self) -> dict[str, torch.Tensor]:
        self._fill()
        return dict(super().items())


def _modality_ids(num_tokens: int, device: torch.device) -> torch.Tensor | None:
    mask = current_modality()
    if mask is None:
        return None
    if mask.numel() != num_tokens:
        raise ConfigError(
            f"the modality mask has {mask.numel()} entries but an MoE layer saw {num_tokens} tokens; pass one "
            "modality id per token, shaped like the model's token ids ([batch, seq])"
        )
    return mask.reshape(-1).to(device=device, dtype=torch.long)


def _groups(num_tokens: int, group_size: int | None) -> tuple[int, int]:
    """``(groups, group_size)`` for ``num_tokens`` tokens in groups of ``group_size`` (None: one group)."""
    m = num_tokens if group_size is None else group_size
    if m == 0:
        return 0, 0
    return num_tokens // m, m


def assignment_load(index: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, E]``: how many of each token's assignments ``index [T, k]`` went to each expert (drops excluded),
    or with ``weight [T, k]`` the sum of those assignments' weights (a combine matrix).

    A one-hot and a sum, not a scatter-add: ONNX Runtime's CPU provider has no float16 ScatterElements with
    reduction, and models export this.
    """
    valid = index >= 0
    per_assignment = valid if weight is None else weight * valid  # [T, k]
    return (F.one_hot(index.clamp_min(0), num_experts) * per_assignment.unsqueeze(-1)).sum(1)  # [T, k, E] -> [T, E]


# ---------------------------------------------------------------------------------------------------------
# Token choice: top-k and Batch Priority Routing
# ---------------------------------------------------------------------------------------------------------


class TopKRouter(Router):
    """Token-choice top-k routing (Switch k=1; GShard/GLaM k=2; Mixtral-style renormalised top-k).

    ``gates = softmax(W x)``; each token picks its k largest gates. With a capacity factor, each expert takes
    at most ``C = ceil(T * cf / E)`` assignments (``T``: all tokens of the call), filled in priority order
    "every token's first choice before any token's second choice" (GShard); assignments past capacity are
    dropped and contribute zero, so the token passes through the residual connection.
    """

    name = "topk"

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__(config)
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.normalize_weights = config.normalize_weights
        # Split experts are pieces of one FFN: the chosen ones are summed (weight 1), as in MoEfication.
        self.unit_weights = config.init == "split"
        self.gate = nn.Linear(hidden_size, config.num_experts, bias=self.unit_weights)

    def capacity(self, num_tokens: int) -> int:
        if self.capacity_factor is None:
            raise ConfigError(f"router {self.name!r} is dropless: it has no capacity (capacity_factor=None)")
        return math.ceil(num_tokens * self.capacity_factor / self.num_experts)

    def forward(self, x: torch.Tensor, group_size: int | None = None) -> Routing:
        logits = _gate_logits(self.gate, x).float()  # [T, E]
        index, weight = route_topk(logits, self.top_k, self.normalize_weights)  # [T, k]
        first_choice = index[:, 0]  # before capacity: the Switch loss counts what tokens asked for
        dropless = self.capacity_factor is None
        if not dropless:
            index, weight = self._apply_capacity(
                index, weight, self.capacity(x.shape[0]), priority=self._priority(logits, weight)
            )
        if self.unit_weights:
            # Weight 1 for every kept assignment; in training the gate values' gradient passes straight
            # through (value 1, d/dgate 1), so the router still learns which experts help.
            unit = (index >= 0).to(weight.dtype)
            weight = unit + (weight - weight.detach()) * unit if torch.is_grad_enabled() else unit
            dropless = False  # not the softmax top-k weights the fused op computes
        aux = self._finish(
            logits,
            lambda: torch.log_softmax(logits, dim=-1),
            lambda: assignment_load(index, self.num_experts),
            lambda: (index < 0).float().mean(-1),
            first_choice,
        )
        return Routing(logits, index, weight, dropless_topk=dropless, aux=aux)

    def _priority(self, logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """Per-token priority for filling capacity (higher first); None keeps the token order."""
        return None

    def _apply_capacity(
        self,
        index: torch.Tensor,
        weight: torch.Tensor,
        capacity: int,
        priority: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, k = index.shape
        order = None
        if priority is not None:
            # Batch Priority Routing: fill the buffers in order of decreasing priority, then unpermute.
            order = torch.argsort(priority, descending=True, stable=True)  # [T]
            index_in_order = index.index_select(0, order)
        else:
            index_in_order = index
        # Priority order: choice 0 of every token, then choice 1 of every token, ... -> [k*T, E]
        one_hot = F.one_hot(index_in_order.t().reshape(-1), self.num_experts)
        position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(-1)  # 1-based slot in the expert's buffer
        keep = (position <= capacity).reshape(k, num_tokens).t()  # [T, k] (in priority order)
        if order is not None:
            keep = torch.empty_like(keep).index_copy(0, order, keep)
        index = torch.where(keep, index, torch.full_like(index, -1))
        weight = torch.where(keep, weight, torch.zeros_like(weight))
        return index, weight

    def extra_repr(self) -> str:
        cf = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        weights = "unit" if self.unit_weights else f"normalize={self.normalize_weights}"
        return f"experts={self.num_experts}, top_k={self.top_k}, {cf}, {weights}"


class BatchPriorityRouter(TopKRouter):
    """Token-choice top-k with Batch Priority Routing (Riquelme et al. 2021, V-MoE; used by LIMoE).

    Before the capacity buffers are filled, the tokens are sorted by their largest gate value (descending):
    under a tight capacity the tokens the router is least confident about are dropped, not the ones that
    happen to come last. GShard's order across choices is kept: every token's first choice (in priority
    order) before any token's second choice.
    """

    name = "bpr"

    def _priority(self, logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)  # [T] top-1 gate value


# ---------------------------------------------------------------------------------------------------------
# Expert Choice
# ---------------------------------------------------------------------------------------------------------


class ExpertChoiceRouter(Router):
    """Expert Choice routing (Zhou et al. 2022): experts pick tokens instead of tokens picking experts.

    ``S = softmax(W x)`` over experts ``[m, E]`` for the ``m`` tokens of a group (sequence); each expert takes
    the ``C = ceil(m * cf / E)`` tokens with the largest scores in its column of ``S`` and weights its output
    for token t by ``S[t, e]``. Every expert processes exactly ``C`` tokens per group (perfect balance); a
    token may be taken by 0 to ``E`` experts (0: its FFN output is zero, it passes through the residual).

    Not causal: whether an expert takes token t depends on the scores of every other token of the group,
    later ones included, so it cannot be used in an autoregressive decoder (see
    :func:`check_router_causality`).
    """

    name = "expert-choice"
    mixes_tokens = True

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__(config)
        self.capacity_factor = float(config.capacity_factor if config.capacity_factor is not None else config.top_k)
        self.gate = nn.Linear(hidden_size, config.num_experts, bias=False)

    def capacity(self, group_size: int) -> int:
        """Tokens each expert takes from a group of ``group_size`` tokens."""
        c = math.ceil(group_size * self.capacity_factor / self.num_experts)
        return torch.sym_min(torch.sym_max(c, 1), group_size)

    def forward(self, x: torch.Tensor, group_size: int | None = None) -> Routing:
        num_tokens = x.shape[0]
        groups, m = _groups(num_tokens, group_size)
        num_experts = self.num_experts
        logits = _gate_logits(self.gate, x).float()  # [T, E]
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        scores = probs.reshape(groups, m, num_experts).transpose(1, 2)  # [G, E, m]
        _, chosen = torch.topk(scores, self.capacity(m), dim=-1)  # [G, E, C]
        taken = torch.zeros_like(scores).scatter(-1, chosen, 1.0).transpose(1, 2)  # [G, m, E]
        taken = taken.reshape(num_tokens, num_experts) > 0  # [T, E]
        experts = torch.arange(num_experts, device=x.device).expand(num_tokens, num_experts)
        index = torch.where(taken, experts, torch.full_like(experts, -1))  # [T, E]
        weight = torch.where(taken, probs, torch.zeros_like(probs))  # [T, E]
        aux = self._finish(logits, log_probs, taken.float, lambda: (~taken.any(-1)).float(), None)
        return Routing(logits, index, weight, aux=aux)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, capacity_factor={self.capacity_factor} (per sequence)"


# ---------------------------------------------------------------------------------------------------------
# Soft MoE
# ---------------------------------------------------------------------------------------------------------


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2023): experts process slots, each a convex combination of the tokens.

    For the ``m`` tokens ``X [m, d]`` of a group (sequence) and slot parameters ``Phi [d, n, p]`` (``n``
    experts, ``p`` slots each), both L2-normalised over ``d`` and the slots multiplied by a learned scalar
    scale: logits ``L = X Phi [m, n*p]``; dispatch ``D = softmax(L)`` over the tokens (each slot input is
    ``D^T X``); combine ``C = softmax(L)`` over all ``n*p`` slots (each token's output is ``C Y`` for slot
    outputs ``Y``). Fully differentiable, nothing dropped, permutation-equivariant over the tokens of a group,
    and one sequence never sees another. Not causal: every slot mixes all tokens of the sequence.

    ``p`` is ``slots_per_expert`` when the config fixes it; otherwise ``ceil(m * cf / n)`` (``cf`` the
    capacity factor, default 1, so about one slot per token) taken from a bank of ``max_slots_per_expert``
    learned slots per expert. The scale is stored as its logarithm, so the conversion's ``N(0, std)`` router
    initialisation leaves it at about 1, as in the paper.
    """

    name = "soft"
    mixes_tokens = True

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__(config)
        self.fixed_slots = config.slots_per_expert
        self.capacity_factor = float(config.capacity_factor if config.capacity_factor is not None else 1.0)
        bank = config.slots_per_expert or config.max_slots_per_expert
        self.slots = nn.Parameter(torch.randn(hidden_size, config.num_experts, bank) * config.router_init_std)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def slots_per_expert(self, group_size: int) -> int:
        """Slots per expert ``p`` for a group of ``group_size`` tokens."""
        if self.fixed_slots is not None:
            return self.fixed_slots
        p = math.ceil(group_size * self.capacity_factor / self.num_experts)
        return torch.sym_min(torch.sym_max(p, 1), self.slots.shape[-1])

    def forward(self, x: torch.Tensor, group_size: int | None = None) -> Routing:
        num_tokens, hidden = x.shape
        groups, m = _groups(num_tokens, group_size)
        n = self.num_experts
        p = self.slots_per_expert(m)
        tokens = F.normalize(x.float(), dim=-1).reshape(groups, m, hidden)  # [G, m, d]
        phi = F.normalize(self.slots[:, :, :p].float(), dim=0).reshape(hidden, n * p)  # [d, n*p]
        logits = torch.einsum("gmd,ds->gms", tokens, phi * self.log_scale.float().exp())  # [G, m, n*p]
        dispatch = torch.softmax(logits, dim=1)  # over the tokens of the group
        combine = torch.softmax(logits, dim=2)  # over all slots
        flat = logits.reshape(num_tokens, n * p)  # [T, n*p]
        # Each token's routing distribution over experts: its combine mass on each expert's slots.
        def log_probs() -> torch.Tensor:  # [T, E]
            return torch.logsumexp(flat.reshape(num_tokens, n, p), dim=-1) - torch.logsumexp(flat, -1, keepdim=True)

        aux = self._finish(flat, log_probs, lambda: log_probs().exp(), lambda: flat.new_zeros(num_tokens), None)
        return Routing(flat, aux=aux, dispatch=dispatch, combine=combine, slots_per_expert=p)

    def extra_repr(self) -> str:
        slots = self.fixed_slots or f"ceil(tokens*{self.capacity_factor}/{self.num_experts}) <= {self.slots.shape[-1]}"
        return f"experts={self.num_experts}, slots_per_expert={slots}"


# ---------------------------------------------------------------------------------------------------------
# Task-MoE
# ---------------------------------------------------------------------------------------------------------


class TaskRouter(Router):
    """Task-level routing (Kudugunta et al. 2021, Task-MoE): the route depends on the task, not the token.

    A learned table of logits ``[num_tasks, E]`` (a linear router on one-hot task embeddings); every token of
    an example with task ``t`` goes to the top-k experts of ``softmax(table[t])`` (renormalised when
    ``normalize_weights``), dropless. The task ids come from ``with moefx.tasks.task_ids(ids):`` (one int for
    the whole batch, one per example, or one per token as a ``[batch, seq]`` tensor). Since a task always uses
    the same k experts, :func:`moefx.tasks.extract_task` can cut a model down to one task's experts.

    Under ``torch.export`` the ids may be a traced tensor (an ONNX graph input: ``moefx.export_onnx`` makes
    one); the route is then a gather from the logits table, computed at run time.
    """

    name = "task"

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__(config)
        if config.num_tasks is None:
            raise ConfigError("router='task' needs num_tasks, the number of task ids it learns a route for "
                              "(e.g. num_tasks=4)")
        self.num_tasks = config.num_tasks
        self.top_k = config.top_k
        self.normalize_weights = config.normalize_weights
        self.task_logits = nn.Parameter(torch.randn(config.num_tasks, config.num_experts) * config.router_init_std)

    def task_route(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(experts [k], weights [k])`` task ``task`` uses, in the order of the top-k."""
        self._check_task(task)
        index, weight = route_topk(self.task_logits[task : task + 1].float(), self.top_k, self.normalize_weights)
        return index[0], weight[0]

    def _check_task(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ConfigError(f"task id {task!r} is out of range: this router has num_tasks={self.num_tasks}")

    def _token_tasks(self, num_tokens: int, group_size: int | None, device: torch.device) -> torch.Tensor:
        ids = current_task_ids()
        if ids is None:
            raise ConfigError(
                "router='task' needs task ids: run the model inside `with moefx.tasks.task_ids(ids):` with one "
                "int for the whole batch or one int per example (moefx bench, partition and heal: --task-id N)"
            )
        if isinstance(ids, int):
            self._check_task(ids)
            return torch.full((num_tokens,), ids, dtype=torch.long, device=device)
        groups, m = _groups(num_tokens, group_size)
        per_token = ids.dim() == 2
        if ids.numel() != (num_tokens if per_token else groups):
            got = f"{tuple(ids.shape)} task ids (one per token)" if per_token else f"{ids.numel()} task ids"
            raise ConfigError(
                f"got {got} but the MoE layer saw {groups} example(s) of {m} tokens; pass one int for the whole "
                "batch, one task id per example or a [batch, seq] tensor of one per token"
            )
        if not _tracing():
            bad = ids[(ids < 0) | (ids >= self.num_tasks)]
            if bad.numel():
                self._check_task(int(bad[0]))
        else:
            # An exported graph cannot raise: an id out of range becomes num_tasks, which its Gather rejects at
            # run time (a negative id would otherwise wrap around to a real task). Where the layer sees the
            # input's [batch, seq] (not tokens flattened before the FFN), the comparison ties the ids' symbolic
            # sizes to the input's batch (and sequence).
            if ids.shape[0] == groups and (not per_token or ids.shape[1] == m):
                torch._check(ids.shape[0] == groups)
            ids = torch.where((ids >= 0) & (ids < self.num_tasks), ids, self.num_tasks)
        ids = ids.to(device=device, dtype=torch.long)
        if per_token:
            return ids.reshape(num_tokens)
        # One id per example, repeated over its tokens (expand, not repeat_interleave: it exports to ONNX with
        # symbolic batch and sequence sizes).
        return ids.reshape(groups, 1).expand(groups, m).reshape(num_tokens)

    def forward(self, x: torch.Tensor, group_size: int | None = None) -> Routing:
        tasks = self._token_tasks(x.shape[0], group_size, x.device)  # [T]
        logits = self.task_logits.float().index_select(0, tasks)  # [T, E]
        index, weight = route_topk(logits, self.top_k, self.normalize_weights)  # [T, k]
        aux = self._finish(
            logits,
            lambda: torch.log_softmax(logits, dim=-1),
            lambda: assignment_load(index, self.num_experts),
            lambda: logits.new_zeros(x.shape[0]),
            index[:, 0],
        )
        return Routing(logits, index, weight, dropless_topk=True, aux=aux)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, tasks={self.num_tasks}, top_k={self.top_k}, normalize={self.normalize_weights}"


class StaticRouter(Router):
    """Every token to all experts of the (cut-down) bank with fixed weights: a task's route, extracted.

    Built by :func:`moefx.tasks.extract_task`, not from a config; it has no parameters and no aux losses.
    """

    name = "static"

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__(MoEConfig(num_experts=max(int(weights.numel()), 1), top_k=1))
        self.register_buffer("expert_weight", weights.detach().float().clone())  # [k]
        self.load_balance_weight = self.z_loss_weight = 0.0
        self.local_entropy_weight = self.global_entropy_weight = 0.0

    def forward(self, x: torch.Tensor, group_size: int | None = None) -> Routing:
        num_tokens, k = x.shape[0], self.expert_weight.shape[0]
        index = torch.arange(k, device=x.device).expand(num_tokens, k)  # [T, k]
        weight = self.expert_weight.expand(num_tokens, k)
        logits = torch.log(weight.clamp_min(1e-20))
        aux = self._finish(
            logits,
            lambda: torch.log_softmax(logits, dim=-1),
            lambda: assignment_load(index, k),
            lambda: logits.new_zeros(num_tokens),
            None,
        )
        return Routing(logits, index, weight, aux=aux)

    def extra_repr(self) -> str:
        return f"weights={[round(float(w), 4) for w in self.expert_weight]}"


#: Router classes by ``MoEConfig.router`` name.
ROUTER_TYPES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "bpr": BatchPriorityRouter,
    "expert-choice": ExpertChoiceRouter,
    "soft": SoftMoERouter,
    "task": TaskRouter,
}


def build_router(hidden_size: int, config: MoEConfig) -> Router:
    return ROUTER_TYPES[config.router](hidden_size, config)


# ---------------------------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------------------------

_CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def model_causality(model: nn.Module) -> str | None:
    """Why ``model`` is a causal (autoregressive) model, or None if nothing says it is.

    Looks at the Hugging Face config (``is_decoder``), the class name (``...ForCausalLM``, ``...LMHeadModel``)
    and any submodule with ``is_causal = True`` (causal self-attention in transformers' attention modules).
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_decoder", False) is True:
        return f"{type(model).__name__} has config.is_decoder=True"
    for cls in type(model).__mro__:
        if cls.__name__.endswith(_CAUSAL_CLASS_SUFFIXES):
            return f"{type(model).__name__} is a causal language model class"
    for name, module in model.named_modules():
        if getattr(module, "is_causal", None) is True:
            return f"{name or '(root)'} ({type(module).__name__}) has is_causal=True"
    return None


def check_router_causality(model: nn.Module, config: MoEConfig) -> None:
    """Refuse a token-mixing router (Soft MoE, Expert Choice) on a causal model.

    Such routers let every position of a sequence depend on later positions, which silently breaks
    autoregressive training and generation. ``MoEConfig(allow_noncausal=True)`` forces the conversion.

    Raises:
        ConfigError: ``config.router`` mixes tokens, the model is causal and ``allow_noncausal`` is False.
    """
    router_type = ROUTER_TYPES.get(config.router)
    if router_type is None or not router_type.mixes_tokens or config.allow_noncausal:
        return
    reason = model_causality(model)
    if reason is not None:
        raise ConfigError(
            f"router={config.router!r} mixes the tokens of a sequence, so in a causal model ({reason}) earlier "
            "positions would see later ones; use router='topk', 'bpr' or 'task', or pass "
            "allow_noncausal=True to convert anyway"
        )
