"""``moefx heal OUT --calib FILE -o HEALED``: fit each MoE layer of a converted model to its dense FFN."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moefx.config import CALIB_TOKENS, HEAL_STEPS
from moefx.errors import ConfigError, MoefxError, OutputExistsError

from . import add_common_flags

__all__ = ["add_parser", "run"]

_EXAMPLES = """examples:
  moefx heal out/ --calib sentences.txt -o out-healed/
  moefx heal out/ --calib calib.safetensors --dense model_dir/ -o out-healed/ --force
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "heal", help="fit a converted model's MoE layers to its dense FFNs on calibration data",
        description="Layer-wise distillation: record every MoE layer's inputs on calibration data (running the "
                    "dense FFNs), fit each layer to reproduce its dense FFN there (split layers: router refit, "
                    "least squares, then gradient steps on every expert weight; others: gradient steps), keep "
                    "a fit only if it lowers the held-out error, and write the healed model to HEALED.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="a directory written by moefx convert")
    parser.add_argument("--calib", type=Path, required=True, metavar="FILE",
                        help="calibration data: .txt (one example per line), or a .pt/.safetensors tensor file")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="HEALED", help="output directory")
    parser.add_argument("--force", action="store_true", help="replace HEALED if it exists")
    parser.add_argument("--dense", default=None, metavar="MODEL",
                        help="the dense model OUT was converted from (default: the source recorded in OUT)")
    parser.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, metavar="N",
                        help="at most N sampled input rows per layer (default %(default)s)")
    parser.add_argument("--steps", type=int, default=HEAL_STEPS, metavar="N",
                        help="Adam steps per layer (default %(default)s; 0: split layers get least squares only)")
    parser.add_argument("--task-id", type=int, default=None, metavar="N",
                        help="models converted with --router task: the task to run the model on")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow loading pickled .pt models (this runs code from the file)")
    parser.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    add_common_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from moefx.heal import heal
    from moefx.report import format_table
    from moefx.saving import load, save
    from moefx.sources import load_source
    from moefx.tasks import task_context

    from .convert import check_not_an_input, check_output_parent

    if args.output.exists() and not args.force:
        raise OutputExistsError(f"{args.output}: already exists; pass --force to replace it")
    check_not_an_input(args.output, args.out, args.dense or _recorded_source(args.out), args.calib)
    if not args.calib.is_file():
        raise MoefxError(f"{args.calib}: no such calibration file; pass a .txt, .pt or .safetensors file")
    if args.calib_tokens < 1:
        raise ConfigError(f"--calib-tokens must be at least 1, got {args.calib_tokens}")
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    check_output_parent(args.output)
    model = load(args.out, trust_remote_code=args.trust_remote_code, lazy=False)
    dense = None
    if args.dense is not None:
        dense = load_source(args.dense, trust_remote_code=args.trust_remote_code).model
    with task_context(model, args.task_id, str(args.out)):
        report = heal(model, args.calib, dense=dense, calib_tokens=args.calib_tokens, steps=args.steps,
                      trust_remote_code=args.trust_remote_code)
    save(model, args.output, force=args.force)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        rows = [[r["layer"], r["method"], f"{r['error_before']:.3e}", f"{r['error_after']:.3e}",
                 ", ".join(r.get("kept", [])) or "no"] for r in report]
        print(format_table(["moe layer", "method", "error before", "error after", "fits kept"], rows))
        print(f"saved to {args.output}/")
    return 0


def _recorded_source(out: Path) -> str | None:
    """The dense source OUT records (heal reads it when --dense is not given), or None."""
    from moefx.saving import read_recipe

    try:
        return (read_recipe(out).get("source") or {}).get("spec")
    except MoefxError:
        return None  # not a moefx output: loading it says so
