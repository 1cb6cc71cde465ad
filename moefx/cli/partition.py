"""``moefx partition OUT --devices N -o PLAN``: plan expert placement and write one weight shard per rank."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from moefx.errors import MoefxError, OutputExistsError

from . import add_common_flags
from .convert import check_not_an_input, check_output_parent

__all__ = ["add_parser", "parse_bytes", "run"]

_EXAMPLES = """examples:
  moefx partition out/ --devices 4 -o plan/                       recorded example inputs as calibration
  moefx partition out/ --devices 4 --calib calib.pt -o plan/      a tensor of input ids (.pt/.safetensors)
  moefx partition out/ --devices 8 --replicas 8 --policy eplb -o plan/ --force
  torchrun --nproc-per-node 4 -m moefx.run plan/ --reference out/
"""

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``16GB``, ``512MiB``, ``1e9`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use e.g. 16GB or 512MiB)")
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use e.g. 16GB or 512MiB)") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    from moefx.placement.planner import POLICIES

    parser = subparsers.add_parser(
        "partition", help="plan expert placement over devices and write per-rank shards",
        description="Record expert loads on calibration inputs, plan which device holds which expert (balanced, "
                    "with replicas of hot experts and affinity-aware), and write PLAN/ (plan.json, plan.png, one "
                    "weight shard per rank) for torchrun -m moefx.run.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="OUT", type=Path, help="a converted model directory (moefx convert -o OUT)")
    parser.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices (ranks)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="PLAN", help="output directory")
    parser.add_argument("--calib", default=None, metavar="FILE",
                        help="calibration inputs: .pt/.safetensors tensor of examples, or .txt (words hashed "
                             "into the vocabulary); default: the example inputs recorded at conversion")
    parser.add_argument("--policy", default="affinity", help=f"placement policy: {', '.join(POLICIES)} (default affinity)")
    parser.add_argument("--replicas", type=int, default=None, metavar="R",
                        help="extra expert replicas per layer (default: fill the spare slots)")
    parser.add_argument("--no-replication", action="store_true", help="one copy of every expert (--replicas 0)")
    parser.add_argument("--device-memory", type=parse_bytes, default=None, metavar="BYTES",
                        help="memory per device, e.g. 16GB; a plan that does not fit is an error")
    parser.add_argument("--load-tolerance", type=float, default=0.0, metavar="F",
                        help="affinity: allow the busiest device F (e.g. 0.05) above the balanced plan")
    parser.add_argument("--no-png", action="store_true", help="do not draw plan.png")
    parser.add_argument("--force", action="store_true", help="replace PLAN if it exists")
    parser.add_argument("--json", action="store_true", help="print the plan summary as JSON")
    parser.add_argument("--task-id", type=int, default=None, metavar="N",
                        help="models converted with --router task: the task to run the model on")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow rebuilding a pickled .pt source")
    add_common_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from moefx.inputs import batch_size
    from moefx.placement.planner import model_fingerprint, plan_placement
    from moefx.placement.shards import write_partition
    from moefx.placement.stats import calibration_batches, record_stats
    from moefx.saving import load
    from moefx.tasks import task_context

    if args.output.exists() and not args.force:
        raise OutputExistsError(f"{args.output}: already exists; pass --force to replace it")
    check_not_an_input(args.output, args.model, args.calib)
    check_output_parent(args.output)
    if args.no_replication and args.replicas not in (None, 0):
        raise MoefxError("--no-replication and --replicas contradict each other; pass one")
    model = load(args.model, trust_remote_code=args.trust_remote_code)
    with task_context(model, args.task_id, str(args.model)):
        stats = record_stats(model, calibration_batches(model, args.calib))
    plan = plan_placement(
        stats, args.devices, policy=args.policy, replicas=0 if args.no_replication else args.replicas,
        device_memory=args.device_memory, load_tolerance=args.load_tolerance,
        fingerprint=model_fingerprint(model),
    )
    write_partition(model, plan, args.output, stats=stats, picture=not args.no_png, force=args.force)
    p = plan.predicted
    summary = {"devices": plan.num_devices, "policy": plan.policy, "layers": len(plan.layers),
               "balance_mean": p["balance_mean"], "balance_min": p["balance_min"], "a2a_bytes": p["a2a_bytes"],
               "output": str(args.output)}
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(f"{len(plan.layers)} MoE layers on {plan.num_devices} devices ({plan.policy}): balance mean "
              f"{p['balance_mean']:.3f}, min {p['balance_min']:.3f}; predicted all-to-all {p['a2a_bytes'] / 1e6:.3f} MB")
        recorded = batch_size(getattr(getattr(model, "moefx_info", None), "inputs", None))
        inputs = "" if recorded is None or recorded >= plan.num_devices else " --inputs EXAMPLES.pt"
        print(f"saved to {args.output}/ (plan.json, {'' if args.no_png else 'plan.png, '}"
              f"{plan.num_devices} shards); run: torchrun --nproc-per-node {plan.num_devices} -m moefx.run "
              f"{args.output}{inputs}{'' if args.task_id is None else f' --task-id {args.task_id}'}")
        if inputs:
            print(f"(the recorded example inputs hold {recorded} example(s), fewer than the {plan.num_devices} ranks "
                  f"split them: give a tensor file of at least {plan.num_devices} examples)")
    return 0

