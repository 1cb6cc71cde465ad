"""Quality of a conversion: the converted model against the dense one, on the user's own data.

:func:`evaluate` runs evaluation batches (read and checked as calibration data is, see
:func:`moefx.calibrate.calibration_batches`) through both models and compares them:

* end to end, by what the model outputs: a causal LM's perplexity on the data (dense, converted, and their
  ratio, over real next-token predictions only); for any model with logits, the mean KL divergence
  ``KL(dense || converted)`` of the next-token (or class) distributions and how often their top-1 agree; for an
  encoder, the mean cosine similarity of the mean-pooled embeddings (as sentence encoders pool) and of the
  per-token outputs;
* per MoE layer, on the inputs the layer gets inside the converted model: the relative squared error of its
  output against its dense FFN on the same inputs, and their mean cosine similarity.

Padding tokens are left out everywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import find_ffns
from .calibrate import Batch, calibration_batches, ffn_forward, real_tokens, run_calibration_batch
from .capture import set_mode
from .errors import CalibrationError, ConfigError
from .layers import moe_layers
from .sources import load_dense_source

__all__ = ["EVAL_TOKENS", "MIN_TOKENS", "Evaluation", "evaluate", "evaluate_batches", "is_causal_lm", "main_output"]

#: By default evaluation stops after this many compared tokens: enough for a perplexity ratio steady to about
#: a percent, seconds to minutes on a CPU.
EVAL_TOKENS = 16384

#: Fewer real tokens than this cannot say anything about a model's quality: one clear error.
MIN_TOKENS = 32


@dataclass
class Evaluation:
    """What :func:`evaluate` measured. ``metrics`` holds the end-to-end figures by name (see
    :data:`DESCRIPTIONS`), ``layers`` one entry per MoE layer."""

    kind: str  # "causal-lm", "logits", "encoder" or "output"
    tokens: int
    batches: int
    metrics: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": self.tokens, "batches": self.batches, "metrics": dict(self.metrics),
                "layers": [dict(d) for d in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(d["kind"], d["tokens"], d["batches"], dict(d["metrics"]), [dict(x) for x in d["layers"]])

    @property
    def headline(self) -> tuple[str, float] | None:
        """The figure that says most about this kind of model: ``(name, value)``."""
        for name in ("perplexity_ratio", "embedding_cosine", "kl", "output_cosine"):
            if name in self.metrics:
                return name, self.metrics[name]
        return None

    def render(self) -> str:
        lines = [f"quality on {self.tokens} tokens ({self.batches} batches), {self.kind}:"]
        for name, value in self.metrics.items():
            lines.append(f"  {DESCRIPTIONS.get(name, name):<44} {_fmt(value)}")
        if self.layers:
            lines.append("  per MoE layer (on its inputs in the converted model):")
            width = max(len(d["layer"]) for d in self.layers)
            lines.append(f"    {'layer':<{width}}  relative error  cosine")
            for d in self.layers:
                lines.append(f"    {d['layer']:<{width}}  {d['relative_error']:>14.4g}  {d['cosine']:.4f}")
        return "\n".join(lines)


DESCRIPTIONS = {
    "perplexity_dense": "perplexity, dense model",
    "perplexity_moe": "perplexity, converted model",
    "perplexity_ratio": "perplexity ratio (converted / dense)",
    "kl": "KL(dense || converted), nats per token",
    "top1_agreement": "top-1 agreement",
    "embedding_cosine": "mean-pooled embedding cosine",
    "output_cosine": "per-token output cosine",
    "relative_error": "relative squared error of the output",
}


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"


def main_output(out: Any) -> tuple[str, torch.Tensor]:
    """``(kind, tensor)`` of a forward pass's output: ``logits``, a ``last_hidden_state`` (``hidden``), or the
    first tensor of a tensor or tuple (``output``)."""
    for name, kind in (("logits", "logits"), ("last_hidden_state", "hidden")):
        value = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if isinstance(value, torch.Tensor):
            return kind, value
    if isinstance(out, torch.Tensor):
        return "output", out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return "output", out[0]
    raise CalibrationError(f"the model returns {type(out).__name__}, which holds no logits, hidden states or "
                           "tensor to compare")


def is_causal_lm(model: nn.Module) -> bool:
    """A next-token predictor (a Hugging Face ``...ForCausalLM`` or ``...LMHeadModel``): its logits at position t
    predict token t + 1, so a perplexity is defined."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None


