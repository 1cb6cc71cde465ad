"""End-to-end healing: distil the dense model into the MoE model it was converted to, output to output.

Layer-wise healing (:mod:`moefx.heal`) fits each MoE layer to its dense FFN on the dense model's inputs, in
isolation; the errors it leaves compound through the layers, and a fit on a small sample can make the model
worse even when every layer's own error went down. Here the whole converted model is trained to reproduce
the dense model's output:

* The objective follows the model's output. Logits of a causal LM: KL(dense || moe) over the positions that
  predict a real next token (what perplexity sees); other logits: KL per position (or per row); a
  ``last_hidden_state`` (an encoder): 1 - cosine of the mean-pooled embeddings plus the mean squared error
  relative to the dense model's mean square; anything else: that relative error of the output.
* Only MoE parameters train: router gates, experts, shared experts and the layer bias (``what="experts"``),
  or rank-``lora_rank`` adapters on the stacked expert weights plus the router gates and layer biases
  (``what="lora"``), merged into the weights at the end. Attention, norms, embeddings and head are frozen:
  the conversion changed only the FFNs, and freezing the rest keeps a step cheap.
* A deterministic tenth of the calibration batches (at least one) is held out; the held-out objective is
  measured before training and every few steps, the best state is kept, and it is restored at the end. When
  no step beats the start, the start comes back bit for bit: distillation never makes the model worse on
  the held-out data.
* The dense model's targets are computed once per batch and cached: its final hidden states at the scored
  positions for logits (the frozen output head turns them into logits again, vocab-sized logits for every
  calibration token would not fit), its outputs otherwise.

Calibration data that is too small for the gains to carry over to new data gets one warning that says how
many tokens it has and about how many are needed. Given ``steps`` (not only ``seconds``) the result is
deterministic given the seed; a ``seconds`` budget stops by the clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .calibrate import Batch, batch_tokens, run_calibration_batch
from .errors import CalibrationError, ConfigError
from .evaluate import is_causal_lm
from .layers import MoELayer, moe_layers

__all__ = ["DISTILL_SECONDS", "EndToEnd", "distill", "hold_out", "tokens_needed"]

log = logging.getLogger("moefx")

#: Default wall-clock budget of :func:`distill` (seconds).
DISTILL_SECONDS = 300.0

#: Real tokens to train on below which gains may not carry over to new data, by what trains (measured on
#: all-MiniLM-L6-v2 and SmolLM2-135M: ~11k tokens healed well, ~1k only a little and only with LoRA).
_TRAIN_TOKENS = {"experts": 8192, "lora": 2048}
#: Held-out tokens below which the keep-best check is too noisy to select on reliably.
_HELD_OUT_TOKENS = 512
#: Default learning rates (AdamW) of the expert weights / LoRA adapters; router gates get _ROUTER_LR_MULT x.
_LR = {"experts": 1e-4, "lora": 1e-3}
_ROUTER_LR_MULT = 3.0
_WARMUP_STEPS = 5
_WHATS = ("auto", "experts", "lora")


def tokens_needed(what: str) -> int:
    """About how many real calibration tokens end-to-end healing of ``what`` needs for its gains to carry over
    to new data (training tokens and the held-out tenth together)."""
    return math.ceil(max(_TRAIN_TOKENS[what] / 0.9, _HELD_OUT_TOKENS / 0.1) / 256) * 256


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


def _main_tensor(batch: Batch) -> torch.Tensor | None:
    args, kwargs, _ = batch
    for value in (kwargs.get("input_ids"), *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value
    return None


def _rows(batch: Batch) -> int:
    mask = batch[2]
    if mask is not None:
        return int(mask.shape[0])
    main = _main_tensor(batch)
    return int(main.shape[0]) if main is not None else 1


def _slice_rows(batch: Batch, rows: slice) -> Batch:
    args, kwargs, mask = batch
    n = _rows(batch)

    def cut(value: Any) -> Any:
        return value[rows] if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n else value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}, None if mask is None else mask[rows]


def hold_out(batches: Iterable[Batch]) -> tuple[list[Batch], list[Batch]]:
    """``(train, held_out)``: every tenth batch (the 10th, 20th, ...) is held out, the last one when there are
    fewer than ten; a single batch is cut by rows (its last tenth, at least one row). Deterministic, and
    spread over the data (a text file is often ordered by topic)."""
    batches = list(batches)
    if not batches:
        raise CalibrationError("end-to-end healing got no calibration batches; pass calibration data")
    if len(batches) == 1:
        n = _rows(batches[0])
        if n < 2:
            raise CalibrationError("end-to-end healing needs at least 2 calibration examples (one is held out to "
                                   "check the model does not get worse), got 1; pass more calibration data")
        cut = n - max(1, n // 10)
        return [_slice_rows(batches[0], slice(0, cut))], [_slice_rows(batches[0], slice(cut, n))]
    held = [i for i in range(len(batches)) if i % 10 == 9] or [len(batches) - 1]
    return [b for i, b in enumerate(batches) if i not in held], [batches[i] for i in held]


# ---------------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------------


def _field(output: Any, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise ConfigError(f"end-to-end healing cannot compare model outputs of type {type(output).__name__}: it needs "
                      "a tensor, logits or a last_hidden_state")


def _objective_of(model: nn.Module, output: Any) -> str:
    logits = _field(output, "logits")
    if isinstance(logits, torch.Tensor):
        return "causal-kl" if is_causal_lm(model) and logits.dim() == 3 else "kl"
    if isinstance(_field(output, "last_hidden_state"), torch.Tensor):
        return "embedding"
    return "output"


def _positions(objective: str, mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``[batch, seq]`` bool: the positions scored (None: all). A causal LM's position t is scored when it and
    t + 1 are real tokens (it predicts a real token); the last position predicts nothing."""
    if len(shape) < 3:
        return None
    real = mask if mask is not None and tuple(mask.shape) == tuple(shape[:2]) else None
    if objective != "causal-kl":
        return real
    keep = torch.ones(shape[:2], dtype=torch.bool)
    keep[:, -1] = False
    if real is not None:
        keep[:, :-1] &= real[:, :-1] & real[:, 1:]
    return keep


