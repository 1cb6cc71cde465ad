"""Expert parallelism on CPU: convert a small Transformer, plan placement, run on 2 and 4 gloo processes.

    python examples/expert_parallel.py [--workdir /tmp/moefx-ep]

For each router (top-2 and Soft MoE) and each world size (2, 4): convert, save (``out/``), record expert
loads and write a partition (``plan/``: plan.json, plan.png, one shard per rank), then

    torchrun --nproc-per-node N -m moefx.run plan/ --reference out/

which runs the model expert-parallel (tokens exchanged with all_to_all_single) and compares it with the
single-process model. The ranks rebuild the model from ``expert_parallel:build``, so this directory is put
on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


def build():
    """The dense model and example inputs (4 sequences of 12 tokens)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(4)]).eval()
    return model, (torch.randn(4, 12, 32),)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import moefx
    from moefx.placement.planner import model_fingerprint, plan_placement
    from moefx.placement.shards import write_partition
    from moefx.placement.stats import calibration_batches, record_stats

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moefx-ep"))
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    args.workdir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for router in ("topk", "soft"):
        model, inputs = build()
        config = moefx.MoEConfig(router=router, num_experts=8, top_k=2, init="random", seed=0)
        moe = moefx.convert(model, config, inputs, source={"kind": "factory", "spec": "expert_parallel:build",
                                                           "class": "torch.nn:Sequential"})
        out = args.workdir / f"{router}-out"
        moefx.save(moe, out, force=True)
        stats = record_stats(moe, calibration_batches(moe, None))
        for world in (2, 4):
            plan = plan_placement(stats, world, fingerprint=model_fingerprint(moe))
            plan_dir = args.workdir / f"{router}-plan{world}"
            write_partition(moe, plan, plan_dir, stats=stats, force=True)
            print(f"[{router}, {world} ranks] balance {plan.predicted['balance_mean']:.3f}, "
                  f"predicted all-to-all {plan.predicted['a2a_bytes'] / 1e3:.1f} KB; plan in {plan_dir}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                   "-m", "moefx.run", str(plan_dir), "--reference", str(out), "--timeout", "60"]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            print("   ", result.stdout.strip().replace("\n", "\n    "))
            if result.returncode != 0:
                failures += 1
                print(result.stderr[-2000:], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
