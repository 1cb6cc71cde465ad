"""``moefx inspect MODEL``: what would be converted, and why each near-miss was not."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import add_common_flags
from .convert import add_model_flags, add_selection_flags

__all__ = ["add_parser", "run"]

_EXAMPLES = """examples:
  moefx inspect model_dir/                  FFNs found, how they were captured, near-misses and why
  moefx inspect model_dir/ --every 2        which FFNs a GShard-style selection would convert
  moefx inspect out/                        the layers of a converted model (reads recipe.json)
  moefx inspect model.pt2 --json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect", help="show the FFNs moefx finds and why near-misses are not converted",
        description="Analyse MODEL without changing it: the FFNs moefx would convert (with the layer selection "
                    "flags applied) and every near-miss with the reason it is not converted.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    add_selection_flags(parser)
    add_common_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from moefx.analysis import analyze
    from moefx.config import MoEConfig
    from moefx.report import format_table, render_analysis_text
    from moefx.saving import read_recipe
    from moefx.sources import load_source

    from .convert import config_from_args

    path = Path(args.model)
    if path.is_dir() and (path / "recipe.json").exists():
        recipe = read_recipe(path)
        if args.json:
            json.dump(recipe, sys.stdout, indent=2)
            print()
            return 0
        cfg = MoEConfig.from_dict(recipe["config"])
        print(f"{path}: converted by moefx {recipe['moefx']} from {recipe['source'].get('class')}: "
              f"router={cfg.router}, experts={cfg.num_experts}, top_k={cfg.top_k}, init={cfg.init}")
        rows = [[d["moe"] or "(root)", d["rule"], f"{d['in_features']}->{d['hidden_features']}->{d['out_features']}",
                 d["activation"], f"{d['experts']}x{d['expert_size']}"] for d in recipe["layers"]]
        print(format_table(["moe layer", "rule", "dense ffn", "activation", "experts"], rows))
        return 0
    config = config_from_args(args)
    source = load_source(args.model, trust_remote_code=args.trust_remote_code)
    inputs = source.example_inputs or (None, None)
    analysis = analyze(source.model, inputs[0], example_kwargs=inputs[1], config=config)
    data = analysis.to_dict()
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
    else:
        print(render_analysis_text(data, f"{args.model} ({type(source.model).__name__})"))
    return 0
