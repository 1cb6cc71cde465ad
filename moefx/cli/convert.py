"""``moefx convert MODEL -o OUT``: convert the dense FFNs of MODEL into MoE layers and save the result."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from moefx.config import CALIB_TOKENS, EXPERT_INITS, HEAL_STEPS, PARTITIONS, ROUTERS, MoEConfig
from moefx.errors import ConfigError, MoefxError, OutputExistsError

from . import add_common_flags

__all__ = ["add_model_flags", "add_parser", "config_from_args", "run"]

_EXAMPLES = """examples:
  moefx convert model_dir/ --experts 8 --top-k 2 -o out/
  moefx convert model_dir/ --top-k 1 --capacity-factor 1.25 --every 2 -o out/     Switch-style
  moefx convert program.pt2 --init random --expert-size 256 -o out/ --force
  moefx convert model.pt --trust-remote-code --inputs examples.pt -o out/          a pickled module
  moefx convert my_pkg.models:build --last 4 -o out/                               V-MoE style
  moefx convert vit_dir/ --router soft -o out/                                     Soft MoE
  moefx convert t5_dir/ --router task --num-tasks 3 -o out/                        Task-MoE
  moefx convert llama-7b/ --stream --init random --expert-size 1376 -o out/        larger than memory
  moefx convert bert_dir/ --init split --experts 16 --top-k 8 --calib sentences.txt --heal -o out/
                                                                                  MoEfication + healing
  moefx convert llama_dir/ --init lora --experts 8 --lora-rank 16 -o out/          LoRA experts (MixLoRA)
