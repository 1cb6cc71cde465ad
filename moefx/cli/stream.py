"""``moefx convert --stream``: the streamed conversion behind the convert command (see :mod:`moefx.stream`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moefx.config import MoEConfig

__all__ = ["run_streamed"]


def run_streamed(args: argparse.Namespace, config: MoEConfig, out: Path) -> int:
    from moefx.report import human_bytes, render_conversion_text
    from moefx.stream import calibrate_stream, parse_size, plan_stream, run_stream

    max_shard_size = parse_size(args.max_shard_size)
    plan = plan_stream(args.model, config, max_shard_size=max_shard_size)
    calibration = heal_inputs = None
    if args.calib is not None and config.init == "split":
        calibration = calibrate_stream(plan, args.calib, calib_tokens=args.calib_tokens)
    elif args.heal:
        heal_inputs = calibrate_stream(plan, args.calib, calib_tokens=args.calib_tokens, for_healing=True)
    result = run_stream(plan, out, force=args.force, calibration=calibration,
                        heal_steps=args.heal_steps if args.heal else None, heal_inputs=heal_inputs)
    report = plan.model.moefx_info.report()
    report["stream"] = {"shards": len(plan.shard_files), "shards_kept": result.shards_kept,
                        "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
                        "seconds": round(result.seconds, 3)}
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print(render_conversion_text(report))
        kept = f", {result.shards_kept} kept from an interrupted run" if result.shards_kept else ""
        print(f"streamed {human_bytes(result.bytes_read)} in, {human_bytes(result.bytes_written)} out in "
              f"{result.seconds:.1f} s ({len(plan.shard_files)} shard(s){kept})")
        print(f"saved to {out}/ (recipe.json, {plan.shard_files[0] if len(plan.shard_files) == 1 else 'model.safetensors.index.json + shards'}, report.md)")
    return 0
