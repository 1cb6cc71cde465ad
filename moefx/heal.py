"""Healing: layer-wise distillation of each MoE layer onto the dense FFN it replaced.

One calibration pass runs the model with every MoE layer replaced by its dense FFN (so each layer sees the
inputs the dense model gives it) and keeps a bounded sample of each layer's inputs ``X``; the targets are the
dense FFN's outputs ``Y = FFN(X)``. Then, one layer at a time:

* ``split`` layers (experts are pieces of the FFN, summed): the router is refitted to the experts that carry
  the most output mass per token, then the down projections of every expert and of the shared expert, the
  experts' biases and the layer bias are solved for jointly by ridge least squares given that routing (a
  closed-form fit, seconds on a CPU); then ``steps`` Adam steps refine every expert weight, up projections
  included, given the same routing. The experts run as one masked dense FFN there: two large GEMMs per step
  instead of one small one per expert, several times faster on a CPU although half the work is masked out;
* any other layer: ``steps`` Adam steps on the mean squared error, routing fixed per step.

A tenth of the sample is held out: the per-layer error before and after (mean squared error over the mean
squared target, on held-out rows) is reported, and a fit that does not lower it is thrown away (for split
layers, each of the two stages), so healing never makes a layer worse, and a layer that already reproduces
its FFN (a split layer with every expert active) is left exactly as it was.

Layers that are each closer to their FFN can still make a model whose output is further from the dense one
(the errors compound; a small sample overfits). ``heal(..., end_to_end=True)`` therefore holds a tenth of the
calibration batches out, fits the layers on the rest, keeps that fit only if the model's output on the
held-out batches got closer to the dense model's, and then distils the whole model from the dense one
(:mod:`moefx.distill`), which keeps its best held-out state: healing never makes the model worse end to end.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .analysis import find_ffns
from .calibrate import calibration_batches, record_ffns
from .config import CALIB_TOKENS, HEAL_STEPS, MoEConfig
from .distill import DISTILL_SECONDS, EndToEnd, distill, hold_out
from .errors import CalibrationError, ConfigError
from .experts import layer_generator
from .layers import ExpertBank, MoELayer, moe_layers
from .passes.ffn_rules import FFNMatch
from .progress import progress
from .sources import load_source
from .split import fit_router, oracle_choice

__all__ = ["check_rows", "heal", "heal_layer", "heal_layers"]

log = logging.getLogger("moefx")

#: Below this relative error a layer counts as already reproducing its FFN and is left untouched.
EXACT = 1e-10


def heal(model: nn.Module, calib: Any, *, dense: nn.Module | None = None, calib_tokens: int = CALIB_TOKENS,
         tokenizer: Any = None, seed: int | None = None, steps: int = HEAL_STEPS,
         trust_remote_code: bool = False, end_to_end: bool = False, seconds: float | None = DISTILL_SECONDS,
         distill_steps: int | None = None, what: str = "auto", lr: float | None = None) -> list[dict[str, Any]]:
    """Fit every MoE layer of a converted ``model`` to its dense FFN on calibration data, in place; with
    ``end_to_end``, then distil the whole model from the dense one, never ending worse than it started.

    Args:
        model: a model returned by :func:`moefx.convert` or :func:`moefx.load`.
        calib: calibration data (see :func:`moefx.calibrate.calibration_batches`).
        dense: the dense model it was converted from; by default loaded again from the recorded source
            (``trust_remote_code`` as for :func:`moefx.load`).
        calib_tokens: at most this many input rows per layer are sampled from the data.
        tokenizer: for a text ``calib`` file (default: the model's own, if found).
        seed: of the sampling (default: the conversion's seed).
        steps: Adam steps per layer (0: split layers get the least-squares fit only, others nothing).
        end_to_end: hold a tenth of the calibration batches out (:func:`moefx.distill.hold_out`), fit the layers
            on the rest and keep that fit only if the model's output on the held-out batches got closer to the
            dense model's; then :func:`moefx.distill.distill` for ``seconds`` (0: skip it) or ``distill_steps``,
            ``what`` and ``lr`` as there, keeping its best held-out state. Healing then never makes the model
            worse end to end on held-out calibration data, whatever its size.

    Returns the per-layer report (also kept in ``model.moefx_info.healing``); with ``end_to_end``, followed by
    one entry for the model as a whole (``"layer": "(end to end)"``): the held-out objective before and after,
    the stages kept, and the distillation's report.
    """
    info = getattr(model, "moefx_info", None)
    if info is None:
        raise ConfigError("heal() needs a model converted by moefx.convert or loaded by moefx.load")
    if dense is None:
        spec = (info.source or {}).get("spec")
        if not spec:
            raise ConfigError("the dense model this was converted from is unknown (it was converted from a Python "
                              "object); pass it: heal(model, calib, dense=dense_model) or --dense MODEL")
        dense = load_source(spec, trust_remote_code=trust_remote_code).model
    _check_is_source(model, dense)
    analysis = find_ffns(dense, info.inputs, None)
    matches = {f.name: f.match for f in analysis.ffns}
    targets = {}
    for name, layer in moe_layers(model):
        if layer.source not in matches:
            raise ConfigError(f"{name}: its dense FFN {layer.source!r} is not in the dense model; pass the "
                              "model it was converted from")
        match, bank = matches[layer.source], layer.experts
        theirs = (match.activation, match.gated, match.in_features, match.out_features)
        if theirs != (bank.activation, bank.gated, bank.in_features, bank.out_features):
            raise ConfigError(f"{name}: its dense FFN {layer.source!r} is a {_describe(*theirs)} FFN in the dense "
                              f"model but was a {_describe(bank.activation, bank.gated, bank.in_features, bank.out_features)} "
                              "one when converted; pass the model it was converted from")
        targets[name] = match
    batches = calibration_batches(calib, model, info.inputs, tokenizer=tokenizer)
    seed = info.config.seed if seed is None else seed
    if not end_to_end:
        report = heal_layers(model, targets, batches, max_tokens=calib_tokens, seed=seed, steps=steps)
    else:
        report = _heal_end_to_end(model, dense, targets, batches, calib_tokens=calib_tokens, seed=seed, steps=steps,
                                  seconds=seconds, distill_steps=distill_steps, what=what, lr=lr)
    info.healing = report
    return report


def _heal_end_to_end(model: nn.Module, dense: nn.Module, targets: dict[str, FFNMatch], batches: Any, *,
                     calib_tokens: int, seed: int, steps: int, seconds: float | None, distill_steps: int | None,
                     what: str, lr: float | None) -> list[dict[str, Any]]:
    """Layer-wise healing, then distillation, on all but a held-out tenth of ``batches``; each stage is kept
    only if it brings the model's output on the held-out tenth closer to the dense model's."""
    train, held = hold_out(batches)
    judge = EndToEnd(dense, held)
    start = judge.error(model)
    saved = copy.deepcopy(_moe_state(model))
    layers = heal_layers(model, targets, train, max_tokens=calib_tokens, seed=seed, steps=steps)
    after = judge.error(model)
    kept = ["layer-wise"] if after < start else []
    if not kept:  # the layer-wise fit made the model worse end to end (a small sample, say): undo it
        model.load_state_dict(saved, strict=False)
    error = min(start, after)
    log.info("moefx: layer-wise healing, held-out %s %.5g -> %.5g: %s", judge.objective, start, after,
             "kept" if kept else "undone")
    entry: dict[str, Any] = {"layer": "(end to end)", "method": "layer-wise", "objective": judge.objective,
                             "error_before": start, "layer_wise_error": after}
    if (seconds is None or seconds > 0) and distill_steps != 0:
        entry["method"] = "layer-wise + distillation"
        result = distill(model, dense, train, held_out=held, seconds=seconds, steps=distill_steps, what=what, lr=lr,
                         seed=seed)
        entry["distillation"] = result
        if result["kept"]:
            kept.append("distillation")
            error = result["error_after"]
    entry.update(error_after=error, kept=kept)
    return [*layers, entry]


def _moe_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The MoE layers' tensors, by their names in ``model.state_dict()`` (all that healing changes)."""
    return {f"{name}.{key}": value for name, layer in moe_layers(model) for key, value in layer.state_dict().items()}


def _describe(activation: str, gated: bool, in_features: int, out_features: int) -> str:
    return f"{in_features}->{out_features} {'gated ' if gated else ''}{activation}"


def _check_is_source(model: nn.Module, dense: nn.Module) -> None:
    """Refuse a dense model that is not the one ``model`` was converted from: conversion copies every weight
    outside the FFNs, so the two share a dtype, and the weights both have (same name and shape) agree (to a
    relative 1e-3) except for a few: a checkpoint that lacks some weights (a classification head) gets them
    initialised at random on every load, so those may differ (a warning). If weights holding most of the
    compared elements differ, it is another model: fitting the experts to its FFNs would make them worse."""
    dtypes = [next((p.dtype for p in m.parameters() if p.is_floating_point()), None) for m in (model, dense)]
    if None not in dtypes and dtypes[0] != dtypes[1]:
        raise ConfigError(f"the dense model is in {str(dtypes[1]).removeprefix('torch.')} and the converted one in "
                          f"{str(dtypes[0]).removeprefix('torch.')}: pass the dense model in "
                          f"{str(dtypes[0]).removeprefix('torch.')} (from Python: dense.to({dtypes[0]}))")
    theirs = dict(dense.state_dict())
    compared = differing = 0
    differ: list[str] = []
    for name, mine in model.state_dict().items():
        other = theirs.get(name)
        if other is None or other.shape != mine.shape or not mine.is_floating_point() or mine.is_meta or other.is_meta:
            continue
        compared += mine.numel()
        other = other.detach().to(mine.dtype)
        if torch.equal(mine, other):
            continue
        a, b = mine.detach().double(), other.double()  # copies only of the weights that differ at all
        if float((a - b).norm()) > 1e-3 * float(b.norm()):
            differing += mine.numel()
            differ.append(name)
    if not compared:
        log.debug("heal: the dense model shares no weight outside the FFNs with the converted one; not checked")
    elif 2 * differing > compared:
        raise ConfigError(f"the dense model is not the one this model was converted from: its {differ[0]!r} and "
                          f"{len(differ) - 1} more of the weights outside the FFNs differ; pass the model it was "
                          "converted from (heal fits each MoE layer to that model's FFN)")
    elif differ:
        log.warning("moefx: warning: %d weight(s) of the dense model differ from the converted model's (%s%s; "
                    "initialised at random where its checkpoint lacks them?); healing fits its FFNs as they are",
                    len(differ), ", ".join(differ[:3]), ", ..." if len(differ) > 3 else "")


def heal_layers(model: nn.Module, dense: dict[str, FFNMatch], batches: Any, *, max_tokens: int = CALIB_TOKENS,
                seed: int = 0, steps: int = HEAL_STEPS, inputs: dict[str, torch.Tensor] | None = None,
                routers_fitted: bool = False) -> list[dict[str, Any]]:
    """Heal the MoE layers at the qualified names of ``dense`` (name -> its dense FFN), in place.

    ``inputs`` (name -> the layer's recorded dense inputs ``[N, H]``) skips the recording pass over ``batches``
    when the caller already has them (``convert`` does, from building split layers); ``routers_fitted`` says
    the split layers' routers were just fitted to their oracle on those very inputs: the least-squares stage
    keeps them instead of fitting them again.
    """
    if steps < 0:
        raise ConfigError(f"heal steps must be >= 0, got {steps}")
    if inputs is None:
        config = MoEConfig(seed=seed)
        targets = {name: (match, layer_generator(config, i, stream=4)) for i, (name, match) in enumerate(dense.items())}
        samples = record_ffns(model, targets, batches, max_tokens=max_tokens, desc="recording layer inputs")
        inputs = {name: sample.inputs for name, sample in samples.items()}
    for name in dense:
        check_rows(name, inputs[name])
    report = []
    with progress(total=len(dense), desc="healing", unit="layer") as bar:
        for name, match in dense.items():
            layer = model.get_submodule(name)
            report.append({"layer": name, **heal_layer(layer, match, inputs[name], steps, not routers_fitted)})
            bar.update(1)
    for entry in report:
        log.info("moefx: healed %s: relative error %.3g -> %.3g (%s)", entry["layer"], entry["error_before"],
                 entry["error_after"], entry["method"])
    return report


#: Rows a layer's sample needs: a tenth of them (at least one) is held out to judge each fit.
MIN_ROWS = 10


def check_rows(name: str, x: torch.Tensor) -> None:
    """One clear error where a layer's sample is too small to hold rows out (a fit would be judged on the rows
    it was fitted to, and always kept)."""
    if x.shape[0] < MIN_ROWS:
        raise CalibrationError(f"{name}: healing needs at least {MIN_ROWS} input rows per layer to hold a tenth out, "
                               f"got {x.shape[0]}; pass more calibration data or a larger --calib-tokens")


@torch.no_grad()
def heal_layer(layer: MoELayer, match: FFNMatch, x: torch.Tensor, steps: int, refit_router: bool) -> dict[str, Any]:
    """Fit one MoE layer to its dense FFN ``match`` on the layer's inputs ``x [N, H]`` (the module docstring's
    stages; ``refit_router``: refit a split layer's router first), in place; returns its report entry. The
    streamed conversion heals each layer this way as it builds it."""
    was_training = layer.training
    layer.eval()
    try:
        x = x.to(match.up_weight.dtype)
        y = _dense(match, x).float()
        val = torch.arange(x.shape[0]) % 10 == 9  # every tenth row held out (check_rows: there are >= 10)
        fit = ~val
        before = _error(layer, x[val], y[val])
        result = {"error_before": before, "tokens": int(x.shape[0])}
        if before <= EXACT:
            return {"method": "exact", **result, "error_after": before}
        split = getattr(layer.router, "unit_weights", False)
        stages = [("least-squares", functools.partial(_fit_split, refit_router=refit_router))] if split else []
        if steps:
            stages.append(("gradient", functools.partial(_refine_split if split else _fit_gradient, steps=steps)))
        best, kept = before, []
        for method, fit_stage in stages:
            saved = copy.deepcopy(layer.state_dict())
            fit_stage(layer, x[fit], y[fit])
            error = _error(layer, x[val], y[val])
            if error < best:
                best = error
                kept.append(method)
            else:
                layer.load_state_dict(saved)
        return {"method": " + ".join(method for method, _ in stages) or "none", **result, "error_after": best,
                "kept": kept}
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


def _fit_split(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3,
               refit_router: bool = True) -> None:
    """Refit the router (unless it was just fitted on these inputs), then the down projections and biases by
    least squares given its routing, with a small ridge (relative to each column's energy) towards their
    current values."""
    bank, k = layer.experts, layer.router.top_k
    hidden = [_hidden(bank, e, x) for e in range(bank.num_experts)]  # E x [N, Ie]
    if refit_router:
        mass = torch.stack([(h @ bank.w2[e].float().T).norm(dim=-1) for e, h in enumerate(hidden)], dim=1)  # [N, E]
        weight, bias = fit_router(x, oracle_choice(mass, k))
        gate = layer.router.gate
        gate.weight.copy_(weight.to(gate.weight.dtype))
        if gate.bias is not None:
            gate.bias.copy_(bias.to(gate.bias.dtype))
    mask = _routing_mask(layer, x)  # [N, E], the routing the layer will use
    columns = [h * mask[:, e:e + 1] for e, h in enumerate(hidden)]
    shared = layer.shared
    if shared is not None:
        columns.append(_hidden(shared, 0, x))
    columns += [mask, torch.ones(x.shape[0], 1, device=x.device)]
    features = torch.cat(columns, dim=1)  # [N, D]
    del columns, hidden
    # The current weights, in the order of the columns: the ridge pulls towards them, not towards zero.
    prior = [bank.w2[e].T for e in range(bank.num_experts)]
    prior += [shared.w2[0].T] if shared is not None else []
    prior += [bank.b2, layer.bias[None]]
    prior = torch.cat(prior).double()  # [D, O]
    # Products in float32 (the GEMM dominates), the solve in float64 on columns scaled to unit energy: the
    # hidden units' energy can be 1e-10 of the ones column's, and one shared ridge scale (set by the ones and
    # mask columns) pinned every expert's down projection to its prior. The ridge, relative to each column's
    # own energy, pulls towards the prior; a column no row reaches (an expert the sample never routes to)
    # keeps its prior.
    gram = (features.T @ features).double()
    energy = gram.diagonal()
    scale = torch.where(energy > 0, energy.clamp_min(1e-300).rsqrt(), torch.ones_like(energy))  # [D]
    gram = scale[:, None] * gram * scale[None, :] + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    rhs = scale[:, None] * (features.T @ y.float()).double() + ridge * prior / scale[:, None]
    solution = (scale[:, None] * torch.linalg.solve(gram, rhs)).float()  # [D, O]
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


def _routing_mask(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """``[N, E]`` 0/1: the experts the layer's router sends each row of ``x`` to."""
    chosen = layer.router(x, None).expert_index
    mask = torch.zeros(x.shape[0], layer.experts.num_experts, device=x.device)
    return mask.scatter_(1, chosen.clamp_min(0), (chosen >= 0).float())


def _masked_dense(bank: dict[str, torch.Tensor | None], activation: str, x: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """The bank's experts weighted 0/1 by ``mask [N, E]`` and summed, run as one dense FFN with masked hidden
    units: ``bank`` holds the :class:`ExpertBank` tensors by name."""
    w1, w2 = bank["w1"], bank["w2"]
    experts, size = w1.shape[:2]

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(experts * size, *t.shape[2:])

    h = ACTIVATIONS[activation](F.linear(x, flat(w1), flat(bank["b1"])))
    if bank["w3"] is not None:
        h = h * F.linear(x, flat(bank["w3"]), flat(bank["b3"]))
    h = (h.view(-1, experts, size) * mask[:, :, None]).view(-1, experts * size)
    out = F.linear(h, w2.permute(1, 0, 2).reshape(w2.shape[1], experts * size))
    return out if bank["b2"] is None else out + mask @ bank["b2"]


def _refine_split(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, steps: int = HEAL_STEPS, batch: int = 512,
                  lr: float = 0.035) -> None:
    """Adam on every expert weight of a split layer (up and down projections, biases, the shared expert and
    the layer bias) given its router's routing, in float32 whatever the layer's dtype.

    ``lr`` is relative to the root mean square of the layer's weights, so that one setting suits every
    model's scale; a cosine schedule takes it to zero.
    """
    names = ("w1", "b1", "w3", "b3", "w2", "b2")
    banks = [(layer.experts, _routing_mask(layer, x))]
    if layer.shared is not None:
        banks.append((layer.shared, torch.ones(x.shape[0], 1, device=x.device)))
    params = [{n: None if getattr(b, n) is None else getattr(b, n).detach().float().clone().requires_grad_()
               for n in names} for b, _ in banks]
    bias = layer.bias.detach().float().clone().requires_grad_()
    leaves = [t for p in params for t in p.values() if t is not None] + [bias]
    scale = torch.cat([p[n].detach().flatten() for p in params for n in ("w1", "w2")]).square().mean().sqrt()
    opt = torch.optim.Adam(leaves, lr=lr * float(scale), fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    x = x.float()
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
            out = bias + sum(_masked_dense(p, b.activation, x[rows], mask[rows]) for p, (b, mask) in zip(params, banks))
            loss = F.mse_loss(out, y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    for p, (b, _) in zip(params, banks):
        for n, t in p.items():
            if t is not None:
                getattr(b, n).copy_(t.detach().to(getattr(b, n).dtype))
    layer.bias.copy_(bias.detach().to(layer.bias.dtype))


def _fit_gradient(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, steps: int = HEAL_STEPS, batch: int = 1024,
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
