"""MoEConfig: what to convert and how, as one small, frozen, validated dataclass.

The config is the single source of truth for a conversion: the CLI flags parse into it, the Python API takes
it, and ``recipe.json`` stores its :meth:`MoEConfig.to_dict` so that ``moefx.load`` can rebuild the model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["CONFIG_VERSION", "EXPERT_INITS", "PARTITIONS", "ROUTERS", "MoEConfig", "select_layers"]

CONFIG_VERSION = 1

#: Routers this version of moefx implements, with a one-line description for ``--help``.
ROUTERS: dict[str, str] = {
    "topk": "token choice top-k (Switch k=1, GShard/GLaM k=2, Mixtral-style renormalised), capacity or dropless",
    "bpr": "token choice top-k with Batch Priority Routing (V-MoE): confident tokens fill capacity first",
    "expert-choice": "Expert Choice (Zhou et al. 2022): each expert takes its top-C tokens; not causal",
    "soft": "Soft MoE (Puigcerver et al. 2023): experts process weighted averages of tokens; not causal",
    "task": "Task-MoE (Kudugunta et al. 2021): route by task id (moefx.task_ids), extractable per task",
}

#: How the experts of a converted FFN are initialised.
EXPERT_INITS: dict[str, str] = {
    "upcycle": "every expert a copy of the dense FFN (Sparse Upcycling); exact with renormalised top-k",
    "random": "experts initialised like fresh nn.Linear layers (seeded)",
    "split": "the dense FFN's neurons partitioned into experts (MoEfication/CMoE); exact with all experts active",
    "lora": "the dense FFN kept frozen and shared, experts are routed low-rank adapters (MoELoRA); exact at init",
}

#: How ``init='split'`` partitions the dense FFN's hidden neurons into experts.
PARTITIONS: dict[str, str] = {
    "random": "a seeded random permutation of the neurons",
    "cluster": "balanced k-means on the neurons' input weights (weight-only, no data needed)",
    "coactivation": "balanced spectral partition of the neurons' co-activation graph on calibration data",
}

#: Adam steps per MoE layer when healing (``moefx.heal``, ``--heal-steps``).
HEAL_STEPS = 400

#: Calibration input rows sampled per FFN at most (``calib_tokens``, ``--calib-tokens``).
CALIB_TOKENS = 16384


@dataclass(frozen=True)
class MoEConfig:
    """How to turn each selected dense FFN into a Mixture-of-Experts layer.

    Routing:
        router: the router name (see :data:`ROUTERS`).
        num_experts: experts per MoE layer.
        top_k: experts each token is sent to (``topk``, ``bpr``); experts each task uses (``task``).
        capacity_factor: ``topk``/``bpr``: expert capacity ``C = ceil(tokens * capacity_factor / num_experts)``
            over the tokens of one call; assignments past it are dropped (their FFN output is zero, so the token
            passes through the residual). ``None`` is dropless (``bpr`` needs a number). ``expert-choice``: each
            expert takes ``C = ceil(group_tokens * capacity_factor / num_experts)`` tokens of each sequence
            (``None``: ``top_k``, the compute of token-choice top-k). ``soft``: slots per expert
            ``p = ceil(group_tokens * capacity_factor / num_experts)`` (``None``: 1.0). ``task``: must be None.
        normalize_weights: renormalise the top-k gate values to sum to one (Mixtral); otherwise the raw
            softmax probabilities weight the experts (Switch, GShard).
        router_init_std: standard deviation of the router's initial weights.
        load_balance_weight, z_loss_weight: weights of the Switch load-balancing loss and the ST-MoE router
            z-loss, read with ``moefx.aux_loss(model)`` after a forward pass.
        local_entropy_weight, global_entropy_weight: weights of the LIMoE entropy losses: the mean per-token
            routing entropy (minimised: confident routing) and minus the entropy of the mean routing
            distribution (maximised: all experts used). Computed per modality under ``moefx.modality(mask)``
            and averaged over the modalities present.
        global_entropy_threshold: LIMoE's threshold ``tau`` (nats): the global loss is
            ``max(0, tau - H(mean p))``, so it stops pushing once the entropy reaches ``tau``
            (``log(n)`` asks for at least about n experts). ``None``: the plain ``-H(mean p)``.
        slots_per_expert: Soft MoE slots per expert ``p``, fixed; ``None`` sets it from each sequence's token
            count (see ``capacity_factor``), using at most ``max_slots_per_expert`` learned slots per expert.
        max_slots_per_expert: size of the Soft MoE slot bank when ``slots_per_expert`` is None.
        num_tasks: number of task ids the ``task`` router learns a route for (required by it).
        allow_noncausal: allow a token-mixing router (``soft``, ``expert-choice``) in a causal decoder,
            where it leaks future tokens into earlier positions (see ``routers.check_router_causality``).

    Experts:
        init: ``"upcycle"``, ``"random"``, ``"split"`` or ``"lora"`` (see :data:`EXPERT_INITS`).
        init_noise: relative std of Gaussian noise added to each upcycled expert to break symmetry.
        expert_size: hidden (intermediate) size of each expert; ``None`` keeps the dense FFN's (``split``
            derives it: the FFN's hidden size over ``num_experts + shared_experts``).
        partition: ``split``: how neurons are grouped into experts (see :data:`PARTITIONS`); ``None`` picks
            ``coactivation`` when calibration data is given and ``cluster`` otherwise (``coactivation``
            without calibration data is an error).
        shared_experts: ``split``: how many expert-sized groups of neurons form an always-on shared expert
            (CMoE): the neurons most active on calibration data (the largest-norm ones without data). The
            layer then runs ``shared_experts + top_k`` of ``shared_experts + num_experts`` neuron groups.
        lora_rank: ``lora``: rank of each expert's adapters.
        seed: seed of every random choice the conversion makes.

    Layer selection (all given criteria must hold):
        every: convert every k-th FFN in model order (the k-th, 2k-th, ...; ``every=2`` is GShard/Switch's
            "every other layer").
        last: convert only the last n FFNs (V-MoE style).
        layers: a regular expression; convert only FFNs whose name it matches (``re.search``).
        exclude: a regular expression; never convert FFNs whose name it matches.
    """

    router: str = "topk"
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    normalize_weights: bool = True
    router_init_std: float = 0.02
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    local_entropy_weight: float = 0.0
    global_entropy_weight: float = 0.0
    global_entropy_threshold: float | None = None
    slots_per_expert: int | None = None
    max_slots_per_expert: int = 64
    num_tasks: int | None = None
    allow_noncausal: bool = False
    init: str = "upcycle"
    init_noise: float = 0.0
    expert_size: int | None = None
    partition: str | None = None
    shared_experts: int = 0
    lora_rank: int = 8
    seed: int = 0
    every: int = 1
    last: int | None = None
    layers: str | None = None
    exclude: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts, minimum=1)
        _check_int("top_k", self.top_k, minimum=1)
        if self.router not in ROUTERS:
            raise ConfigError(
                f"unknown router {self.router!r}: choose one of {', '.join(sorted(ROUTERS))}"
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k} is larger than num_experts={self.num_experts}: "
                "a token cannot be routed to more experts than the layer has"
            )
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)):
                raise ConfigError(f"capacity_factor must be a number or None, got {self.capacity_factor!r}")
            if not 0 < self.capacity_factor < math.inf:
                raise ConfigError(
                    f"capacity_factor must be a positive finite number, got {self.capacity_factor} (leave it out "
                    "for dropless routing)"
                )
        if self.init not in EXPERT_INITS:
            raise ConfigError(f"unknown init {self.init!r}: choose one of {', '.join(sorted(EXPERT_INITS))}")
        for name in ("init_noise", "router_init_std", "load_balance_weight", "z_loss_weight",
                     "local_entropy_weight", "global_entropy_weight"):
            _check_non_negative(name, getattr(self, name))
        if self.global_entropy_threshold is not None:
            _check_non_negative("global_entropy_threshold", self.global_entropy_threshold)
        self._check_router_options()
        if self.expert_size is not None:
            _check_int("expert_size", self.expert_size, minimum=1)
        self._check_init_options()
        _check_int("seed", self.seed, minimum=0)
        _check_int("every", self.every, minimum=1)
        if self.last is not None:
            _check_int("last", self.last, minimum=1)
        for name in ("layers", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None

    def _check_router_options(self) -> None:
        router = self.router
        if self.slots_per_expert is not None:
            _check_int("slots_per_expert", self.slots_per_expert, minimum=1)
            if router != "soft":
                raise ConfigError(f"slots_per_expert only applies to router='soft' (router is {router!r})")
        _check_int("max_slots_per_expert", self.max_slots_per_expert, minimum=1)
        if self.num_tasks is not None:
            _check_int("num_tasks", self.num_tasks, minimum=1)
            if router != "task":
                raise ConfigError(f"num_tasks only applies to router='task' (router is {router!r})")
        if not isinstance(self.allow_noncausal, bool):
            raise ConfigError(f"allow_noncausal must be True or False, got {self.allow_noncausal!r}")
        if router == "task":
            if self.num_tasks is None:
                raise ConfigError(
                    "router='task' needs num_tasks, the number of task ids it learns a route for "
                    "(e.g. num_tasks=4)"
                )
            if self.capacity_factor is not None:
                raise ConfigError(
                    "router='task' is dropless (every token of a task goes to the task's experts); "
                    f"leave capacity_factor=None (got {self.capacity_factor})"
                )
        if router == "bpr" and self.capacity_factor is None:
            raise ConfigError(
                "router='bpr' orders tokens by priority to fill a limited capacity, so it needs a "
                "capacity_factor (e.g. 1.0); without one use router='topk'"
            )

    def _check_init_options(self) -> None:
        init = self.init
        _check_int("shared_experts", self.shared_experts, minimum=0)
        _check_int("lora_rank", self.lora_rank, minimum=1)
        if self.partition is not None and self.partition not in PARTITIONS:
            raise ConfigError(
                f"unknown partition {self.partition!r}: choose one of {', '.join(sorted(PARTITIONS))}"
            )
        if init != "split" and (self.partition is not None or self.shared_experts):
            raise ConfigError(
                f"partition and shared_experts only apply to init='split' (init is {init!r})"
            )
        if init in ("split", "lora") and self.router not in ("topk", "bpr"):
            raise ConfigError(
                f"init={init!r} needs a token-choice router (topk or bpr), got router={self.router!r}"
            )
        if init == "split" and self.expert_size is not None:
            raise ConfigError(
                "init='split' derives the expert size from the dense FFN (hidden size / (num_experts + "
                "shared_experts)); leave expert_size unset"
            )
        if init == "lora" and self.expert_size is not None:
            raise ConfigError("init='lora' keeps the dense FFN; leave expert_size unset (set lora_rank)")

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a ``version`` key; :meth:`from_dict` reads it back."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.extra:
            data["extra"] = dict(self.extra)
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {version} is not supported by this moefx (expects {CONFIG_VERSION}); "
                "convert the model again with this version"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MoEConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a non-negative number, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")


def select_layers(names: list[str], config: MoEConfig) -> list[bool]:
    """Which of the FFNs ``names`` (in model order) the config selects for conversion.

    Criteria combine with AND: ``every`` picks positions k-1, 2k-1, ... of the full list, ``last`` the final
    n positions, ``layers`` the names its regex matches, and ``exclude`` removes the names it matches.
    """
    n = len(names)
    include = re.compile(config.layers) if config.layers else None
    exclude = re.compile(config.exclude) if config.exclude else None
    selected = []
    for i, name in enumerate(names):
        ok = (i % config.every) == config.every - 1
        if config.last is not None:
            ok = ok and i >= n - config.last
        if include is not None:
            ok = ok and include.search(name) is not None
        if exclude is not None:
            ok = ok and exclude.search(name) is None
        selected.append(ok)
    return selected
