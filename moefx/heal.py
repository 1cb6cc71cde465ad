"""Healing: layer-wise distillation of each MoE layer onto the dense FFN it replaced.

One calibration pass runs the model with every MoE layer replaced by its dense FFN (so each layer sees the
inputs the dense model gives it) and keeps a bounded sample of each layer's inputs ``X``; the targets are the
dense FFN's outputs ``Y = FFN(X)``. Then, one layer at a time:

* ``split`` layers (experts are pieces of the FFN, summed): the router is refitted to the experts that carry
  the most output mass per token, then the down projections of every expert and of the shared expert, the
  experts' biases and the layer bias are solved for jointly by ridge least squares given that routing, a
  closed-form fit, minutes on a CPU;
* any other layer: a few hundred Adam steps on the mean squared error, routing fixed per step.

A tenth of the sample is held out: the per-layer error before and after (mean squared error over the mean
squared target, on held-out rows) is reported, and a fit that does not lower it is thrown away, so healing
never makes a layer worse, and a layer that already reproduces its FFN (a split layer with every expert
active) is left exactly as it was.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .calibrate import calibration_batches, record_ffns
from .errors import ConfigError
from .experts import layer_generator
from .layers import ExpertBank, MoELayer
from .passes.ffn_rules import FFNMatch
from .progress import progress
from .split import fit_router, oracle_choice

__all__ = ["heal", "heal_layers"]

log = logging.getLogger("moefx")

#: Below this relative error a layer counts as already reproducing its FFN and is left untouched.
EXACT = 1e-10


def heal(model: nn.Module, calib: Any, *, dense: nn.Module | None = None, calib_tokens: int = 16384,
         tokenizer: Any = None, seed: int | None = None, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Fit every MoE layer of a converted ``model`` to its dense FFN on calibration data, in place.

    Args:
        model: a model returned by :func:`moefx.convert` or :func:`moefx.load`.
        calib: calibration data (see :func:`moefx.calibrate.calibration_batches`).
        dense: the dense model it was converted from; by default loaded again from the recorded source
            (``trust_remote_code`` as for :func:`moefx.load`).
        calib_tokens: at most this many input rows per layer are sampled from the data.
        tokenizer: for a text ``calib`` file (default: the model's own, if found).
        seed: of the sampling (default: the conversion's seed).

    Returns the per-layer report (also kept in ``model.moefx_info.healing``).
    """
    from .convert import _analyze, moe_layers

    info = getattr(model, "moefx_info", None)
    if info is None:
        raise ConfigError("heal() needs a model converted by moefx.convert or loaded by moefx.load")
    if dense is None:
        from .io import load_source

        spec = (info.source or {}).get("spec")
        if not spec:
            raise ConfigError("the dense model this was converted from is unknown (it was converted from a Python "
                              "object); pass it: heal(model, calib, dense=dense_model) or --dense MODEL")
        dense = load_source(spec, trust_remote_code=trust_remote_code).model
    analysis = _analyze(dense, info.inputs, None)
    matches = {f.name: f.match for f in analysis.ffns}
    targets = {}
    for name, layer in moe_layers(model):
        if layer.source not in matches:
            raise ConfigError(f"{name}: its dense FFN {layer.source!r} is not in the dense model; pass the "
                              "model it was converted from")
        targets[name] = matches[layer.source]
    batches = calibration_batches(calib, model, info.inputs, tokenizer=tokenizer)
    report = heal_layers(model, targets, batches, max_tokens=calib_tokens,
                         seed=info.config.seed if seed is None else seed)
    info.healing = report
    return report


def heal_layers(model: nn.Module, dense: dict[str, FFNMatch], batches: Any, *, max_tokens: int = 16384,
                seed: int = 0) -> list[dict[str, Any]]:
    """Heal the MoE layers at the qualified names of ``dense`` (name -> its dense FFN), in place."""
    from .config import MoEConfig

    config = MoEConfig(seed=seed)
    targets = {name: (match, layer_generator(config, i, stream=4)) for i, (name, match) in enumerate(dense.items())}
    samples = record_ffns(model, targets, batches, max_tokens=max_tokens, desc="recording layer inputs")
    report = []
    with progress(total=len(dense), desc="healing", unit="layer") as bar:
        for name, match in dense.items():
            layer = model.get_submodule(name)
            report.append({"layer": name, **_heal_layer(layer, match, samples[name].inputs)})
            bar.update(1)
    for entry in report:
        log.info("moefx: healed %s: relative error %.3g -> %.3g (%s)", entry["layer"], entry["error_before"],
                 entry["error_after"], entry["method"])
    return report


