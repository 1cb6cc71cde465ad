"""Expert load statistics: what the planner and the simulator read.

:class:`LoadStats` holds, for ``L`` MoE layers of ``E`` experts each:

* ``loads [L, E]`` — assignments (token, expert) each expert processed (Soft MoE: slots);
* ``coselect [L, E, E]`` — how many tokens picked both expert i and expert j in the same layer (symmetric,
  zero diagonal; all zero for top-1 and Soft MoE);
* ``transitions [L-1, E, E]`` — how many (token, expert i in layer l, expert j in layer l+1) triples there
  were (layer pairs whose token counts differ, e.g. encoder -> decoder, stay zero);
* per layer ``tokens``, the bytes of one token sent to an expert (``dispatch_bytes``) and of one result sent
  back (``combine_bytes``), the bytes of one expert's weights (``expert_bytes``), and the bytes of the
  non-expert weights every device holds (``shared_bytes``).

:func:`record_stats` fills them with hooks on the routers of a converted model over calibration batches;
:func:`synthetic_stats` draws them from a Zipf load model with optional correlated co-selection (tokens of one
"topic" prefer the same cluster of experts in every layer), for scales this machine cannot run.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moefx.calibrate import Batch, run_calibration_batch
from moefx.calibrate import calibration_batches as moefx_calibration_batches
from moefx.capture import set_mode
from moefx.errors import MoefxError
from moefx.layers import moe_layers
from moefx.progress import progress

__all__ = ["LoadStats", "calibration_batches", "record_stats", "synthetic_stats"]


@dataclass
class LoadStats:
    """Expert load statistics of ``L`` MoE layers with ``E`` experts each (see the module docstring)."""

    layer_names: list[str]
    loads: np.ndarray  # [L, E]
    coselect: np.ndarray  # [L, E, E]
    transitions: np.ndarray  # [L-1, E, E]
    tokens: np.ndarray  # [L]
    dispatch_bytes: np.ndarray  # [L] bytes of one token sent to an expert
    combine_bytes: np.ndarray  # [L] bytes of one expert result sent back
    expert_bytes: np.ndarray  # [L] bytes of one expert's weights
    shared_bytes: int = 0  # non-expert weights (replicated on every device)
    router: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.loads.shape[1])

    def top_k(self, layer: int) -> float:
        """Mean assignments per token in ``layer`` (k for top-k routing)."""
        tokens = float(self.tokens[layer])
        return float(self.loads[layer].sum()) / tokens if tokens > 0 else 0.0

    def save(self, path: str | os.PathLike) -> None:
        np.savez_compressed(
            Path(path), loads=self.loads, coselect=self.coselect, transitions=self.transitions, tokens=self.tokens,
            dispatch_bytes=self.dispatch_bytes, combine_bytes=self.combine_bytes, expert_bytes=self.expert_bytes,
            shared_bytes=np.array(self.shared_bytes), layer_names=np.array(self.layer_names, dtype=str),
            router=np.array(self.router),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> LoadStats:
        try:
            data = np.load(Path(path), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MoefxError(f"{path}: not a moefx load-statistics file ({exc}); record one with moefx partition") from None
        return cls(
            layer_names=[str(n) for n in data["layer_names"]], loads=data["loads"], coselect=data["coselect"],
            transitions=data["transitions"], tokens=data["tokens"], dispatch_bytes=data["dispatch_bytes"],
            combine_bytes=data["combine_bytes"], expert_bytes=data["expert_bytes"],
            shared_bytes=int(data["shared_bytes"]), router=str(data["router"]),
        )


# ---------------------------------------------------------------------------------------------------------
# Recording from a converted model
# ---------------------------------------------------------------------------------------------------------


def _moe_layers(model: nn.Module):
    layers = moe_layers(model)
    if not layers:
        raise MoefxError("the model has no MoE layers; convert it with moefx convert first")
    return layers


def model_bytes(model: nn.Module) -> tuple[list[int], int]:
    """``(bytes of one expert per MoE layer, bytes of all non-expert parameters and buffers)``."""
    layers = _moe_layers(model)
    expert_ids = set()
    per_expert = []
    for _, layer in layers:
        total = 0
        for p in layer.experts.parameters():
            expert_ids.add(id(p))
            total += p.numel() * p.element_size()
        per_expert.append(total // max(layer.num_experts, 1))
    shared = 0
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in expert_ids or id(t) in seen:
            continue
        seen.add(id(t))
        shared += t.numel() * t.element_size()
    return per_expert, shared


def record_stats(model: nn.Module, batches: Iterable[tuple]) -> LoadStats:
    """Run ``model`` (eval, no grad) on each batch, ``(args, kwargs)`` or ``(args, kwargs, mask)`` as
    :func:`calibration_batches` gives them, and count expert loads.

    Hooks on each MoE layer's router read the routing of every call: token-choice routers give
    ``expert_index [T, k]`` (dropped assignments, ``-1``, are not counted, nor are padding tokens where the
    batch has a ``[batch, seq]`` mask of real tokens); Soft MoE counts slots (every expert processes
    ``groups * slots_per_expert`` slots; slots mix tokens, so co-selection and transitions stay zero).
    """
    layers = _moe_layers(model)
    names = [name for name, _ in layers]
    for name, layer in layers:
        if layer.experts.num_experts != layer.num_experts:
            raise MoefxError(f"{name}: its experts are low-rank adapters on one shared dense FFN (init='lora'), "
                             "not separate FFNs that devices can hold; run the model on one device")
    num_experts = {layer.num_experts for _, layer in layers}
    if len(num_experts) != 1:
        raise MoefxError(f"MoE layers with different expert counts {sorted(num_experts)} are not supported by the planner")
    (E,) = num_experts
    L = len(layers)
    loads = np.zeros((L, E))
    coselect = np.zeros((L, E, E))
    transitions = np.zeros((max(L - 1, 0), E, E))
    tokens = np.zeros(L)
    hidden = [0] * L
    out_features = [layer.experts.out_features for _, layer in layers]
    elem = [layer.experts.w1.element_size() for _, layer in layers]
    router_names = {layer.router.name for _, layer in layers}
    calls: list[tuple[int, torch.Tensor | None]] = []

    failures: list[BaseException] = []  # from the hooks themselves: a moefx bug, not the data's fault

    def hook_for(i: int):
        def hook(module, args, output) -> None:
            try:
                count_routing(i, args, output)
            except Exception as exc:
                failures.append(exc)
                raise

        return hook

    def count_routing(i: int, args, output) -> None:
        x = args[0]
        hidden[i] = int(x.shape[-1])
        if output.dispatch is not None:  # Soft MoE: slots per expert
            groups, _, num_slots = output.dispatch.shape
            loads[i] += groups * num_slots / E
            tokens[i] += x.shape[0]
            calls.append((i, None))
            return
        index = output.expert_index.detach().cpu().long()  # [T, k]
        if mask is not None and lead_shapes.get(i) == tuple(mask.shape):  # [batch, seq], not [seq, batch]
            index = index[mask.reshape(-1).bool().cpu()]  # real tokens only
        tokens[i] += index.shape[0]
        valid = index >= 0
        loads[i] += np.bincount(index[valid].numpy(), minlength=E)[:E]
        a, b = index.unsqueeze(2), index.unsqueeze(1)  # [T, k, 1], [T, 1, k]
        pair = (a >= 0) & (b >= 0) & (a != b)
        flat = (a * E + b).expand(-1, index.shape[1], -1)[pair]
        coselect[i] += np.bincount(flat.numpy(), minlength=E * E).reshape(E, E)
        calls.append((i, index))

    mask: torch.Tensor | None = None
    lead_shapes: dict[int, tuple[int, ...]] = {}  # each layer's input shape but its features, this call

    def lead_shape_for(i: int):
        def pre_hook(module, args) -> None:
            lead_shapes[i] = tuple(args[0].shape[:-1]) if args and isinstance(args[0], torch.Tensor) else ()

        return pre_hook

    handles = [layer.router.register_forward_hook(hook_for(i)) for i, (_, layer) in enumerate(layers)]
    handles += [layer.register_forward_pre_hook(lead_shape_for(i)) for i, (_, layer) in enumerate(layers)]
    was_training = model.training
    set_mode(model, False)
    what = getattr(batches, "what", "the calibration data")
    try:
        with torch.no_grad(), progress(total=getattr(batches, "size", None), desc="routing", unit="batch") as bar:
            count = 0
            for batch in batches:
                args, kwargs = batch[:2]
                mask = batch[2] if len(batch) > 2 else None
                calls.clear()
                try:
                    run_calibration_batch(model, args, kwargs, what, count)
                except MoefxError:
                    if failures:
                        raise failures[0] from None
                    raise
                _add_transitions(calls, transitions, E)
                count += 1
                bar.update(1)
            if not count:
                raise MoefxError("no calibration batches: pass --calib with at least one example")
    finally:
        for h in handles:
            h.remove()
        set_mode(model, was_training)
    per_expert, shared = model_bytes(model)
    return LoadStats(
        layer_names=names, loads=loads, coselect=coselect, transitions=transitions, tokens=tokens,
        dispatch_bytes=np.array([h * e for h, e in zip(hidden, elem)], dtype=np.int64),
        combine_bytes=np.array([o * e for o, e in zip(out_features, elem)], dtype=np.int64),
        expert_bytes=np.array(per_expert, dtype=np.int64), shared_bytes=shared, router=",".join(sorted(router_names)),
    )


def _add_transitions(calls: list[tuple[int, torch.Tensor | None]], transitions: np.ndarray, E: int) -> None:
    """Expert i in layer l -> expert j in layer l+1 counts, for consecutive calls that saw the same tokens."""
    for (i, a), (j, b) in itertools.pairwise(calls):
        if j != i + 1 or a is None or b is None or a.shape[0] != b.shape[0]:
            continue
        x, y = a.unsqueeze(2), b.unsqueeze(1)  # [T, ka, 1], [T, 1, kb]
        ok = (x >= 0) & (y >= 0)
        flat = (x * E + y)[ok]
        transitions[i] += np.bincount(flat.numpy(), minlength=E * E).reshape(E, E)


# ---------------------------------------------------------------------------------------------------------
# Calibration inputs
# ---------------------------------------------------------------------------------------------------------


def calibration_batches(
    model: nn.Module, calib: str | os.PathLike | None, *, batch_size: int = 8, seq_len: int = 64
) -> Iterable[Batch]:
    """Forward-pass batches ``(args, kwargs, mask)`` for :func:`record_stats`.

    ``calib`` is None (the example inputs recorded at conversion, ``model.moefx_info.inputs``) or a file that
    :func:`moefx.calibrate.calibration_batches` reads, with the same checks as ``convert --calib``: a tensor
    file (``.pt`` loaded with ``weights_only=True``, or ``.safetensors``; a tensor of examples, or a dict of
    them named like the model's inputs) or a ``.txt`` file, one example per line (cut to ``seq_len`` tokens),
    tokenized with the model's tokenizer when moefx finds one, else each word hashed into its vocabulary.
    """
    info = getattr(model, "moefx_info", None)
    recorded = getattr(info, "inputs", None)
    if calib is None:
        if recorded is None:
            raise MoefxError("the model has no recorded example inputs; pass --calib FILE (.pt, .safetensors or .txt)")
        return [(*recorded, None)]
    return moefx_calibration_batches(calib, model, recorded, batch_size=batch_size, max_length=seq_len)


# ---------------------------------------------------------------------------------------------------------
# Synthetic statistics
# ---------------------------------------------------------------------------------------------------------


def synthetic_stats(
    num_layers: int,
    num_experts: int,
    *,
    tokens: int = 8192,
    top_k: int = 2,
    zipf: float = 1.2,
    clusters: int = 0,
    cluster_boost: float = 8.0,
    hidden: int = 4096,
    expert_size: int = 1536,
    dtype_bytes: int = 2,
    seed: int = 0,
) -> LoadStats:
    """Sampled routing of ``tokens`` tokens through ``num_layers`` layers of ``num_experts`` experts.

    Expert popularity is Zipf(``zipf``) (expert of rank r gets weight ``r**-zipf``), shuffled per layer.
    With ``clusters > 0`` every layer's experts are split into that many random equal clusters and every
    token has a topic (fixed across layers) whose cluster's experts get ``cluster_boost`` times the weight:
    co-selected and chained experts are then correlated, as ExFlow observes in trained MoEs. Each token picks
    ``top_k`` distinct experts (Gumbel top-k sampling). Weight sizes are a gated FFN of ``hidden`` ->
    ``expert_size`` in ``dtype_bytes``-byte elements.
    """
    if top_k > num_experts:
        raise MoefxError(f"top_k={top_k} exceeds num_experts={num_experts}")
    rng = np.random.default_rng(seed)
    E, L, k = num_experts, num_layers, top_k
    base = np.arange(1, E + 1, dtype=np.float64) ** -zipf
    topic = rng.integers(0, clusters, size=tokens) if clusters > 0 else None
    loads = np.zeros((L, E))
    coselect = np.zeros((L, E, E))
    transitions = np.zeros((max(L - 1, 0), E, E))
    previous = None
    for layer in range(L):
        logw = np.log(rng.permutation(base))  # [E]
        logits = np.broadcast_to(logw, (tokens, E)).copy()  # [T, E]
        if topic is not None:
            member = rng.permutation(E) % clusters  # expert -> cluster
            logits += np.log(cluster_boost) * (member[None, :] == topic[:, None])
        logits += rng.gumbel(size=(tokens, E))
        index = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # [T, k] k distinct experts
        loads[layer] = np.bincount(index.ravel(), minlength=E)
        a, b = index[:, :, None], index[:, None, :]
        mask = np.broadcast_to(a != b, (tokens, k, k))
        flat = np.broadcast_to(a * E + b, (tokens, k, k))[mask]
        coselect[layer] = np.bincount(flat, minlength=E * E).reshape(E, E)
        if previous is not None:
            flat = (previous[:, :, None] * E + index[:, None, :]).ravel()
            transitions[layer - 1] = np.bincount(flat, minlength=E * E).reshape(E, E)
        previous = index
    gated_bytes = 3 * hidden * expert_size * dtype_bytes
    return LoadStats(
        layer_names=[f"layers.{i}.mlp" for i in range(L)], loads=loads, coselect=coselect, transitions=transitions,
        tokens=np.full(L, float(tokens)), dispatch_bytes=np.full(L, hidden * dtype_bytes, dtype=np.int64),
        combine_bytes=np.full(L, hidden * dtype_bytes, dtype=np.int64),
        expert_bytes=np.full(L, gated_bytes, dtype=np.int64), shared_bytes=0, router="synthetic",
        meta={"zipf": zipf, "top_k": k, "clusters": clusters, "seed": seed, "tokens": tokens},
    )