class _Totals:
    """Running sums of the end-to-end figures over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, total: float, count: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + count

    def mean(self, name: str) -> float:
        return self.sums[name] / max(self.counts[name], 1)


def _compare_logits(totals: _Totals, dense: torch.Tensor, moe: torch.Tensor, valid: torch.Tensor,
                    labels: torch.Tensor | None) -> int:
    """KL, top-1 agreement and (with ``labels``) each model's negative log-likelihood over the ``valid``
    positions of logits ``[..., V]``; returns how many positions were compared."""
    d, m = dense[valid].float(), moe[valid].float()  # [n, V]
    n = d.shape[0]
    if not n:
        return 0
    log_d, log_m = F.log_softmax(d, -1), F.log_softmax(m, -1)
    totals.add("kl", float((log_d.exp() * (log_d - log_m)).sum()), n)
    totals.add("top1_agreement", float((d.argmax(-1) == m.argmax(-1)).sum()), n)
    if labels is not None:
        target = labels[valid]
        totals.add("nll_dense", float(F.nll_loss(log_d, target, reduction="sum")), n)
        totals.add("nll_moe", float(F.nll_loss(log_m, target, reduction="sum")), n)
    return n


def _compare_hidden(totals: _Totals, dense: torch.Tensor, moe: torch.Tensor, mask: torch.Tensor | None,
                    pooled: bool) -> int:
    """Per-token cosine (and, for ``[batch, seq, H]`` outputs of an encoder, the mean-pooled embeddings'
    cosine) over real tokens; returns how many tokens were compared."""
    d, m = dense.float(), moe.float()
    if mask is not None and tuple(d.shape[:2]) == tuple(mask.shape):
        keep = mask.to(torch.bool)
    else:
        keep = torch.ones(d.shape[:-1], dtype=torch.bool)
    rows_d, rows_m = d[keep], m[keep]  # [n, H]
    totals.add("output_cosine", float(F.cosine_similarity(rows_d, rows_m, dim=-1).sum()), rows_d.shape[0])
    err = float((rows_m - rows_d).square().sum())
    totals.add("err", err, 0)
    totals.add("ref", float(rows_d.square().sum()), 0)
    if pooled and d.dim() == 3:
        w = keep.unsqueeze(-1).to(d.dtype)
        pool_d, pool_m = (d * w).sum(1) / w.sum(1).clamp_min(1), (m * w).sum(1) / w.sum(1).clamp_min(1)
        totals.add("embedding_cosine", float(F.cosine_similarity(pool_d, pool_m, dim=-1).sum()), d.shape[0])
    return rows_d.shape[0]


class _LayerErrors:
    """Forward hooks on a converted model's MoE layers: each layer's output against its dense FFN on the same
    inputs (the layer's real tokens only), summed over the batches."""

    def __init__(self, layers: list[tuple[str, nn.Module]], ffns: dict[str, Any]) -> None:
        self.mask: torch.Tensor | None = None
        self.sums = {name: [0.0, 0.0, 0.0, 0] for name, _ in layers}  # error, reference, cosine sum, rows
        self.handles = [layer.register_forward_hook(self._hook(name, ffns[name])) for name, layer in layers
                        if name in ffns]

    def _hook(self, name: str, ffn: Any):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = real_tokens(args[0], self.mask).float()
            y = real_tokens(output, self.mask).float()
            ref = ffn(x).float()
            s = self.sums[name]
            s[0] += float((y - ref).square().sum())
            s[1] += float(ref.square().sum())
            s[2] += float(F.cosine_similarity(y, ref, dim=-1).sum())
            s[3] += x.shape[0]
        return hook

    def remove(self) -> list[dict[str, Any]]:
        for handle in self.handles:
            handle.remove()
        return [{"layer": name, "relative_error": s[0] / max(s[1], 1e-30), "cosine": s[2] / max(s[3], 1),
                 "tokens": s[3]} for name, s in self.sums.items() if s[3]]


@torch.no_grad()
def evaluate_batches(model: nn.Module, dense: nn.Module, batches: Iterable[Batch], *,
                     ffns: dict[str, Any] | None = None, max_tokens: int | None = None,
                     what: str = "the evaluation data", min_tokens: int = MIN_TOKENS) -> Evaluation:
    """Compare ``model`` with ``dense`` on ``batches`` (see the module docstring); ``ffns`` maps the qualified
    name of each MoE layer of ``model`` to a callable computing its dense FFN (per-layer figures)."""
    causal = is_causal_lm(model)
    totals, kind, tokens, count = _Totals(), None, 0, 0
    states = [(m, m.training) for m in (model, dense)]
    for m, _ in states:
        set_mode(m, False)
    layers = _LayerErrors(moe_layers(model), ffns or {})
    try:
        for index, (args, kwargs, mask) in enumerate(batches):
            out_d = main_output(run_calibration_batch(dense, args, kwargs, what, index))
            layers.mask = mask
            out_m = main_output(run_calibration_batch(model, args, kwargs, what, index))
            kind = kind or out_d[0]
            d, m = out_d[1], out_m[1]
            if d.shape != m.shape:
                raise CalibrationError(f"{what}: batch {index}: the converted model's output has shape "
                                       f"{tuple(m.shape)}, the dense model's {tuple(d.shape)}")
            if kind == "logits":
                ids = _input_ids(args, kwargs)
                if causal and ids is not None and d.dim() == 3 and ids.shape == d.shape[:2]:
                    real = mask.to(torch.bool) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
                    valid = real[:, :-1] & real[:, 1:]  # position t predicts token t + 1
                    labels = torch.zeros_like(ids[:, :-1])
                    labels[valid] = ids[:, 1:][valid]
                    tokens += _compare_logits(totals, d[:, :-1], m[:, :-1], valid, labels)
                else:
                    if mask is not None and d.dim() == 3 and tuple(d.shape[:2]) == tuple(mask.shape):
                        valid = mask.to(torch.bool)
                    else:
                        valid = torch.ones(d.shape[:-1], dtype=torch.bool)
                    tokens += _compare_logits(totals, d, m, valid, None)
            else:
                tokens += _compare_hidden(totals, d, m, mask, pooled=kind == "hidden")
            count += 1
            if max_tokens is not None and tokens >= max_tokens:
                break
    finally:
        per_layer = layers.remove()
        for m, training in states:
            set_mode(m, training)
    if count == 0:
        raise CalibrationError(f"{what} holds no batches; give at least one example")
    if tokens < min_tokens:
        raise CalibrationError(f"{what} has {tokens} token{'s' if tokens != 1 else ''} to compare, too few to "
                               f"evaluate on; give at least {min_tokens} (a few thousand for steady figures)")
    metrics: dict[str, float] = {}
    if "nll_dense" in totals.sums:
        metrics["perplexity_dense"] = math.exp(totals.mean("nll_dense"))
        metrics["perplexity_moe"] = math.exp(totals.mean("nll_moe"))
        metrics["perplexity_ratio"] = metrics["perplexity_moe"] / metrics["perplexity_dense"]
    if "kl" in totals.sums:
        metrics["kl"] = totals.mean("kl")
        metrics["top1_agreement"] = totals.mean("top1_agreement")
    if "embedding_cosine" in totals.sums:
        metrics["embedding_cosine"] = totals.mean("embedding_cosine")
    if "output_cosine" in totals.sums:
        metrics["output_cosine"] = totals.mean("output_cosine")
        metrics["relative_error"] = totals.sums["err"] / max(totals.sums["ref"], 1e-30)
    if "kl" in metrics:
        metrics["kl"] = max(metrics["kl"], 0.0)  # float rounding can make a zero KL come out at -1e-9
    kind = "causal-lm" if "nll_dense" in totals.sums else {"hidden": "encoder"}.get(kind, kind)
    return Evaluation(kind, tokens, count, metrics, per_layer)


def evaluate(model: nn.Module, data: Any, *, dense: nn.Module | None = None, tokenizer: Any = None,
             max_tokens: int | None = EVAL_TOKENS, trust_remote_code: bool = False) -> Evaluation:
    """How much quality the conversion of ``model`` costs, measured on ``data`` against the dense model.

    Args:
        model: a model returned by :func:`moefx.convert` or :func:`moefx.load`.
        data: evaluation data, in any form calibration data takes (a ``.txt`` file, one example per line; a
            ``.pt``/``.safetensors`` tensor or dict; a tensor, dict or iterable of batches). Use other data than
            the calibration data: figures on the data a conversion was fitted to flatter it.
        dense: the dense model it was converted from; by default loaded again from the recorded source
            (``trust_remote_code`` as for :func:`moefx.load`).
        tokenizer: for a text file (default: the model's own, if found).
        max_tokens: stop after the batch that reaches this many compared tokens (None: all of the data).

    Returns an :class:`Evaluation`; ``print(evaluation.render())`` shows it as a table.
    """
    info = getattr(model, "moefx_info", None)
    if info is None:
        raise ConfigError("evaluate() needs a model converted by moefx.convert or loaded by moefx.load")
    if dense is None:
        dense = load_dense_source(info.source, how="evaluate(model, data, dense=dense_model) or --dense MODEL",
                                  trust_remote_code=trust_remote_code)
    matches = {f.name: f.match for f in find_ffns(dense, info.inputs, None).ffns}
    ffns = {name: functools.partial(ffn_forward, matches[layer.source]) for name, layer in moe_layers(model)
            if layer.source in matches}
    batches = calibration_batches(data, model, info.inputs, tokenizer=tokenizer, role="evaluation")
    return evaluate_batches(model, dense, batches, ffns=ffns, max_tokens=max_tokens)