def _scored(x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
    """``[N, D]`` rows of ``x [..., D]`` at the scored positions."""
    return x.reshape(-1, x.shape[-1]) if where is None else x[where.to(x.device)]


def _kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || student) over rows of ``[N, V]`` logits."""
    t = torch.log_softmax(target_logits.float(), dim=-1)
    s = torch.log_softmax(logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _relative_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (x.float() - target).square().sum() / target.square().sum().clamp_min(1e-30)


def _mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or tuple(mask.shape) != tuple(h.shape[:2]):
        return h.mean(1)
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


class EndToEnd:
    """The dense model's outputs on fixed batches, cached, and the objective that compares a model's to them.

    ``error(model)`` is the token-weighted mean objective over ``batches`` (lower is better, 0 = the dense
    model); ``loss(model, i)`` the differentiable objective on batch ``i``. The objective is chosen from the
    dense model's output (the module docstring).
    """

    def __init__(self, dense: nn.Module, batches: list[Batch], *, what: str = "end-to-end healing") -> None:
        if not batches:
            raise CalibrationError(f"{what}: no batches")
        self.dense, self.batches, self.what = dense, batches, what
        self._cache: dict[int, torch.Tensor] = {}
        self._head = None
        self.objective = ""
        self.recompute = False  # the head does not turn the cached hidden states into the logits: rerun the model
        self._target(0)

    @torch.no_grad()
    def _target(self, i: int) -> torch.Tensor:
        if i in self._cache:
            cached = self._cache[i]
            return self._head(cached).float() if self.objective.endswith("kl") and not self.recompute else cached
        args, kwargs, mask = self.batches[i]
        was_training = self.dense.training
        self.dense.eval()
        seen: list[torch.Tensor] = []
        head = self._head_module()
        hook = head.register_forward_hook(lambda m, a, o: seen.append(a[0])) if head is not None else None
        try:
            out = run_calibration_batch(self.dense, args, kwargs, self.what, i)
        finally:
            if hook is not None:
                hook.remove()
            self.dense.train(was_training)
        if not self.objective:
            self.objective = _objective_of(self.dense, out)
        if self.objective.endswith("kl"):
            logits = _field(out, "logits")
            where = _positions(self.objective, mask, logits.shape)
            target = _scored(logits, where).float()
            if not self.recompute:
                if len(seen) == 1 and seen[0].shape[:-1] == logits.shape[:-1]:
                    hidden = _scored(seen[0], where)
                    if i == 0 and not torch.allclose(head(hidden).float(), target, rtol=1e-4, atol=1e-4):
                        self.recompute = True
                else:
                    self.recompute = True
                if not self.recompute:
                    self._head = head
                    self._cache[i] = hidden.detach()
            return target
        target = _field(out, "last_hidden_state") if self.objective == "embedding" else _first_tensor(out)
        self._cache[i] = target.detach().float()
        return self._cache[i]

    def _head_module(self) -> nn.Module | None:
        getter = getattr(self.dense, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        return head if isinstance(head, nn.Module) else None

    def loss(self, model: nn.Module, i: int) -> torch.Tensor:
        """The objective of ``model`` on batch ``i`` (differentiable when grad is enabled)."""
        args, kwargs, mask = self.batches[i]
        target = self._target(i)
        out = run_calibration_batch(model, args, kwargs, self.what, i)
        if self.objective.endswith("kl"):
            logits = _field(out, "logits")
            return _kl(target, _scored(logits, _positions(self.objective, mask, logits.shape)))
        if self.objective == "embedding":
            h = _field(out, "last_hidden_state")
            where = mask if mask is not None and tuple(mask.shape) == tuple(h.shape[:2]) else None
            cos = F.cosine_similarity(_mean_pool(h.float(), mask), _mean_pool(target, mask), dim=-1).mean()
            return (1 - cos) + _relative_mse(_scored(h, where), _scored(target, where))
        y = _first_tensor(out)
        where = mask if y.dim() >= 3 and mask is not None and tuple(mask.shape) == tuple(y.shape[:2]) else None
        return _relative_mse(_scored(y, where), _scored(target, where))

    @torch.no_grad()
    def error(self, model: nn.Module) -> float:
        """The objective over every batch, weighted by each batch's real tokens."""
        was_training = model.training
        model.eval()
        try:
            total = weight = 0.0
            for i, batch in enumerate(self.batches):
                n = batch_tokens(batch)
                total += float(self.loss(model, i)) * n
                weight += n
        finally:
            model.train(was_training)
        return total / weight


