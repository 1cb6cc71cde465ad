"""Predicted per-device load and all-to-all traffic of a placement plan, from load statistics.

No model and no processes: a plan for 64 layers x 256 experts on 256 devices is simulated in seconds from
recorded or synthetic :class:`~moefx.placement.stats.LoadStats`.

The model, per layer, with ``f[e, d]`` the fraction of expert e's tokens served by device d (replicas
share an expert's tokens evenly):

* device load ``load[d] = sum_e loads[e] * f[e, d]``; balance = mean / max (1.0 is perfect).
* each token sends **one copy per destination device** (the moefx runtime dedupes: a device runs all its
  experts a token picked and returns one partial sum), so the tokens device d receives are
  ``load[d] - sum_{i<j} coselect[i, j] f[i, d] f[j, d]`` (exact for top-2; for k > 2 the pair correction
  is the Bonferroni bound).
* ``home="data-parallel"`` (what the moefx runtime does): a token lives on a uniformly random device, so a
  fraction ``(D-1)/D`` of those copies cross devices; co-locating co-selected experts is what saves bytes.
* ``home="chained"`` (ExFlow): a token stays on the device that ran its experts in the previous layer, so
  the copy from layer l's expert i to layer l+1's expert j is remote unless both are on one device; read
  from the transition counts. Layers without transition counts fall back to data-parallel.

Bytes = copies x (``dispatch_bytes`` + ``combine_bytes``): the token there and its result back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .stats import LoadStats

__all__ = ["Placement", "SimulationResult", "expert_fractions", "simulate"]


class Placement(Protocol):
    """What :func:`simulate` reads of a plan (:class:`~moefx.placement.planner.Plan` is one): the simulator
    sits below the planner that calls it and knows nothing else of it."""

    num_devices: int
    layers: list[list[list[int]]]  # [layer][device] -> the logical experts that device holds


@dataclass
class SimulationResult:
    device_load: np.ndarray  # [L, D] assignments per device
    balance: np.ndarray  # [L] mean / max device load
    device_bytes: np.ndarray  # [L, D] all-to-all bytes each device receives (dispatch) and sends (combine)
    a2a_bytes: np.ndarray  # [L] total all-to-all bytes of the layer
    home: str

    def summary(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "balance_mean": float(self.balance.mean()) if self.balance.size else 1.0,
            "balance_min": float(self.balance.min()) if self.balance.size else 1.0,
            "max_device_load": float(self.device_load.max()) if self.device_load.size else 0.0,
            "a2a_bytes": float(self.a2a_bytes.sum()),
        }


def expert_fractions(devices: list[list[int]], num_experts: int) -> np.ndarray:
    """``f [E, D]``: the fraction of expert e's tokens device d serves (replicas split evenly)."""
    f = np.zeros((num_experts, len(devices)))
    for d, experts in enumerate(devices):
        for e in experts:
            f[e, d] += 1.0
    counts = f.sum(1, keepdims=True)
    return f / np.maximum(counts, 1.0)


def simulate(plan: Placement, stats: LoadStats, *, home: str = "data-parallel") -> SimulationResult:
    """Per-device load and all-to-all bytes of ``plan`` under ``stats`` (see the module docstring)."""
    if home not in ("data-parallel", "chained"):
        raise ValueError(f"home must be 'data-parallel' or 'chained', not {home!r}")
    L, D, E = stats.num_layers, plan.num_devices, stats.num_experts
    device_load = np.zeros((L, D))
    device_bytes = np.zeros((L, D))
    fractions = [expert_fractions(plan.layers[layer], E) for layer in range(L)]
    for layer in range(L):
        f = fractions[layer]
        loads = stats.loads[layer]
        device_load[layer] = loads @ f
        per_copy = float(stats.dispatch_bytes[layer] + stats.combine_bytes[layer])
        trans = stats.transitions[layer - 1] if layer > 0 and len(stats.transitions) else None
        if home == "chained" and trans is not None and trans.sum() > 0:
            k_prev = max(stats.top_k(layer - 1), 1e-12)
            arriving = trans.T @ fractions[layer - 1] / k_prev  # [E, D]: copies for expert j from device s
            # Copies for expert j served on d whose token came from another device.
            remote = ((arriving.sum(1, keepdims=True) - arriving) * f).sum(0)  # [D]
        else:
            pair = 0.5 * ((stats.coselect[layer] @ f) * f).sum(0)  # co-located pairs per device [D]
            hits = np.maximum(device_load[layer] - pair, 0.0)
            remote = hits * (D - 1) / D
        device_bytes[layer] = remote * per_copy
    max_load = device_load.max(1)
    balance = np.where(max_load > 0, device_load.mean(1) / np.maximum(max_load, 1e-300), 1.0)
    return SimulationResult(device_load, balance, device_bytes, device_bytes.sum(1), home)
