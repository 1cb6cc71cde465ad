"""Placement planning: which device(s) hold which expert of every MoE layer.

``plan_placement(stats, num_devices, policy=...)`` returns a :class:`Plan`. Policies:

``round-robin``
    expert e on device ``e % D``, no replicas (the naive baseline).
``eplb``
    DeepSeek EPLB-style greedy replication + balanced packing (:mod:`moefx.placement.eplb`).
``balanced``
    the EPLB result refined by a makespan local search: repeatedly swap (or move into a free slot) a replica
    of the busiest device with one of another device when that lowers the larger of the two loads. It never
    makes a layer's busiest device busier, so its balance is at least EPLB's.
``affinity`` (default)
    ``balanced``, then cut all-to-all traffic without giving back balance (ExFlow-style): each layer's device
    labels are permuted to line up with the previous layer (a bipartite max-weight matching in networkx on
    the transition counts; load-neutral), then a Kernighan-Lin-style swap refinement on the affinity graph
    (co-selection within the layer + transitions to the neighbouring layers) accepts only swaps that keep
    every device at or under the layer's balanced maximum load (times ``1 + load_tolerance``).
a function ``policy(layer, expert) -> device or [devices]``
    your own placement (several devices = replicas).

Slots: every layer has ``E + replicas`` physical experts, at most ``ceil((E + replicas) / D)`` per device.
``replicas=None`` fills the spare slots of the last row (``(-E) % D``). Memory: with ``device_memory``, a
device holding ``shared_bytes + sum(expert_bytes of its replicas)`` more than its capacity is an error that
gives the numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from networkx.algorithms import bipartite

from moefx.files import read_json_file
from moefx.layers import moe_layers

from .eplb import eplb_placement
from .errors import PlacementError, PlanMismatchError
from .simulator import expert_fractions, simulate
from .stats import LoadStats

__all__ = ["PLAN_VERSION", "POLICIES", "Plan", "PolicyFn", "model_fingerprint", "plan_placement"]

PLAN_VERSION = 1
POLICIES = ("affinity", "balanced", "eplb", "round-robin")
PolicyFn = Callable[[int, int], "int | Sequence[int]"]


@dataclass
class Plan:
    """A placement: ``layers[l][d]`` = the logical experts (one entry per replica) device d holds in layer l.

    The position of an expert in ``layers[l][d]`` is its index in that device's local expert bank.
    """

    num_devices: int
    layer_names: list[str]
    num_experts: int
    layers: list[list[list[int]]]
    policy: str = ""
    fingerprint: str | None = None
    predicted: dict[str, Any] = field(default_factory=dict)

    def replicas(self, layer: int) -> list[int]:
        counts = [0] * self.num_experts
        for experts in self.layers[layer]:
            for e in experts:
                counts[e] += 1
        return counts

    def owners(self, layer: int) -> list[list[tuple[int, int]]]:
        """``owners[e]`` = ``[(device, local index), ...]`` of expert e's replicas in ``layer``."""
        owners: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for d, experts in enumerate(self.layers[layer]):
            for i, e in enumerate(experts):
                owners[e].append((d, i))
        return owners

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "moefx-plan",
            "version": PLAN_VERSION,
            "policy": self.policy,
            "num_devices": self.num_devices,
            "num_experts": self.num_experts,
            "fingerprint": self.fingerprint,
            "layers": [
                {"name": name, "devices": devices, "replicas": self.replicas(i)}
                for i, (name, devices) in enumerate(zip(self.layer_names, self.layers))
            ],
            "predicted": self.predicted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "plan") -> Plan:
        if data.get("format") != "moefx-plan" or data.get("version") != PLAN_VERSION:
            raise PlanMismatchError(f"{where}: not a moefx plan of version {PLAN_VERSION}; make one with moefx partition")
        return cls(
            num_devices=int(data["num_devices"]), num_experts=int(data["num_experts"]),
            layer_names=[d["name"] for d in data["layers"]], layers=[d["devices"] for d in data["layers"]],
            policy=data.get("policy", ""), fingerprint=data.get("fingerprint"), predicted=data.get("predicted", {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        data = read_json_file(path, PlanMismatchError, f"{path}: no such plan file; make one with moefx partition")
        return cls.from_dict(data, str(path))

    def check_model(self, model) -> None:
        """Raise :class:`PlanMismatchError` unless this plan was made for ``model``'s MoE layers."""
        got = model_fingerprint(model)
        if self.fingerprint is not None and got != self.fingerprint:
            names = [n for n, _ in moe_layers(model)]
            raise PlanMismatchError(
                f"the plan was made for another model ({len(self.layer_names)} MoE layers of {self.num_experts} "
                f"experts, first {self.layer_names[:1]}; this model has {len(names)}, first {names[:1]}, or other "
                "expert shapes); run moefx partition again for this model"
            )

    def render_png(self, path: str | os.PathLike, stats: LoadStats | None = None) -> None:
        """Heat map of predicted load per device (columns) per layer (rows)."""
        import matplotlib  # optional: needs moefx[plot]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if stats is not None:
            load = simulate(self, stats).device_load
        else:
            load = np.array(self.predicted.get("device_load", [[0] * self.num_devices]), dtype=float)
        L, D = load.shape
        fig, ax = plt.subplots(figsize=(min(2 + 0.35 * D, 24), min(1.5 + 0.3 * L, 24)))
        image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("device")
        ax.set_ylabel("MoE layer")
        balance = self.predicted.get("balance_mean")
        title = f"predicted load per device ({self.policy})"
        ax.set_title(title + (f", mean balance {balance:.3f}" if balance is not None else ""))
        fig.colorbar(image, ax=ax, label="token-expert assignments")
        fig.tight_layout()
        fig.savefig(Path(path), dpi=100)
        plt.close(fig)


def model_fingerprint(model) -> str:
    """A hash of the MoE layers' names, expert counts, weight shapes and router types."""
    parts = []
    for name, layer in moe_layers(model):
        shapes = [tuple(t.shape) if t is not None else None for t in layer.experts.weights()]
        parts.append([name, layer.num_experts, layer.router.name, layer.experts.activation, shapes])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------------------


def plan_placement(
    stats: LoadStats,
    num_devices: int,
    *,
    policy: str | PolicyFn = "affinity",
    replicas: int | None = None,
    device_memory: int | Sequence[int] | None = None,
    load_tolerance: float = 0.0,
    affinity_rounds: int = 2,
    fingerprint: str | None = None,
) -> Plan:
    """Plan the placement of every layer's experts on ``num_devices`` devices (see the module docstring).

    Raises:
        PlacementError: more devices than physical experts, an unknown policy, a policy function that returned
            a device out of range or left an expert unplaced, or a device over its memory.
    """
    D, E, L = int(num_devices), stats.num_experts, stats.num_layers
    if D < 1:
        raise PlacementError(f"--devices must be at least 1, got {D}")
    if not isinstance(load_tolerance, (int, float)) or not 0 <= load_tolerance < math.inf:  # also refuses NaN
        raise PlacementError(f"--load-tolerance must be a finite number >= 0 (e.g. 0.05 for 5%), got {load_tolerance}")
    if replicas is None:
        replicas = (-E) % D if D <= E else D - E
    if replicas < 0:
        raise PlacementError(f"--replicas must be >= 0, got {replicas}")
    if replicas > E * (D - 1) and not (isinstance(policy, str) and policy == "round-robin"):
        raise PlacementError(
            f"--replicas {replicas}: at most {E * (D - 1)} with {E} experts on {D} devices (one copy of an expert "
            "per device; a second copy on the same device serves nothing the first does not)")
    name = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise PlacementError(f"unknown placement policy {policy!r}; use one of {', '.join(POLICIES)} or a function")
        physical = E if policy == "round-robin" else E + replicas
        if physical < D:
            raise PlacementError(
                f"{D} devices but only {E} experts per layer and {0 if policy == 'round-robin' else replicas} "
                f"replicas: {D - physical} device(s) would hold no expert; allow replication (--replicas "
                f"{D - E} or more) or use at most {E} devices"
            )
        if policy == "round-robin":
            layers = [[[e for e in range(E) if e % D == d] for d in range(D)] for _ in range(L)]
        else:
            layers = eplb_placement(stats.loads, D, replicas)
            if policy in ("balanced", "affinity"):
                slots = -(-(E + replicas) // D)
                layers = [_refine_balance(stats.loads[i], layers[i], slots) for i in range(L)]
            if policy == "affinity":
                layers = _refine_affinity(stats, layers, load_tolerance, affinity_rounds)
    else:
        layers = _from_function(policy, L, E, D)
    plan = Plan(num_devices=D, layer_names=list(stats.layer_names), num_experts=E, layers=layers, policy=name,
                fingerprint=fingerprint)
    _check_memory(plan, stats, device_memory)
    plan.predicted = predict(plan, stats)
    return plan


def predict(plan: Plan, stats: LoadStats) -> dict[str, Any]:
    """The numbers ``plan.json`` reports: per layer and device load, balance and all-to-all bytes."""
    dp = simulate(plan, stats)
    chained = simulate(plan, stats, home="chained")
    return {
        "balance_mean": round(float(dp.balance.mean()), 6),
        "balance_min": round(float(dp.balance.min()), 6),
        "balance": [round(float(b), 6) for b in dp.balance],
        "device_load": [[round(float(x), 3) for x in row] for row in dp.device_load],
        "a2a_bytes": float(dp.a2a_bytes.sum()),
        "a2a_bytes_chained": float(chained.a2a_bytes.sum()),
        "device_a2a_bytes": [float(x) for x in dp.device_bytes.sum(0)],
        "device_memory_bytes": [int(x) for x in device_bytes_needed(plan, stats)],
    }


def device_bytes_needed(plan: Plan, stats: LoadStats) -> np.ndarray:
    need = np.full(plan.num_devices, float(stats.shared_bytes))
    for layer, devices in enumerate(plan.layers):
        for d, experts in enumerate(devices):
            need[d] += len(experts) * float(stats.expert_bytes[layer])
    return need


def _check_memory(plan: Plan, stats: LoadStats, device_memory) -> None:
    if device_memory is None:
        return
    D = plan.num_devices
    capacity = [int(device_memory)] * D if np.isscalar(device_memory) else [int(m) for m in device_memory]
    if len(capacity) != D:
        raise PlacementError(f"got {len(capacity)} device memory sizes for {D} devices; give one, or one per device")
    need = device_bytes_needed(plan, stats)
    for d in range(D):
        if need[d] > capacity[d]:
            experts = sum(len(layer[d]) for layer in plan.layers)
            raise PlacementError(
                f"device {d} needs {_gib(need[d])} ({_gib(stats.shared_bytes)} shared weights + {experts} experts) "
                f"but has {_gib(capacity[d])}; add devices, lower --replicas, or raise --device-memory"
            )


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({int(n)} B)"
    return f"{int(n)} B"


def _from_function(policy: PolicyFn, L: int, E: int, D: int) -> list[list[list[int]]]:
    layers = []
    for layer in range(L):
        devices: list[list[int]] = [[] for _ in range(D)]
        for e in range(E):
            got = policy(layer, e)
            targets = [got] if isinstance(got, (int, np.integer)) else list(got)
            if not targets:
                raise PlacementError(f"the placement policy put expert {e} of layer {layer} on no device")
            for d in targets:
                if not isinstance(d, (int, np.integer)) or not 0 <= int(d) < D:
                    raise PlacementError(
                        f"the placement policy put expert {e} of layer {layer} on device {d!r}; devices are 0..{D - 1}"
                    )
                devices[int(d)].append(e)
        layers.append(devices)
    return layers


# ---------------------------------------------------------------------------------------------------------
# Balance refinement: makespan local search
# ---------------------------------------------------------------------------------------------------------


def _items(devices: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(item_expert, item_device)`` arrays of a layer's physical replicas."""
    expert = np.array([e for experts in devices for e in experts], dtype=np.int64)
    device = np.array([d for d, experts in enumerate(devices) for _ in experts], dtype=np.int64)
    return expert, device


def _to_devices(item_expert: np.ndarray, item_device: np.ndarray, D: int) -> list[list[int]]:
    return [sorted(int(e) for e in item_expert[item_device == d]) for d in range(D)]


def _refine_balance(loads: np.ndarray, devices: list[list[int]], slots: int, max_steps: int = 100000) -> list[list[int]]:
    """Lower the busiest device's load by swaps/moves of replicas; never raises any pair's maximum."""
    D = len(devices)
    expert, device = _items(devices)
    counts = np.bincount(expert, minlength=len(loads))
    w = loads[expert] / counts[expert]  # [S] load of each replica
    device_load = np.bincount(device, weights=w, minlength=D)
    device_count = np.bincount(device, minlength=D)
    holds = np.zeros((len(loads), D), dtype=np.int64)  # replicas of each expert on each device
    np.add.at(holds, (expert, device), 1)
    eps = 1e-9 * max(float(device_load.max()), 1.0)
    for _ in range(max_steps):
        p = int(np.argmax(device_load))
        top = device_load[p]
        on_p = np.flatnonzero(device == p)
        others = np.flatnonzero(device != p)
        best, best_value = None, top - eps
        if len(on_p) and len(others):
            delta = w[on_p][:, None] - w[others][None, :]  # [|p|, |others|]
            q_load = device_load[device[others]][None, :]
            value = np.maximum(top - delta, q_load + delta)
            value[delta <= 0] = np.inf
            # never a second copy of an expert on one device
            value[(holds[expert[on_p]][:, device[others]] > 0) | (holds[expert[others]][:, p] > 0)[None, :]] = np.inf
            i, j = np.unravel_index(np.argmin(value), value.shape)
            if value[i, j] < best_value:
                best, best_value = ("swap", on_p[i], others[j]), value[i, j]
        room = np.flatnonzero(device_count < slots)
        if len(on_p) > 1 and len(room):
            value = np.maximum(top - w[on_p][:, None], device_load[room][None, :] + w[on_p][:, None])
            value[holds[expert[on_p]][:, room] > 0] = np.inf
            i, j = np.unravel_index(np.argmin(value), value.shape)
            if value[i, j] < best_value:
                best, best_value = ("move", on_p[i], room[j]), value[i, j]
        if best is None:
            break
        kind, a, b = best
        if kind == "swap":
            q = device[b]
            device_load[p] += w[b] - w[a]
            device_load[q] += w[a] - w[b]
            holds[expert[a], p] -= 1
            holds[expert[a], q] += 1
            holds[expert[b], q] -= 1
            holds[expert[b], p] += 1
            device[a], device[b] = q, p
        else:
            device_load[p] -= w[a]
            device_load[b] += w[a]
            device_count[p] -= 1
            device_count[b] += 1
            holds[expert[a], p] -= 1
            holds[expert[a], b] += 1
            device[a] = b
    return _to_devices(expert, device, D)


# ---------------------------------------------------------------------------------------------------------
# Affinity refinement (ExFlow-style)
# ---------------------------------------------------------------------------------------------------------


def _align_devices(stats: LoadStats, layers: list[list[list[int]]]) -> list[list[list[int]]]:
    """Relabel each layer's devices to keep chained experts together; every layer's loads are unchanged."""
    E = stats.num_experts
    D = len(layers[0])
    out = [layers[0]]
    for layer in range(1, len(layers)):
        trans = stats.transitions[layer - 1]
        if trans.sum() == 0:
            out.append(layers[layer])
            continue
        prev = expert_fractions(out[layer - 1], E)  # [E, D]
        cur = expert_fractions(layers[layer], E)
        flow = prev.T @ trans @ cur  # [D prev, D cur] transitions kept if cur device c is relabelled p
        graph = nx.Graph()
        top = [("prev", p) for p in range(D)]
        graph.add_nodes_from(top, bipartite=0)
        graph.add_nodes_from([("cur", c) for c in range(D)], bipartite=1)
        peak = float(flow.max())
        for p in range(D):
            for c in range(D):
                graph.add_edge(("prev", p), ("cur", c), weight=peak - float(flow[p, c]))
        try:
            matching = bipartite.minimum_weight_full_matching(graph, top_nodes=top)
        except (ImportError, ModuleNotFoundError):  # no scipy: networkx's pure-Python blossom
            for u, v, data in graph.edges(data=True):
                data["weight"] = float(flow[u[1], v[1]] if u[0] == "prev" else flow[v[1], u[1]]) + 1e-9
            pairs = nx.max_weight_matching(graph, maxcardinality=True)
            matching = {}
            for u, v in pairs:
                matching[u], matching[v] = v, u
        relabelled: list[list[int]] = [[] for _ in range(D)]
        for p in range(D):
            c = matching[("prev", p)][1]
            relabelled[p] = layers[layer][c]
        out.append(relabelled)
    return out


def _refine_affinity(
    stats: LoadStats, layers: list[list[list[int]]], load_tolerance: float, rounds: int
) -> list[list[list[int]]]:
    """Swap replicas between devices to keep co-selected and chained experts together, within the load cap."""
    layers = _align_devices(stats, layers)
    E, L = stats.num_experts, stats.num_layers
    D = len(layers[0])
    # The cap is fixed from the balanced layers, so later rounds cannot compound the tolerance.
    caps = [float((stats.loads[i] @ expert_fractions(layers[i], E)).max()) * (1.0 + load_tolerance) for i in range(L)]
    for _ in range(rounds):
        changed = False
        for layer in range(L):
            new, moved = _refine_affinity_layer(stats, layers, layer, E, D, caps[layer])
            layers[layer] = new
            changed |= moved
        if not changed:
            break
    return layers


def _refine_affinity_layer(stats, layers, layer, E, D, cap):
    loads = stats.loads[layer]
    expert, device = _items(layers[layer])
    counts = np.bincount(expert, minlength=E).astype(np.float64)
    r = counts[expert]  # [S] replicas of each item's expert
    w = loads[expert] / r  # [S]
    device_load = np.bincount(device, weights=w, minlength=D)
    cap = cap + 1e-9 * max(cap, 1.0)
    within = stats.coselect[layer]  # [E, E]
    k_here = max(stats.top_k(layer), 1e-12)
    outside = np.zeros((E, D))  # affinity of each expert to each device from the neighbouring layers
    if layer > 0 and stats.transitions[layer - 1].sum() > 0:
        k_prev = max(stats.top_k(layer - 1), 1e-12)
        outside += stats.transitions[layer - 1].T @ expert_fractions(layers[layer - 1], E) / k_prev
    if layer + 1 < stats.num_layers and stats.transitions[layer].sum() > 0:
        outside += stats.transitions[layer] @ expert_fractions(layers[layer + 1], E) / k_here
    f = np.zeros((E, D))
    np.add.at(f, (expert, device), 1.0 / r)
    affinity = within @ f + outside  # [E, D] per whole expert
    pair_w = within[expert][:, expert] / (r[:, None] * r[None, :])  # [S, S]
    holds = np.zeros((E, D), dtype=np.int64)  # replicas of each expert on each device
    np.add.at(holds, (expert, device), 1)
    moved = False
    S = len(expert)
    for _ in range(4 * S):
        a_item = affinity[expert] / r[:, None]  # [S, D]
        here = a_item[np.arange(S), device]  # [S]
        there = a_item[:, device]  # [S, S]: item a's affinity to item b's device
        gain = there - here[:, None] + there.T - here[None, :] - 2 * pair_w
        delta = w[:, None] - w[None, :]  # a leaves p (-w_a, +w_b), b leaves q (-w_b, +w_a)
        new_p = device_load[device][:, None] - delta
        new_q = device_load[device][None, :] + delta
        bad = (device[:, None] == device[None, :]) | (new_p > cap) | (new_q > cap) | (expert[:, None] == expert[None, :])
        clash = holds[expert][:, device] > 0  # [S, S]: item a's expert already on item b's device
        bad |= clash | clash.T  # one copy of an expert per device
        gain[bad] = -np.inf
        threshold = 1e-9 * max(float(np.abs(affinity).max()), 1.0)
        flat = np.flatnonzero(gain > threshold)
        if not len(flat):
            break
        flat = flat[np.argsort(-gain.ravel()[flat], kind="stable")][: 8 * D]
        used: set[int] = set()
        for idx in flat:
            a, b = divmod(int(idx), S)
            p, q = int(device[a]), int(device[b])
            if p in used or q in used:
                continue
            used.update((p, q))
            ea, eb = expert[a], expert[b]
            device_load[p] += w[b] - w[a]
            device_load[q] += w[a] - w[b]
            holds[ea, p] -= 1
            holds[ea, q] += 1
            holds[eb, q] -= 1
            holds[eb, p] += 1
            device[a], device[b] = q, p
            change = within[:, ea] / r[a] - within[:, eb] / r[b]  # [E]
            affinity[:, p] -= change
            affinity[:, q] += change
            moved = True
    return _to_devices(expert, device, D), moved