# ---------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------


class _LowRankDelta(nn.Module):
    """``W + scale * B @ A`` for a stacked expert weight ``W [E, O, I]``, ``B`` zero at the start (so the
    parametrized weight is ``W`` until the first step)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        experts, rows, cols = weight.shape
        a = torch.randn(experts, rank, cols, generator=generator) / math.sqrt(cols)
        self.A = nn.Parameter(a.to(weight.dtype))
        self.B = nn.Parameter(torch.zeros(experts, rows, rank, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * torch.bmm(self.B, self.A)


@dataclass
class _Trainable:
    experts: list[nn.Parameter]
    routers: list[nn.Parameter]
    adapted: list[tuple[nn.Module, str]]  # (bank, weight name) with a low-rank parametrization

    @property
    def params(self) -> list[nn.Parameter]:
        return self.experts + self.routers


def _trainable(layers: list[MoELayer], what: str, rank: int, alpha: float, seed: int) -> _Trainable:
    generator = torch.Generator().manual_seed(seed)
    experts: list[nn.Parameter] = []
    routers: list[nn.Parameter] = []
    adapted: list[tuple[nn.Module, str]] = []
    for layer in layers:
        gate = getattr(layer.router, "gate", None)
        if isinstance(gate, nn.Module):
            routers += [p for p in gate.parameters() if p.is_floating_point()]
        if layer.bias is not None:
            experts.append(layer.bias)
        banks = [layer.experts] + ([layer.shared] if layer.shared is not None else [])
        for bank in banks:
            if what == "experts":
                experts += [p for p in bank.parameters()]
                continue
            for name in ("w1", "w3", "w2"):
                weight = getattr(bank, name)
                if weight is None:
                    continue
                delta = _LowRankDelta(weight.detach(), rank, alpha, generator)
                parametrize.register_parametrization(bank, name, delta)
                adapted.append((bank, name))
                experts += [delta.A, delta.B]
    return _Trainable(experts, routers, adapted)


def _merge(adapted: list[tuple[nn.Module, str]], keep: bool) -> None:
    """Remove the low-rank parametrizations: with ``keep``, leave the adapted weights; else the originals."""
    for bank, name in adapted:
        parametrize.remove_parametrizations(bank, name, leave_parametrized=keep)


# ---------------------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------------------


def distill(
    model: nn.Module,
    dense: nn.Module,
    batches: Iterable[Batch],
    *,
    held_out: list[Batch] | None = None,
    seconds: float | None = DISTILL_SECONDS,
    steps: int | None = None,
    what: str = "auto",
    lr: float | None = None,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    eval_every: int | None = None,
    patience: int | None = 5,
    seed: int = 0,
    log_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model``'s MoE parameters to reproduce ``dense``'s output on calibration ``batches``, in place.

    Args:
        model: a converted model (its MoE layers train; everything else stays frozen and unchanged).
        dense: the dense model it was converted from (the teacher; not modified).
        batches: calibration batches ``(args, kwargs, mask)`` (:func:`moefx.calibrate.calibration_batches`).
        held_out: batches to judge the states on; by default :func:`hold_out` takes a tenth of ``batches``.
        seconds: wall-clock budget (dense targets, steps and held-out checks); None: no limit (give ``steps``).
        steps: at most this many optimizer steps (one batch each); with it the result depends only on the data
            and ``seed``, unless ``seconds`` runs out first.
        what: ``"experts"`` (router gates, every expert weight, shared experts, layer biases), ``"lora"``
            (rank-``lora_rank`` adapters on the expert weights, merged back at the end, plus router gates and
            layer biases) or ``"auto"``: ``"lora"`` when the data is below what ``"experts"`` needs, else
            ``"experts"``.
        lr: AdamW learning rate (default 1e-4 for experts, 1e-3 for LoRA adapters); router gates get 3x.
        eval_every: steps between held-out checks (default: so that checks cost about a fifth of training).
        patience: stop after this many checks without a better held-out objective (None: use the budget).
        seed: of the batch order and the LoRA initialisation.
        log_step: called with a line per held-out check (progress); None: log it (info).

    Returns a report: ``objective``, ``what``, ``error_before``/``error_after`` (held-out objective),
    ``kept`` (whether a trained state beat the start), ``steps``, ``best_step``, ``seconds``, token counts and
    ``warnings``.
    """
    start_time = time.perf_counter()
    if what not in _WHATS:
        raise ConfigError(f"unknown what={what!r}; choose one of {', '.join(_WHATS)}")
    if steps is not None and steps < 0:
        raise ConfigError(f"distillation steps must be >= 0, got {steps}")
    if seconds is None and steps is None:
        raise ConfigError("give distillation a budget: seconds=... or steps=...")
    if seconds is not None and seconds < 0:
        raise ConfigError(f"distillation seconds must be >= 0, got {seconds}")
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ConfigError("the model has no MoE layers; distill a model converted by moefx.convert")
    say = log_step or (lambda line: log.info("moefx: %s", line))
    train, held = (list(batches), list(held_out)) if held_out is not None else hold_out(batches)
    if not train:
        raise CalibrationError("end-to-end healing has no calibration batches left to train on")
    train_tokens, held_tokens = sum(map(batch_tokens, train)), sum(map(batch_tokens, held))
    total_tokens = train_tokens + held_tokens
    if what == "auto":
        what = "lora" if train_tokens < _TRAIN_TOKENS["experts"] else "experts"
    report: dict[str, Any] = {"what": what, "train_tokens": train_tokens, "held_out_tokens": held_tokens,
                              "warnings": []}
    if train_tokens < _TRAIN_TOKENS[what] or held_tokens < _HELD_OUT_TOKENS:
        examples = sum(map(_rows, train)) + sum(map(_rows, held))
        need = tokens_needed(what)
        per_example = total_tokens / max(1, examples)
        message = (f"calibration data is small for end-to-end healing: {total_tokens} tokens ({examples} examples, "
                   f"{held_tokens} tokens held out); healing what={what!r} needs about {need} tokens (about "
                   f"{math.ceil(need / per_example)} examples like these) for its gains to carry over to new data; "
                   "the held-out check still keeps the model from getting worse on the held-out part")
        log.warning("moefx: warning: %s", message)
        report["warnings"].append(message)

    was_training = model.training
    model.eval()  # no dropout: the dense targets are computed without it
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    teacher_train = EndToEnd(dense, train)
    teacher_held = EndToEnd(dense, held)
    trainable = _trainable(layers, what, lora_rank, lora_alpha, seed)
    params = trainable.params
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params]
    best_state: list[torch.Tensor] | None = None
    step = best_step = checked = 0
    try:
        before = best = teacher_held.error(model)
        report.update(objective=teacher_held.objective, error_before=before, trainable=sum(p.numel() for p in params))
        say(f"end-to-end healing: held-out {teacher_held.objective} {before:.5g} at the start ({what}, "
            f"{report['trainable'] / 1e6:.2f}M parameters, {train_tokens} tokens to train on)")
        base = lr if lr is not None else _LR[what]
        groups = [{"params": trainable.experts, "lr": base}]
        if trainable.routers:
            groups.append({"params": trainable.routers, "lr": base * _ROUTER_LR_MULT})
        base_lrs = [g["lr"] for g in groups]
        # No weight decay: it would pull pretrained weights towards zero, away from the function to reproduce.
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.99))
        check_every = eval_every or max(5, math.ceil(2 * len(held)))
        check_seconds = time.perf_counter() - start_time  # a bound: the first check also ran the dense model
        step_seconds = 0.0
        since_best = epoch = 0
        done = steps == 0
        while not done:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
            for i in order.tolist():
                now = time.perf_counter() - start_time
                if steps is not None and step >= steps:
                    done = True
                    break
                if seconds is not None and now + step_seconds + check_seconds > seconds:
                    done = True
                    break
                # Warmup, then a cosine to a tenth: over the steps when given, else over the clock.
                progress = step / steps if steps else now / seconds if seconds else 0.0
                scale = min(1.0, (step + 1) / _WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))
                for group, lr0 in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr0 * scale
                tick = time.perf_counter()
                loss = teacher_train.loss(model, i)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                step += 1
                step_seconds = time.perf_counter() - tick
                if step % check_every and not (steps is not None and step >= steps):
                    continue
                tick = time.perf_counter()
                error = teacher_held.error(model)
                check_seconds = time.perf_counter() - tick
                checked = step
                better = error < best
                if better:
                    best, best_step, since_best = error, step, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    since_best += 1
                say(f"end-to-end healing: step {step}, {time.perf_counter() - start_time:.0f} s: train {loss.item():.5g}, "
                    f"held-out {error:.5g}{' (best)' if better else ''}")
                if patience is not None and since_best >= patience:
                    done = True
                    break
            epoch += 1
        if step > checked:
            error = teacher_held.error(model)  # the steps since the last check
            if error < best:
                best, best_step, best_state = error, step, [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, saved in zip(params, best_state if best_state is not None else start):
                p.copy_(saved)
        # Without a better state the original weights come back as they were (W + 0 * B @ A may flip a -0.0).
        _merge(trainable.adapted, keep=best_state is not None)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, False))
        model.train(was_training)
    report.update(error_after=best, kept=best_state is not None, steps=step, best_step=best_step,
                  seconds=round(time.perf_counter() - start_time, 3))
    log.info("moefx: end-to-end healing: held-out %s %.5g -> %.5g (%s, best of %d steps at %d, %.0f s)",
             report["objective"], before, best, "kept" if report["kept"] else "start kept", step, best_step,
             report["seconds"])
    return report