@torch.no_grad()
def _heal_layer(layer: MoELayer, match: FFNMatch, x: torch.Tensor) -> dict[str, Any]:
    was_training = layer.training
    layer.eval()
    try:
        x = x.to(match.up_weight.dtype)
        y = _dense(match, x).float()
        val = torch.arange(x.shape[0]) % 10 == 9  # every tenth row held out
        if not bool(val.any()):
            val = torch.ones(x.shape[0], dtype=torch.bool)
        fit = ~val if bool((~val).any()) else val
        before = _error(layer, x[val], y[val])
        if before <= EXACT:
            return {"method": "exact", "error_before": before, "error_after": before, "tokens": int(x.shape[0])}
        saved = copy.deepcopy(layer.state_dict())
        if getattr(layer.router, "unit_weights", False):
            method = "least-squares"
            _fit_split(layer, x[fit], y[fit])
        else:
            method = "gradient"
            _fit_gradient(layer, x[fit], y[fit])
        after = _error(layer, x[val], y[val])
        if not after < before:
            layer.load_state_dict(saved)
            return {"method": method, "error_before": before, "error_after": before, "kept": False,
                    "tokens": int(x.shape[0])}
        return {"method": method, "error_before": before, "error_after": after, "kept": True,
                "tokens": int(x.shape[0])}
    finally:
        layer.train(was_training)


def _dense(match: FFNMatch, x: torch.Tensor) -> torch.Tensor:
    h = ACTIVATIONS[match.activation](F.linear(x, match.up_weight, match.up_bias))
    if match.gated:
        h = h * F.linear(x, match.gate_up_weight, match.gate_up_bias)
    return F.linear(h, match.down_weight, match.down_bias)


def _error(layer: MoELayer, x: torch.Tensor, y: torch.Tensor) -> float:
    out = torch.cat([layer(chunk).float() for chunk in x.split(4096)])
    return float((out - y).square().mean() / y.square().mean().clamp_min(1e-30))


def _hidden(bank: ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    h = ACTIVATIONS[bank.activation](F.linear(x, bank.w1[e], None if bank.b1 is None else bank.b1[e]))
    if bank.w3 is not None:
        h = h * F.linear(x, bank.w3[e], None if bank.b3 is None else bank.b3[e])
    return h.float()


def _fit_split(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> None:
    """Refit the router, then the down projections and biases by ridge least squares given its routing."""
    bank, k = layer.experts, layer.router.top_k
    hidden = [_hidden(bank, e, x) for e in range(bank.num_experts)]  # E x [N, Ie]
    outputs = torch.stack([h @ bank.w2[e].float().T for e, h in enumerate(hidden)], dim=1)  # [N, E, O]
    weight, bias = fit_router(x, oracle_choice(outputs, k))
    gate = layer.router.gate
    gate.weight.copy_(weight.to(gate.weight.dtype))
    if gate.bias is not None:
        gate.bias.copy_(bias.to(gate.bias.dtype))
    chosen = layer.router(x, None).expert_index  # [N, k], the routing the layer will use
    mask = torch.zeros(x.shape[0], bank.num_experts).scatter_(1, chosen.clamp_min(0), (chosen >= 0).float())
    columns = [h * mask[:, e:e + 1] for e, h in enumerate(hidden)]
    shared = layer.shared
    if shared is not None:
        columns.append(_hidden(shared, 0, x))
    columns += [mask, torch.ones(x.shape[0], 1)]
    features = torch.cat(columns, dim=1).double()  # [N, D]
    gram = features.T @ features
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram, features.T @ y.double()).float()  # [D, O]
    offset = 0
    size = bank.expert_size
    for e in range(bank.num_experts):
        bank.w2[e].copy_(solution[offset:offset + size].T.to(bank.w2.dtype))
        offset += size
    if shared is not None:
        shared.w2[0].copy_(solution[offset:offset + shared.expert_size].T.to(shared.w2.dtype))
        offset += shared.expert_size
    expert_bias = solution[offset:offset + bank.num_experts]
    layer_bias = solution[offset + bank.num_experts]
    bank.b2.copy_(expert_bias.to(bank.b2.dtype))  # split banks always have them (the compensation)
    layer.bias.copy_(layer_bias.to(layer.bias.dtype))


def _fit_gradient(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, steps: int = 300, batch: int = 1024,
                  lr: float = 1e-4) -> None:
    """Adam on the layer's trainable parameters, mean squared error to the dense outputs."""
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():  # eval mode: no dropout, the routing the layer will use
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
            loss = F.mse_loss(layer(x[rows]).float(), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
