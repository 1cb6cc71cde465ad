"""DeepSeek EPLB-style placement: greedy replication of hot experts, then balanced packing.

The baseline the ``balanced`` planner is measured against (same load statistics, same slot budget):

1. ``replicate``: every expert gets one replica; each spare slot goes to the expert with the highest load per
   replica (a heap), as in EPLB's ``replicate_experts``.
2. ``balanced_packing``: physical replicas, heaviest first, each onto the lightest device that still has a
   free slot, as in EPLB's ``balanced_packing``. A replica serves ``load / replicas`` of its expert's tokens.

This is a reimplementation from the published description (no code copied); hierarchical node/group
packing is not modelled (one level of devices).
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["balanced_packing", "eplb_layer", "eplb_placement", "replicate"]


def replicate(loads: np.ndarray, num_physical: int, max_replicas: int | None = None) -> np.ndarray:
    """Replica count per expert ``[E]`` for ``E <= num_physical <= E * max_replicas`` slots (load per replica
    greedy); ``max_replicas``: at most that many of one expert (one per device: a second copy on the same
    device serves nothing the first does not)."""
    E = len(loads)
    counts = np.ones(E, dtype=np.int64)
    heap = [(-float(loads[e]), e) for e in range(E) if max_replicas is None or max_replicas > 1]
    heapq.heapify(heap)
    for _ in range(num_physical - E):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if max_replicas is None or counts[e] < max_replicas:
            heapq.heappush(heap, (-float(loads[e]) / counts[e], e))
    return counts


def balanced_packing(weights: np.ndarray, num_devices: int, slots_per_device: int,
                     item_expert: np.ndarray | None = None) -> np.ndarray:
    """Device of each item: heaviest item first onto the lightest device with a free slot (and, given each
    item's expert, none of that expert's replicas yet, where such a device is left)."""
    order = np.argsort(-weights, kind="stable")
    device_load = np.zeros(num_devices)
    device_count = np.zeros(num_devices, dtype=np.int64)
    holds: set[tuple[int, int]] = set()
    where = np.empty(len(weights), dtype=np.int64)
    for item in order:
        open_ = np.flatnonzero(device_count < slots_per_device)
        if item_expert is not None:
            fresh = [d for d in open_ if (int(item_expert[item]), int(d)) not in holds]
            open_ = np.asarray(fresh) if fresh else open_
        d = open_[np.argmin(device_load[open_])]
        if item_expert is not None:
            holds.add((int(item_expert[item]), int(d)))
        where[item] = d
        device_load[d] += weights[item]
        device_count[d] += 1
    return where


def eplb_layer(loads: np.ndarray, num_devices: int, num_physical: int) -> list[list[int]]:
    """One layer: ``devices[d]`` = the logical experts of the replicas device ``d`` holds."""
    counts = replicate(loads, num_physical, max_replicas=num_devices)
    item_expert = np.repeat(np.arange(len(loads)), counts)
    item_load = loads[item_expert] / counts[item_expert]
    slots = -(-num_physical // num_devices)
    where = balanced_packing(item_load, num_devices, slots, item_expert)
    return [sorted(int(e) for e in item_expert[where == d]) for d in range(num_devices)]


def eplb_placement(loads: np.ndarray, num_devices: int, replicas: int) -> list[list[list[int]]]:
    """Every layer of ``loads [L, E]`` with ``replicas`` extra physical experts per layer."""
    return [eplb_layer(np.asarray(row, dtype=np.float64), num_devices, len(row) + replicas) for row in loads]
