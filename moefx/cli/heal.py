"""``moefx heal OUT --calib FILE -o HEALED [--seconds N]``: fit each MoE layer of a converted model to its dense
FFN; with a time budget, then distil the whole model from the dense one, never ending worse than it started."""

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
  moefx heal out/ --calib sentences.txt -o out-healed/ --minutes 15          # + end-to-end distillation
  moefx heal out/ --calib sentences.txt -o out-healed/ --seconds 0           # + only the end-to-end check
  moefx heal out/ --calib calib.safetensors --dense model_dir/ -o out-healed/ --force
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "heal", help="fit a converted model's MoE layers to its dense FFNs on calibration data",
        description="Layer-wise distillation: record every MoE layer's inputs on calibration data (running the "
                    "dense FFNs), fit each layer to reproduce its dense FFN there (split layers: router refit, "
                    "least squares, then gradient steps on every expert weight; others: gradient steps), keep "
                    "a fit only if it lowers the held-out error, and write the healed model to HEALED. With --seconds or "
                    "--minutes, healing is checked end to end: a tenth of the calibration batches is held out, the "
                    "layer-wise fit (on the rest) is kept only if it brings the model's output on them closer to "
                    "the dense model's, then the whole model is distilled from the dense one for the time given "
                    "(logits: KL; encoders: pooled cosine and hidden states; only MoE weights train) and its best "
                    "held-out state is kept, so healing never makes the model worse end to end.",
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
    e2e = parser.add_argument_group("end-to-end healing (distillation from the dense model)")
    budget = e2e.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None, metavar="N",
                        help="distil the whole model from the dense one for at most N seconds after the layer-wise "
                             "fit (0: only check the layer-wise fit end to end); default: layer-wise healing only")
    budget.add_argument("--minutes", type=float, default=None, metavar="M", help="the same budget in minutes")
    e2e.add_argument("--distill-steps", type=int, default=None, metavar="N",
                     help="at most N distillation steps (one calibration batch each; with it the result depends "
                          "only on the data and the seed, unless the time runs out first)")
    e2e.add_argument("--train", choices=("auto", "experts", "lora"), default="auto", dest="what",
                     help="what distillation trains: every expert weight and router gate, or LoRA adapters on the "
                          "expert weights (merged back) and the router gates; auto (default): lora when the "
                          "calibration data is small")
    e2e.add_argument("--lr", type=float, default=None, metavar="LR",
                     help="distillation learning rate (default 1e-4 for experts, 1e-3 for lora)")
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
    seconds = args.seconds if args.minutes is None else 60 * args.minutes
    end_to_end = seconds is not None or args.distill_steps is not None
    if seconds is not None and seconds < 0:
        raise ConfigError(f"--{'minutes' if args.minutes is not None else 'seconds'} must be >= 0")
    if args.distill_steps is not None and args.distill_steps < 0:
        raise ConfigError(f"--distill-steps must be >= 0, got {args.distill_steps}")
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    check_output_parent(args.output)
    model = load(args.out, trust_remote_code=args.trust_remote_code, lazy=False)
    dense = None
    if args.dense is not None:
        dense = load_source(args.dense, trust_remote_code=args.trust_remote_code).model
    with task_context(model, args.task_id, str(args.out)):
        report = heal(model, args.calib, dense=dense, calib_tokens=args.calib_tokens, steps=args.steps,
                      trust_remote_code=args.trust_remote_code, end_to_end=end_to_end, seconds=seconds,
                      distill_steps=args.distill_steps, what=args.what, lr=args.lr)
    save(model, args.output, force=args.force)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        layers = [r for r in report if r["layer"] != "(end to end)"]
        rows = [[r["layer"], r["method"], f"{r['error_before']:.3e}", f"{r['error_after']:.3e}",
                 ", ".join(r.get("kept", [])) or "no"] for r in layers]
        print(format_table(["moe layer", "method", "error before", "error after", "fits kept"], rows))
        for r in report[len(layers):]:
            distilled = r.get("distillation")
            steps = f", {distilled['steps']} distillation steps in {distilled['seconds']:.0f} s" if distilled else ""
            print(f"end to end (held-out {r['objective']}): {r['error_before']:.4g} -> {r['error_after']:.4g}; "
                  f"kept: {', '.join(r['kept']) or 'nothing (the model as it was)'}{steps}")
        print(f"saved to {args.output}/")
    return 0


def _recorded_source(out: Path) -> str | None:
    """The dense source OUT records (heal reads it when --dense is not given), or None."""
    from moefx.saving import read_recipe

    try:
        return (read_recipe(out).get("source") or {}).get("spec")
    except MoefxError:
        return None  # not a moefx output: loading it says so
