"""Expert placement across devices: load statistics, placement plans, shards and expert-parallel execution.

The pieces, each its own module (imported lazily, so ``import moefx`` loads none of them, nor networkx;
matplotlib, which is optional, is imported only by the function that draws a plan):

* :mod:`~moefx.placement.stats` — ``LoadStats`` (tokens per expert per layer, co-selection and
  layer-to-layer transition counts), recorded from a forward pass or drawn from a Zipf model.
* :mod:`~moefx.placement.planner` — ``plan_placement``: round-robin, EPLB-style greedy replication packing,
  ``balanced`` (EPLB start + makespan local search), ``affinity`` (balanced + graph partition refinement),
  or any ``(layer, expert) -> device(s)`` function; ``Plan`` is what ``plan.json`` holds.
* :mod:`~moefx.placement.simulator` — ``simulate``: per-device load and all-to-all bytes of a plan.
* :mod:`~moefx.placement.shards` — ``write_partition`` / ``load_rank_model``: per-rank shard files.
* :mod:`~moefx.placement.runtime` — ``ExpertParallelMoE`` and ``init_expert_parallel`` on torch.distributed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ExpertParallelError",
    "ExpertParallelMoE",
    "LoadStats",
    "PlacementError",
    "Plan",
    "PlanMismatchError",
    "ShardError",
    "SimulationResult",
    "eplb_placement",
    "init_expert_parallel",
    "load_rank_model",
    "plan_placement",
    "record_stats",
    "simulate",
    "synthetic_stats",
    "to_expert_parallel",
    "write_partition",
]

_WHERE = {
    "LoadStats": "stats", "record_stats": "stats", "synthetic_stats": "stats",
    "Plan": "planner", "plan_placement": "planner", "eplb_placement": "eplb",
    "PlacementError": "errors", "PlanMismatchError": "errors", "ShardError": "errors",
    "ExpertParallelError": "errors",
    "SimulationResult": "simulator", "simulate": "simulator",
    "write_partition": "shards", "load_rank_model": "shards",
    "ExpertParallelMoE": "runtime", "init_expert_parallel": "runtime", "to_expert_parallel": "runtime",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'moefx.placement' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