"""

#: MoEConfig field -> the flag that sets it (used to phrase config errors in CLI terms).
FIELD_FLAGS = {
    "num_experts": "--experts", "top_k": "--top-k", "capacity_factor": "--capacity-factor",
    "normalize_weights": "--no-normalize", "router_init_std": "--router-init-std", "init_noise": "--init-noise",
    "expert_size": "--expert-size", "load_balance_weight": "--load-balance-weight",
    "z_loss_weight": "--z-loss-weight", "router": "--router", "init": "--init", "seed": "--seed",
    "every": "--every", "last": "--last", "layers": "--layers", "exclude": "--exclude",
    "num_tasks": "--num-tasks", "slots_per_expert": "--slots-per-expert",
    "max_slots_per_expert": "--max-slots-per-expert", "local_entropy_weight": "--local-entropy-weight",
    "global_entropy_weight": "--global-entropy-weight", "global_entropy_threshold": "--global-entropy-threshold",
    "allow_noncausal": "--allow-noncausal", "partition": "--partition", "shared_experts": "--shared-experts",
    "lora_rank": "--lora-rank",
}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a Hugging Face model directory, a .pt2 program, a .pt module, or package.module:factory")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow loading pickled .pt models (this runs code from the file)")


def add_selection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("layer selection (criteria combine)")
    group.add_argument("--every", type=int, default=1, metavar="K", help="convert every K-th FFN (K=2: GShard/Switch)")
    group.add_argument("--last", type=int, default=None, metavar="N", help="convert only the last N FFNs (V-MoE)")
    group.add_argument("--layers", default=None, metavar="REGEX", help="convert only FFNs whose name matches REGEX")
    group.add_argument("--exclude", default=None, metavar="REGEX", help="never convert FFNs whose name matches REGEX")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="convert dense FFNs into MoE layers and save the model",
        description="Convert the dense FFNs of MODEL into Mixture-of-Experts layers and write OUT/ "
                    "(weights, recipe.json, report).",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                        help="output directory (default: MODEL name + '-moe' in the current directory)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    parser.add_argument("--inputs", type=Path, default=None, metavar="FILE",
                        help="example inputs for capture, checking and the record in OUT (bench and partition "
                             "read it): a .pt file of a tensor, a tuple of inputs or a dict of named inputs, or a "
                             ".safetensors file of named tensors (default: the model's own, e.g. from a factory)")
    parser.add_argument("--stream", action="store_true",
                        help="convert a Hugging Face safetensors directory one layer at a time, in bounded memory "
                             "(resumes an interrupted run)")
    parser.add_argument("--max-shard-size", default=None, metavar="SIZE",
                        help="--stream: largest output shard (default 5GB)")
    routing = parser.add_argument_group("routing")
    routing.add_argument("--router", default="topk", help=f"router: {', '.join(ROUTERS)} (default topk)")
    routing.add_argument("--experts", type=int, default=8, metavar="E", help="experts per MoE layer (default 8)")
    routing.add_argument("--top-k", type=int, default=2, metavar="K", help="experts per token (default 2)")
    routing.add_argument("--capacity-factor", type=float, default=None, metavar="CF",
                         help="expert capacity ceil(tokens*CF/E); tokens over it are dropped (default: dropless)")
    routing.add_argument("--no-normalize", action="store_true",
                         help="weight experts by raw softmax gates instead of renormalised top-k")
    routing.add_argument("--slots-per-expert", type=int, default=None, metavar="P",
                         help="soft: slots per expert (default: from the sequence length)")
    routing.add_argument("--max-slots-per-expert", type=int, default=64, metavar="P",
                         help="soft: size of the learned slot bank per expert (default 64)")
    routing.add_argument("--num-tasks", type=int, default=None, metavar="T", help="task: number of task ids")
    routing.add_argument("--allow-noncausal", action="store_true",
                         help="allow soft / expert-choice routing in a causal decoder (it mixes future tokens in)")
    losses = parser.add_argument_group("auxiliary losses (moefx.aux_loss)")
    losses.add_argument("--load-balance-weight", type=float, default=0.01, metavar="W", help="Switch load balancing")
    losses.add_argument("--z-loss-weight", type=float, default=0.0, metavar="W", help="ST-MoE router z-loss")
    losses.add_argument("--local-entropy-weight", type=float, default=0.0, metavar="W",
                        help="LIMoE local (per-token) routing entropy, minimised")
    losses.add_argument("--global-entropy-weight", type=float, default=0.0, metavar="W",
                        help="LIMoE global routing entropy, maximised")
    losses.add_argument("--global-entropy-threshold", type=float, default=None, metavar="NATS",
                        help="LIMoE threshold: stop pushing global entropy above it")
    experts = parser.add_argument_group("experts")
    experts.add_argument("--init", default="upcycle", help=f"expert init: {', '.join(EXPERT_INITS)} (default upcycle)")
    experts.add_argument("--init-noise", type=float, default=None, metavar="STD",
                         help="upcycle: relative noise added to the experts to break symmetry (default 0)")
    experts.add_argument("--expert-size", type=int, default=None, metavar="I",
                         help="hidden size of each expert (default: the dense FFN's)")
    experts.add_argument("--partition", default=None, choices=sorted(PARTITIONS),
                         help="split: how neurons are grouped into experts (default: coactivation with --calib, "
                              "cluster without)")
    experts.add_argument("--shared-experts", type=int, default=0, metavar="S",
                         help="split: expert-sized groups of the most active neurons made one always-on expert")
    experts.add_argument("--lora-rank", type=int, default=None, metavar="R",
                         help="lora: rank of each expert's adapters (default 8)")
    experts.add_argument("--seed", type=int, default=0)
    calib = parser.add_argument_group("calibration (split statistics, healing)")
    calib.add_argument("--calib", type=Path, default=None, metavar="FILE",
                       help="calibration data: .txt (one example per line, the model's tokenizer), or a .pt/"
                            ".safetensors tensor of examples (or a dict of input tensors)")
    calib.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                       help=f"at most N sampled input rows per FFN are kept (default {CALIB_TOKENS})")
    calib.add_argument("--heal", action="store_true",
                       help="fit each MoE layer to its dense FFN on the calibration data (layer-wise distillation)")
    calib.add_argument("--heal-steps", type=int, default=None, metavar="N",
                       help=f"Adam steps per layer when healing (default {HEAL_STEPS}; 0: split layers get least "
                            "squares only)")
    add_selection_flags(parser)
    add_common_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> MoEConfig:
    try:
        return MoEConfig(
            router=getattr(args, "router", "topk"),
            num_experts=getattr(args, "experts", 8),
            top_k=getattr(args, "top_k", 2),
            capacity_factor=getattr(args, "capacity_factor", None),
            normalize_weights=not getattr(args, "no_normalize", False),
            load_balance_weight=getattr(args, "load_balance_weight", 0.01),
            z_loss_weight=getattr(args, "z_loss_weight", 0.0),
            local_entropy_weight=getattr(args, "local_entropy_weight", 0.0),
            global_entropy_weight=getattr(args, "global_entropy_weight", 0.0),
            global_entropy_threshold=getattr(args, "global_entropy_threshold", None),
            slots_per_expert=getattr(args, "slots_per_expert", None),
            max_slots_per_expert=getattr(args, "max_slots_per_expert", 64),
            num_tasks=getattr(args, "num_tasks", None),
            allow_noncausal=getattr(args, "allow_noncausal", False),
            init=getattr(args, "init", "upcycle"),
            init_noise=_given(args, "init_noise", 0.0),
            expert_size=getattr(args, "expert_size", None),
            partition=getattr(args, "partition", None),
            shared_experts=getattr(args, "shared_experts", 0),
            lora_rank=_given(args, "lora_rank", 8),
            seed=getattr(args, "seed", 0),
            every=args.every,
            last=args.last,
            layers=args.layers,
            exclude=args.exclude,
        )
    except ConfigError as exc:
        raise ConfigError(_in_flag_terms(str(exc))) from None


def _given(args: argparse.Namespace, name: str, default: Any) -> Any:
    """A flag's value, or ``default`` where it was not given (or the command has no such flag)."""
    value = getattr(args, name, None)
    return default if value is None else value


