"""Expert construction: build an MoE layer's experts and router from a dense FFN.

Builders are registered by ``MoEConfig.init`` name in :data:`EXPERT_BUILDERS`. Each takes the matched dense
FFN and returns an :class:`~moefx.layers.ExpertBank`; every random choice draws from a generator seeded by
``(config.seed, layer index)``, so the same inputs give the same conversion.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import MoEConfig
from .errors import ConfigError
from .layers import ExpertBank, MoELayer
from .lora import build_lora_layer
from .passes.ffn_rules import FFNMatch
from .routers import build_router
from .split import build_split_layer, empty_split_layer

__all__ = ["EXPERT_BUILDERS", "build_moe_layer", "layer_generator", "random_experts", "upcycle_experts"]


def layer_generator(config: MoEConfig, layer_index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one layer's random choices, independent of every other layer's."""
    return torch.Generator().manual_seed((config.seed * 1_000_003 + layer_index) * 7 + stream)


def _empty_bank(match: FFNMatch, config: MoEConfig, expert_size: int) -> ExpertBank:
    return ExpertBank(
        config.num_experts,
        match.in_features,
        expert_size,
        match.out_features,
        match.activation,
        gated=match.gated,
        up_bias=match.up_bias is not None,
        down_bias=match.down_bias is not None,
        dtype=match.up_weight.dtype,
        device=match.up_weight.device,
    )


@torch.no_grad()
def upcycle_experts(match: FFNMatch, config: MoEConfig, layer_index: int) -> ExpertBank:
    """Sparse Upcycling: every expert is a copy of the dense FFN (plus optional symmetry-breaking noise)."""
    if config.expert_size not in (None, match.hidden_features):
        raise ConfigError(
            f"init='upcycle' copies the dense FFN, so expert_size must be unset or {match.hidden_features} "
            f"(got {config.expert_size}); use init='random' for experts of another size"
        )
    bank = _empty_bank(match, config, match.hidden_features)
    pairs = [(bank.w1, match.up_weight), (bank.b1, match.up_bias), (bank.w3, match.gate_up_weight),
             (bank.b3, match.gate_up_bias), (bank.w2, match.down_weight), (bank.b2, match.down_bias)]
    gen = layer_generator(config, layer_index, stream=1)
    for target, dense in pairs:
        if target is None:
            continue
        target.copy_(dense.detach().unsqueeze(0).expand_as(target))
        if config.init_noise > 0 and target.dim() == 3:
            scale = config.init_noise * dense.detach().float().std()
            noise = torch.randn(target.shape, generator=gen) * scale
            target.add_(noise.to(target.dtype).to(target.device))
    return bank


@torch.no_grad()
def random_experts(match: FFNMatch, config: MoEConfig, layer_index: int) -> ExpertBank:
    """Experts initialised like fresh ``nn.Linear`` layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    size = config.expert_size or match.hidden_features
    bank = _empty_bank(match, config, size)
    gen = layer_generator(config, layer_index, stream=1)
    for tensor, fan_in in [(bank.w1, bank.in_features), (bank.b1, bank.in_features), (bank.w3, bank.in_features),
                           (bank.b3, bank.in_features), (bank.w2, size), (bank.b2, size)]:
        if tensor is None:
            continue
        bound = 1.0 / math.sqrt(fan_in)
        values = torch.rand(tensor.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
        tensor.copy_(values.to(tensor.dtype))
    return bank


#: Expert builders by ``MoEConfig.init`` name for the inits whose layer is a router plus a bank of experts
#: (``split`` and ``lora`` build their whole layer: see :func:`build_moe_layer`).
EXPERT_BUILDERS: dict[str, Callable[[FFNMatch, MoEConfig, int], ExpertBank]] = {
    "upcycle": upcycle_experts,
    "random": random_experts,
}


@torch.no_grad()
def build_moe_layer(match: FFNMatch, config: MoEConfig, layer_index: int, source: str, *, init: bool = True,
                    calib_inputs: torch.Tensor | None = None) -> MoELayer:
    """The MoE layer for one matched FFN. ``init=False`` allocates without initialising (for loading).

    ``calib_inputs [N, H]``: a sample of the FFN's inputs on calibration data, for the inits that use it
    (``split``: co-activation partition, fitted router, compensation).
    """
    if config.init == "split":
        if not init:
            return empty_split_layer(match, config, source)
        return build_split_layer(match, config, layer_generator(config, layer_index, stream=1), source, calib_inputs)
    if config.init == "lora":
        return build_lora_layer(match, config, layer_generator(config, layer_index, stream=1), source, init=init)
    if init:
        experts = EXPERT_BUILDERS[config.init](match, config, layer_index)
    else:
        experts = _empty_bank(match, config, config.expert_size or match.hidden_features)
    router = build_router(match.in_features, config).to(dtype=match.up_weight.dtype, device=match.up_weight.device)
    if init:
        gen = layer_generator(config, layer_index, stream=2)
        for param in router.parameters():
            values = torch.randn(param.shape, generator=gen) * config.router_init_std
            param.copy_(values.to(param.dtype))
    return MoELayer(router, experts, hidden_dropout=match.dropout_p, source=source)
