"""``moefx export OUT -o model.onnx``: a converted model to ONNX, each MoE layer one fused node where it can be."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from moefx.errors import ConfigError, MoefxError, OutputExistsError

from . import add_common_flags
from .convert import check_not_an_input, check_output_parent, check_side_file

__all__ = ["add_parser", "load_converted", "run"]

_EXAMPLES = """examples:
  moefx export out/ -o model.onnx                    fused: one com.microsoft.MoE node per MoE layer
  moefx export out/ -o model.onnx --unfused          standard ONNX ops only (any ONNX runtime)
  moefx export out/ -o model.onnx --exact --force    keep exact-GELU layers unfused (no tanh approximation)
  moefx export out/ -o model.onnx --json report.json
  moefx export out/ -o model.onnx --dtype float16    a bfloat16 model as float16 (ORT's CPU provider has no bf16)
  moefx export out/ -o model.onnx --gather-experts   per-expert Gather + MatMul (ORT pre-packs: faster prefill)
  moefx export out/ -o model.onnx --task-ids token   task router: one task id per token (graph input task_ids)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a converted model to ONNX (fused MoE nodes for ONNX Runtime)",
        description="Export a converted model to ONNX with dynamic batch and sequence axes. Each MoE layer becomes "
                    "one com.microsoft.MoE node where ONNX Runtime's kernel computes it, else standard ONNX ops; "
                    "the report says which and why.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a moefx output directory (moefx convert -o / moefx.save), or a converted model as "
                             "a .pt2 program, a .pt module or package.module:factory")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.add_argument("--force", action="store_true", help="replace FILE.onnx if it exists")
    parser.add_argument("--unfused", action="store_true",
                        help="standard ONNX ops only (no com.microsoft domain): each expert on the tokens routed to it")
    parser.add_argument("--exact", action="store_true",
                        help="keep layers unfused where the fused kernel approximates them (exact GELU)")
    parser.add_argument("--fuse-assigned", action="store_true",
                        help="also fuse layers whose router assigns experts itself (capacity limits), via log-weights")
    parser.add_argument("--gather-experts", action="store_true",
                        help="standard ops where each expert gathers its own tokens and runs MatMuls with constant "
                             "weights (ONNX Runtime pre-packs them): faster than the fused node for long inputs")
    parser.add_argument("--task-ids", choices=("example", "token"), default=None,
                        help="models with router='task': the graph input task_ids holds one id per example "
                             "([batch], the default) or per token ([batch, seq])")
    parser.add_argument("--inputs", type=Path, default=None, metavar="FILE",
                        help="example inputs to trace and check with (default: those recorded at conversion), as "
                             "for moefx convert --inputs: a .pt tensor, tuple or dict, or a .safetensors file")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="export the weights (and floating-point inputs) in this dtype (default: the model's); "
                             "ONNX Runtime's CPU provider runs float32 and float16, not bfloat16")
    parser.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: torch's, >= 18)")
    parser.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                        help="weights in FILE.onnx.data: auto (above 1.5 GiB), always or never")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not run the written model with ONNX Runtime on the example inputs")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="REPORT.json",
                        help="write the export report as JSON to REPORT.json (to stdout without a path)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow loading a pickled .pt model (this runs code from the file)")
    add_common_flags(parser)
    return parser


def load_converted(spec: str, *, trust_remote_code: bool = False):
    """The converted model named by ``spec`` and its example inputs ``(args, kwargs)`` or None."""
    from moefx.layers import moe_layers
    from moefx.saving import load
    from moefx.sources import load_source

    path = Path(spec)
    if path.is_dir() and (path / "recipe.json").exists():
        return load(path, trust_remote_code=trust_remote_code), None
    source = load_source(spec, trust_remote_code=trust_remote_code)
    if not moe_layers(source.model):
        raise MoefxError(
            f"{spec}: has no MoE layers; convert it first (moefx convert {spec} -o out/), then export out/"
        )
    return source.model, source.example_inputs


def _cast(model, inputs, dtype):
    """The model's floating-point weights and buffers, and its floating-point example inputs, in ``dtype``."""
    import torch
    from torch.utils import _pytree as pytree

    recorded = getattr(getattr(model, "moefx_info", None), "inputs", None)
    model = model.to(dtype)
    cast = functools.partial(pytree.tree_map, lambda x: x.to(dtype) if isinstance(x, torch.Tensor)
                             and x.is_floating_point() else x)
    if recorded is not None:
        model.moefx_info.inputs = cast(recorded)
    return model, None if inputs is None else cast(inputs)


def run(args: argparse.Namespace) -> int:
    from moefx.onnx.export import check_opset

    check_opset(args.opset)  # before loading the model
    if (args.unfused or args.gather_experts) and (args.exact or args.fuse_assigned):
        flag = "--exact" if args.exact else "--fuse-assigned"
        other = "--unfused" if args.unfused else "--gather-experts"
        raise ConfigError(f"{flag} only changes fused export; drop it or drop {other}")
    check_not_an_input(args.output, args.model, args.inputs)
    model_path = Path(args.model).resolve()
    if model_path.is_dir() and model_path in args.output.resolve().parents:
        raise MoefxError(f"{args.output}: inside the model directory {args.model}, whose files it could replace; "
                         "write the ONNX file somewhere else")
    if args.output.exists() and not args.output.is_dir() and not args.force:  # fail before loading the model
        raise OutputExistsError(f"{args.output}: already exists; pass --force to replace it")
    if not args.output.is_dir():  # a directory is named as such by export_onnx
        check_output_parent(args.output)
    if args.json not in (None, "-"):
        args.json = Path(args.json)
        check_side_file("--json", args.json, args.model, force=args.force,
                        taken={"-o": args.output, "-o's external data": Path(f"{args.output}.data"),
                               "--inputs": args.inputs})
    from moefx.inputs import load_example_inputs

    example = load_example_inputs(args.inputs) if args.inputs is not None else None
    model, inputs = load_converted(args.model, trust_remote_code=args.trust_remote_code)
    inputs = example or inputs
    from moefx.onnx import export_onnx

    if args.dtype is not None:
        import torch

        model, inputs = _cast(model, inputs, getattr(torch, args.dtype))
    args_, kwargs = inputs if inputs is not None else (None, None)
    report = export_onnx(
        model, args_, args.output, example_kwargs=kwargs, fused=not args.unfused, exact=args.exact,
        fuse_assigned=args.fuse_assigned, gather_experts=args.gather_experts, force=args.force, opset=args.opset,
        external_data={"auto": None, "always": True, "never": False}[args.external_data],
        verify=not args.no_verify, report_path=args.json if args.json not in (None, "-") else None,
        task_ids=args.task_ids,
    )
    if args.json == "-":
        sys.stdout.write(report.to_json())
    else:
        print(report.render())
    return 0