def _check_flags_apply(args: argparse.Namespace) -> None:
    """One clear error for a flag that would do nothing here; then the defaults of those left unset."""
    unused = [
        ("--lora-rank", args.lora_rank, args.init == "lora", f"--init lora (init is {args.init!r})"),
        ("--init-noise", args.init_noise, args.init == "upcycle", f"--init upcycle (init is {args.init!r})"),
        ("--heal-steps", args.heal_steps, args.heal, "--heal"),
        ("--calib", args.calib, args.init == "split" or args.heal, "--init split or --heal"),
        ("--calib-tokens", args.calib_tokens, args.calib is not None, "--calib FILE"),
        ("--max-shard-size", args.max_shard_size, args.stream, "--stream"),
    ]
    for flag, value, applies, needs in unused:
        if value is not None and not applies:
            raise ConfigError(f"{flag} only applies with {needs}; drop it, or add {needs.split(' (')[0]}")
    args.heal_steps = HEAL_STEPS if args.heal_steps is None else args.heal_steps
    args.calib_tokens = CALIB_TOKENS if args.calib_tokens is None else args.calib_tokens
    if args.max_shard_size is None:
        from moefx.stream import DEFAULT_SHARD_SIZE

        args.max_shard_size = DEFAULT_SHARD_SIZE


def _in_flag_terms(message: str) -> str:
    message = message.replace("allow_noncausal=True", "allow_noncausal")
    fields = "|".join(sorted(FIELD_FLAGS, key=len, reverse=True))
    # Only where a field stands as a word of the sentence: not inside a path, a dotted name or a quoted value.
    before, after = r"(?<![-\w/.'\"\[])", r"(?![-\w/.'\"\]])"

    def assignment(m: re.Match) -> str:  # field='value' -> --flag value; field=None -> --flag unset
        value = m.group(3)
        return f"{FIELD_FLAGS[m.group(1)]} {'unset' if value == 'None' else value}"

    message = re.sub(rf"{before}({fields})=('?)([\w.+-]+)\2{after}", assignment, message)
    # Bare names: only the snake_case fields; router, init, layers and the like are also plain English words.
    snake = "|".join(sorted((f for f in FIELD_FLAGS if "_" in f), key=len, reverse=True))
    return re.sub(rf"{before}({snake}){after}", lambda m: FIELD_FLAGS[m.group(1)], message)


def default_output(model: str) -> Path:
    stem = Path(model.rstrip("/")).name.split(":")[-1] if ":" in model else Path(model.rstrip("/")).stem
    return Path(f"{stem or 'model'}-moe")


