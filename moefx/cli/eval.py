"""``moefx eval OUT --data FILE``: how much quality a conversion costs, on the user's own data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moefx.errors import ConfigError, MoefxError

from . import add_common_flags

__all__ = ["add_parser", "run"]

_EXAMPLES = """examples:
  moefx eval out/ --data held_out.txt                 perplexity ratio, KL, top-1 agreement (causal LMs)
  moefx eval out/ --data sentences.txt --json         embedding cosine (encoders), as JSON
  moefx eval out/ --data ids.pt --dense model_dir/ --max-tokens 0
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="compare a converted model with its dense model on your data",
        description="Run evaluation data through the converted model and the dense model it came from and "
                    "compare them: perplexity ratio, KL divergence and top-1 agreement of the logits (causal "
                    "LMs), mean-pooled embedding cosine (encoders), and per MoE layer the relative error of its "
                    "output against its dense FFN on the same inputs. Use data the conversion was not "
                    "calibrated on.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="a directory written by moefx convert")
    parser.add_argument("--data", type=Path, required=True, metavar="FILE",
                        help="evaluation data: .txt (one example per line), or a .pt/.safetensors tensor file")
    parser.add_argument("--dense", default=None, metavar="MODEL",
                        help="the dense model OUT was converted from (default: the source recorded in OUT)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="stop after N compared tokens (default 16384; 0: all of the data)")
    parser.add_argument("--task-id", type=int, default=None, metavar="N",
                        help="models converted with --router task: the task to run the model on")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow loading pickled .pt models (this runs code from the file)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_common_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from moefx.evaluate import EVAL_TOKENS, evaluate
    from moefx.saving import load
    from moefx.sources import load_source
    from moefx.tasks import task_context

    if not args.data.is_file():
        raise MoefxError(f"{args.data}: no such evaluation file; pass a .txt, .pt or .safetensors file")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0 (0: all of the data), got {args.max_tokens}")
    max_tokens = EVAL_TOKENS if args.max_tokens is None else (args.max_tokens or None)
    model = load(args.out, trust_remote_code=args.trust_remote_code)
    dense = None
    if args.dense is not None:
        dense = load_source(args.dense, trust_remote_code=args.trust_remote_code).model
    with task_context(model, args.task_id, str(args.out)):
        evaluation = evaluate(model, args.data, dense=dense, max_tokens=max_tokens,
                              trust_remote_code=args.trust_remote_code)
    if args.json:
        json.dump(evaluation.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(evaluation.render())
    return 0
