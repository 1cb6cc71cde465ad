"""The ``moefx`` command: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``.

The top of the layering: commands import the library modules they run inside ``run`` (and torch only where a
flag needs it), so that building the parser (``moefx --help``, a usage error) stays cheap; that is the one
reason for function-local imports here.

Errors a user can fix (:class:`moefx.errors.MoefxError`) print one line on stderr and exit with their code
(2 for input errors); anything else is a bug and exits with 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from moefx.errors import MoefxError
from moefx.progress import set_quiet
from moefx.version import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand name -> module (relative to this package) that implements it.
COMMANDS = {
    "convert": ".convert",
    "inspect": ".inspect",
    "export": ".export",
    "partition": ".partition",
    "bench": ".bench",
    "heal": ".heal",
    "eval": ".eval",
}

_EPILOG = """examples:
  moefx inspect model_dir/                         what would be converted, and why near-misses were not
  moefx convert model_dir/ --experts 8 --top-k 2 -o out/
  moefx convert my_pkg.models:build --router topk --every 2 -o out/ --force
  moefx eval out/ --data held_out.txt              what the conversion costs: perplexity ratio, KL, cosine
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, and exits with 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="moefx",
        description="Convert the dense FFNs of a PyTorch Transformer into Mixture-of-Experts layers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moefx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for module in COMMANDS.values():
        importlib.import_module(module, __name__).add_parser(sub)
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every subcommand takes."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    set_quiet(True if quiet else None)
    module = importlib.import_module(COMMANDS[args.command], __name__)
    try:
        return int(module.run(args) or 0)
    except MoefxError as exc:
        if debug:
            raise
        print(f"moefx {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"moefx {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`moefx inspect ... --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if debug:
            raise
        print(
            f"moefx {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(this is a bug in moefx; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
