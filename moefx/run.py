"""``torchrun --nproc-per-node N -m moefx.run PLAN_DIR``: run a partitioned model expert-parallel.

Each rank loads its shard of ``PLAN_DIR`` (made by ``moefx partition``), takes its slice of the batch (the
examples are split over the ranks along the first dimension: data parallel), runs the model with experts
exchanged by ``all_to_all_single``, and rank 0 gathers the outputs. With ``--reference OUT`` rank 0 also
runs the single-process converted model ``OUT/`` on the whole batch and reports the largest difference
(exit code 1 when it exceeds ``--atol``).

Inputs: ``--inputs FILE`` (a ``.pt``/``.safetensors`` tensor of examples, passed like the recorded example
inputs) or, by default, the example inputs recorded at conversion. Errors are one line per rank on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils import _pytree as pytree

from moefx.cli import OneLineErrorParser
from moefx.errors import MoefxError
from moefx.inputs import batch_size
from moefx.placement.runtime import ExpertParallelMoE, init_expert_parallel
from moefx.placement.shards import check_partition, load_rank_model, read_example_inputs
from moefx.saving import load
from moefx.tasks import task_context

__all__ = ["main", "split_batch"]


def split_batch(inputs: tuple[tuple, dict], rank: int, world_size: int) -> tuple[tuple, dict]:
    """This rank's slice of every tensor that has the batch dimension (the first tensor's first dimension)."""
    leaves, spec = pytree.tree_flatten(inputs)
    batch = batch_size(inputs)
    if batch is None:
        raise MoefxError("the inputs hold no tensor to split over the ranks")
    if batch < world_size:
        raise MoefxError(f"a batch of {batch} example(s) cannot be split over {world_size} ranks; pass a batch of "
                         f"at least {world_size} examples with --inputs")
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch:
            leaf = torch.tensor_split(leaf, world_size)[rank]
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def first_tensor(output) -> torch.Tensor:
    """The main output tensor (``logits`` / ``last_hidden_state`` of a Hugging Face output, or the first)."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = tuple(output.values())
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise TypeError("the model returned no tensor")
    return leaves[0]


def _pick_tensor(obj: Any, path: Path) -> torch.Tensor:
    """The tensor of examples in a loaded inputs file: the tensor itself, a dict's ``input_ids``, or a dict's
    only entry."""
    if isinstance(obj, dict):
        if "input_ids" in obj:
            obj = obj["input_ids"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or obj.dim() == 0:
        raise MoefxError(f"{path}: expected a tensor of examples (or a dict with 'input_ids')")
    return obj


def _load_inputs(path: Path, recorded: tuple[tuple, dict] | None) -> tuple[tuple, dict]:
    if not path.exists():
        raise MoefxError(f"{path}: no such inputs file")
    if path.suffix == ".safetensors":
        data = _pick_tensor(load_file(str(path)), path)
    else:
        data = _pick_tensor(torch.load(str(path), map_location="cpu", weights_only=True), path)
    if recorded is not None and not recorded[0] and "input_ids" in recorded[1]:
        return (), {"input_ids": data}
    return (data,), {}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m moefx.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan_dir", type=Path, metavar="PLAN_DIR", help="a directory written by moefx partition")
    parser.add_argument("--inputs", type=Path, default=None, help="tensor file of examples (default: the recorded ones)")
    parser.add_argument("--reference", type=Path, default=None, metavar="OUT",
                        help="the converted model directory to compare with (single process, rank 0)")
    parser.add_argument("--atol", type=float, default=1e-5, help="tolerance of --reference (default 1e-5)")
    parser.add_argument("--save-output", type=Path, default=None, metavar="FILE",
                        help="rank 0 saves the gathered output tensor here (torch.save)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a stuck collective fails")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    parser.add_argument("--task-id", type=int, default=None, metavar="N",
                        help="models converted with --router task: the task to run the model on")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow rebuilding a pickled .pt source")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = "?"
    try:
        return _run(args)
    except MoefxError as exc:
        if args.debug:
            raise
        rank = os.environ.get("RANK", rank)
        print(f"moefx.run rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    check_partition(args.plan_dir)  # fail fast, before waiting for the other ranks
    rank, world = init_expert_parallel(args.backend, timeout=args.timeout)
    model = load_rank_model(args.plan_dir, rank, world, trust_remote_code=args.trust_remote_code)
    recorded = read_example_inputs(args.plan_dir)
    inputs = _load_inputs(args.inputs, recorded) if args.inputs is not None else recorded
    if inputs is None:
        raise MoefxError(f"{args.plan_dir}: no recorded example inputs; pass --inputs FILE")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model.to(device)
    args_, kwargs = split_batch(inputs, rank, world)
    args_, kwargs = pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, (args_, kwargs))
    with torch.no_grad(), task_context(model, args.task_id, str(args.plan_dir)):
        output = first_tensor(model(*args_, **kwargs)).cpu()
    _check_layers_ran(model)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, output)
    status = _report(args, inputs, gathered, world) if rank == 0 else 0
    dist.barrier()  # an orderly teardown: nobody leaves while rank 0 still compares
    return status


def _report(args: argparse.Namespace, inputs: tuple[tuple, dict], gathered: list, world: int) -> int:
    full = torch.cat(gathered, dim=0)
    print(f"moefx.run: {world} ranks, output {tuple(full.shape)}")
    if args.save_output is not None:
        torch.save(full, args.save_output)
    if args.reference is not None:
        reference = load(args.reference, trust_remote_code=args.trust_remote_code)
        with torch.no_grad(), task_context(reference, args.task_id, str(args.reference)):
            expected = first_tensor(reference(*inputs[0], **inputs[1]))
        error = float((full - expected).abs().max())
        print(f"moefx.run: max |expert-parallel - single-process| = {error:.3e} (atol {args.atol:g})")
        if not error <= args.atol:
            return 1
    return 0


def _check_layers_ran(model) -> None:
    idle = [m.name for m in model.modules() if isinstance(m, ExpertParallelMoE) and m.calls == 0]
    if idle:
        raise MoefxError(
            f"MoE layers {idle[:3]} never ran as expert-parallel modules (they are baked into an exported graph); "
            "expert parallelism needs layers captured with torch.fx"
        )


if __name__ == "__main__":
    sys.exit(main())