def check_output_parent(out: Path) -> None:
    """Fail before any expensive work if ``out`` cannot be created: its directory is missing or not writable
    (probed by creating and removing a temporary directory, since permission bits do not bind root)."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise MoefxError(f"{out}: the directory {parent} does not exist; create it first or choose another output path")
    if not parent.is_dir():
        raise MoefxError(f"{out}: cannot write to {parent} (not a directory); choose a writable output path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        raise MoefxError(f"{out}: cannot write to {parent} ({exc.strerror}); choose a writable output path") from None


def check_not_an_input(out: Path, *inputs: Path | str | None) -> None:
    """Refuse an output path that is one of the inputs or holds one: replacing it (``--force``) would delete
    the input before, or instead of, reading it."""
    target = Path(out).resolve()
    for source in inputs:
        if source is None or str(source) == "" or (":" in str(source) and not Path(source).exists()):
            continue  # none, or a package.module:factory
        path = Path(source).resolve()
        if target == path or target in path.parents:
            what = "is" if target == path else "holds"
            raise MoefxError(f"{out}: {what} the input {source}; write the output somewhere else")


def check_side_file(flag: str, path: Path, model: str, *, force: bool, taken: dict[str, Path] | None = None) -> None:
    """Check a file a command writes beside its main result (a report, a plot) before any long work: it must not
    be inside the model it reads, nor a file another flag of the same command writes, nor an existing file
    without ``--force``, and its directory must be writable."""
    resolved = path.resolve()
    model_path = Path(model).resolve()
    if resolved == model_path or model_path in resolved.parents:
        raise MoefxError(f"{flag} {path}: inside the model {model}; write it somewhere else")
    for other_flag, other in (taken or {}).items():
        if other is not None and resolved == Path(other).resolve():
            raise MoefxError(f"{flag} and {other_flag} name the same file {path}; give each its own")
    if path.exists() and not force:
        raise OutputExistsError(f"{flag} {path}: already exists; pass --force to replace it")
    check_output_parent(path)


def run(args: argparse.Namespace) -> int:
    from moefx.convert import convert
    from moefx.inputs import load_example_inputs
    from moefx.report import render_conversion_text
    from moefx.saving import save
    from moefx.sources import load_source

    config = config_from_args(args)
    out = args.output or default_output(args.model)
    if out.exists() and not args.force:
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it")
    check_not_an_input(out, args.model, args.calib, args.inputs)
    check_output_parent(out)
    if args.heal and args.calib is None:
        raise ConfigError("--heal fits the MoE layers to the dense FFNs on calibration data; pass --calib FILE")
    _check_flags_apply(args)
    if args.calib_tokens < 1:
        raise ConfigError(f"--calib-tokens must be at least 1, got {args.calib_tokens}")
    if args.heal_steps < 0:
        raise ConfigError(f"--heal-steps must be >= 0, got {args.heal_steps}")
    if args.calib is not None and not args.calib.is_file():
        raise MoefxError(f"{args.calib}: no such calibration file; pass a .txt, .pt or .safetensors file")
    if args.stream and args.inputs is not None:
        raise ConfigError("--inputs does not apply to --stream, which plans from the checkpoint's config without "
                          "running the model; convert without --stream to use example inputs")
    example = load_example_inputs(args.inputs) if args.inputs is not None else None
    if args.stream:
        from .stream import run_streamed


        try:
            return run_streamed(args, config, out)
        except ConfigError as exc:
            raise ConfigError(_in_flag_terms(str(exc))) from None
    source = load_source(args.model, trust_remote_code=args.trust_remote_code)
    inputs = example or source.example_inputs or (None, None)
    try:
        model = convert(source.model, config, inputs[0], example_kwargs=inputs[1], inplace=True,
                        source=source.to_dict(), calib=args.calib, calib_tokens=args.calib_tokens,
                        heal=args.heal, heal_steps=args.heal_steps)
    except ConfigError as exc:
        raise ConfigError(_in_flag_terms(str(exc))) from None
    save(model, out, force=args.force)
    report = model.moefx_info.report()
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print(render_conversion_text(report))
        print(f"saved to {out}/ (recipe.json, model.safetensors, report.md)")
    return 0
