"""``moefx bench OUT``: time a converted model against its dense source in torch and ONNX Runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moefx.errors import ConfigError

from . import add_common_flags
from .convert import check_side_file

__all__ = ["add_parser", "parse_int_list", "run"]

_EXAMPLES = """examples:
  moefx bench out/                                   converted model vs its dense source, torch and ORT
  moefx bench out/ --batch 1,8,32 --seq 128,512 --threads 1,2 --json bench.json --plot bench.png
  moefx bench model.onnx --batch 1,8 --seq 128       one ONNX file in ONNX Runtime
  moefx bench out/ --runtimes torch --no-ffn         torch eager only, whole models only
"""


#: File types ``--plot`` can write (matplotlib's, by extension).
PLOT_FORMATS = (".png", ".svg", ".pdf")


def parse_int_list(flag: str, text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; anything but positive integers is a ConfigError naming the flag."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) <= 0:
            raise ConfigError(f"{flag} {text!r}: {part!r} is not a positive integer; give a comma-separated list "
                              "such as 1,8,32")
        values.append(int(part))
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmark a converted model against its dense source (torch, ONNX Runtime)",
        description="Time MODEL (a moefx output directory: the converted model against its dense source; or an "
                    ".onnx file) in torch eager and ONNX Runtime (fused, unfused and gather MoE): latency p50/p90/p99, "
                    "tokens/s, peak memory, parameters, active parameters and FLOPs per token, and the realised "
                    "speed-up against the ideal one from active FLOPs, per FFN and for the whole model.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="a moefx output directory or an .onnx file")
    parser.add_argument("--batch", default="1,8", metavar="LIST", help="batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--seq", default="128", metavar="LIST", help="sequence lengths, comma-separated (default 128)")
    parser.add_argument("--threads", default="1", metavar="LIST",
                        help="intra-op threads (torch and ORT), comma-separated (default 1)")
    parser.add_argument("--runtimes", default="torch,ort-fused,ort-unfused,ort-gather", metavar="LIST",
                        help="torch, ort-fused, ort-unfused, ort-gather (per-expert gather + pre-packed MatMuls; "
                             "default: all four)")
    parser.add_argument("--no-ffn", action="store_true", help="skip timing one FFN layer alone")
    parser.add_argument("--min-seconds", type=float, default=0.5, metavar="S",
                        help="measurement time per model, runtime and size (default 0.5)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="also plot latency against batch size per runtime")
    parser.add_argument("--task-id", type=int, default=None, metavar="N",
                        help="models converted with --router task: the task whose route is timed")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow rebuilding a dense source saved as a pickled .pt (this runs code from the file)")
    parser.add_argument("--force", action="store_true", help="replace the --json and --plot files if they exist")
    add_common_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from moefx.bench import run_bench

    batches = parse_int_list("--batch", args.batch)
    seqs = parse_int_list("--seq", args.seq)
    threads = parse_int_list("--threads", args.threads)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if args.json is not None:
        check_side_file("--json", args.json, args.model, force=args.force)  # before minutes of timing
    if args.plot is not None:
        check_side_file("--plot", args.plot, args.model, force=args.force, taken={"--json": args.json})
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"--plot {args.plot}: name a {', '.join(PLOT_FORMATS)} file")
    if not args.min_seconds > 0:
        raise ConfigError(f"--min-seconds {args.min_seconds}: give a positive number of seconds")
    report = run_bench(args.model, batches=batches, seqs=seqs, threads=threads, runtimes=runtimes,
                       ffn=not args.no_ffn, min_seconds=args.min_seconds,
                       trust_remote_code=args.trust_remote_code, task_id=args.task_id)
    sys.stdout.write(report.render())
    if args.json is not None:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0
