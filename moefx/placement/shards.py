"""The partition directory: a plan plus one weight shard per rank, and loading one rank's model from it.

``write_partition(model, plan, out)`` writes ``out/`` atomically:

* ``plan.json`` (the :class:`~moefx.placement.planner.Plan`), ``plan.png`` (load heat map) and ``stats.npz``
  (the load statistics) when statistics are given;
* ``partition.json``: world size, shard file names, the model fingerprint;
* ``rank-RRRRR-of-WWWWW.safetensors``: everything rank R needs — the non-expert weights (replicated, data
  parallel) and, for every MoE layer, only the experts the plan puts on R (stacked in the plan's local
  order);
* what rebuilds the model's architecture (``recipe.json``, ``config.json`` / ``source.pt2``, example inputs),
  as ``moefx.save`` writes it, without the full ``model.safetensors``.

``load_rank_model(out, rank, world_size)`` rebuilds the architecture, swaps every MoE layer for its
:class:`~moefx.placement.runtime.ExpertParallelMoE` and loads the rank's shard (strictly).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moefx.capture import set_mode
from moefx.config import MoEConfig
from moefx.convert import convert
from moefx.files import atomic_output_dir, read_json_file
from moefx.layers import moe_layers
from moefx.saving import read_example_inputs as read_saved_inputs
from moefx.saving import read_recipe, save
from moefx.sources import rebuild_source

from .errors import PlanMismatchError, ShardError
from .planner import Plan, model_fingerprint
from .runtime import to_expert_parallel
from .stats import LoadStats

__all__ = ["load_rank_model", "read_example_inputs", "shard_name", "write_partition"]

_PARTITION_FORMAT = "moefx-partition"


def shard_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _rank_state(model: nn.Module, plan: Plan, rank: int) -> dict[str, torch.Tensor]:
    expert_prefixes = {f"{name}.experts.": i for i, (name, _) in enumerate(moe_layers(model))}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in expert_prefixes if key.startswith(p)), None)
        if prefix is None:
            value = value.detach().contiguous()
            if value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.clone()  # a view into a memory-mapped checkpoint (lazy load): its own storage
            state[key] = value
            continue
        local = plan.layers[expert_prefixes[prefix]][rank]
        index = torch.tensor(local, dtype=torch.long)
        state[key] = value.detach().index_select(0, index).contiguous()
    return state


def write_partition(
    model: nn.Module,
    plan: Plan,
    out: str | os.PathLike,
    *,
    stats: LoadStats | None = None,
    picture: bool = True,
    force: bool = False,
) -> Path:
    """Write the partition directory ``out`` for ``plan`` (see the module docstring). Returns ``out``."""
    fingerprint = model_fingerprint(model)
    if plan.fingerprint is None:
        plan.fingerprint = fingerprint
    plan.check_model(model)
    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            full = Path(scratch) / "model"
            save(model, full)
            for item in full.iterdir():
                if item.name != "model.safetensors":
                    shutil.move(str(item), tmp / item.name)
        plan.save(tmp / "plan.json")
        if stats is not None:
            stats.save(tmp / "stats.npz")
            if picture:
                plan.render_png(tmp / "plan.png", stats)
        world = plan.num_devices
        shards = []
        for rank in range(world):
            name = shard_name(rank, world)
            save_file(_rank_state(model, plan, rank), str(tmp / name),
                      metadata={"rank": str(rank), "world_size": str(world), "fingerprint": fingerprint})
            shards.append(name)
        manifest = {"format": _PARTITION_FORMAT, "version": 1, "world_size": world, "shards": shards,
                    "fingerprint": fingerprint}
        (tmp / "partition.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _manifest(out: Path) -> dict[str, Any]:
    path = out / "partition.json"
    manifest = read_json_file(path, ShardError,
                              f"{out}: not a partition directory (no partition.json); make one with moefx partition",
                              "run moefx partition again")
    if manifest.get("format") != _PARTITION_FORMAT:
        raise ShardError(f"{path}: not a moefx partition manifest; run moefx partition again")
    return manifest


def check_partition(out: str | os.PathLike, world_size: int | None = None) -> tuple[Plan, dict[str, Any]]:
    """The plan and manifest of ``out``, after checking every shard file is there and the sizes agree."""
    out = Path(out)
    manifest = _manifest(out)
    plan = Plan.load(out / "plan.json")
    if plan.num_devices != manifest["world_size"] or plan.fingerprint != manifest["fingerprint"]:
        raise ShardError(f"{out}: plan.json and partition.json disagree; run moefx partition again")
    if world_size is not None and world_size != plan.num_devices:
        raise PlanMismatchError(
            f"{out}: the plan is for {plan.num_devices} devices but {world_size} ranks are running; launch with "
            f"--nproc-per-node {plan.num_devices} or run moefx partition --devices {world_size}"
        )
    missing = [name for name in manifest["shards"] if not (out / name).exists()]
    if missing:
        raise ShardError(
            f"{out}: missing shard file(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; copy the "
            "whole partition directory to every node, or run moefx partition again"
        )
    return plan, manifest


def read_example_inputs(out: str | os.PathLike) -> tuple[tuple, dict] | None:
    """The example inputs recorded at conversion (copied into the partition directory)."""
    out = Path(out)
    return read_saved_inputs(out, read_recipe(out).get("example_inputs"))


def _rebuild(out: Path, trust_remote_code: bool) -> nn.Module:
    """The converted architecture with uninitialised experts (``moefx.load`` without the weights)."""
    recipe = read_recipe(out)
    config = MoEConfig.from_dict(recipe["config"])
    inputs = read_example_inputs(out)
    dense = rebuild_source(out, recipe["source"], trust_remote_code)
    return convert(dense, config, *(() if inputs is None else (inputs[0],)),
                   example_kwargs=None if inputs is None else inputs[1],
                   inplace=True, verify=False, initialize=False)


def load_rank_model(out: str | os.PathLike, rank: int, world_size: int, *, group=None,
                    trust_remote_code: bool = False) -> nn.Module:
    """Rank ``rank``'s model: replicated non-expert weights, its experts, ExpertParallelMoE layers (eval mode).

    Raises:
        ShardError: a missing or damaged shard file.
        PlanMismatchError: the plan is for another number of ranks or another model.
    """
    out = Path(out)
    plan, manifest = check_partition(out, world_size)
    path = out / manifest["shards"][rank]
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ShardError(f"{path}: cannot be read ({exc}); run moefx partition again") from None
    if meta.get("rank") != str(rank) or meta.get("fingerprint") != plan.fingerprint:
        raise ShardError(f"{path}: holds rank {meta.get('rank')} of another partition; run moefx partition again")
    model = _rebuild(out, trust_remote_code)
    local_banks = {}
    for i, (name, layer) in enumerate(moe_layers(model)):
        if i < len(plan.layers):
            local_banks[name] = layer.experts.select_experts(list(plan.layers[i][rank]))
    to_expert_parallel(model, plan, rank, world_size, group=group, local_banks=local_banks)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ShardError(f"{path}: does not fit the model ({_first_line(exc)}); run moefx partition again") from None
    return set_mode(model, False)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(exc).__name__
