"""Placement quality on synthetic load statistics: balance and predicted all-to-all bytes per policy.

    python benchmarks/placement.py            # small and internet-scale (64 layers x 256 experts, 256 devices)
    python benchmarks/placement.py --quick    # small scale only

Loads are Zipf-distributed (expert of rank r gets weight r**-s, shuffled per layer). "correlated" stats give
every token a topic that prefers one cluster of experts in every layer (co-selection and layer-to-layer
affinity, as ExFlow measures in trained MoEs). Balance = mean / max device load per layer (1.0 is perfect),
reported as the mean and the worst layer; bytes are the simulator's all-to-all bytes (dispatch + combine)
with tokens living data-parallel (what moefx.run does) and chained (ExFlow: tokens stay where their experts
ran). EPLB = DeepSeek-style greedy replication + balanced packing, the anchor, on the same slot budget.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from moefx.placement.planner import plan_placement
from moefx.placement.simulator import simulate
from moefx.placement.stats import synthetic_stats

POLICIES = [("round-robin", 0.0), ("eplb", 0.0), ("balanced", 0.0), ("affinity", 0.0), ("affinity", 0.05)]


def compare(title: str, stats, devices: int, replicas: int, policies=POLICIES) -> dict[str, dict]:
    print(f"\n{title}")
    print(f"  {'policy':<16}{'balance mean':>13}{'worst layer':>13}{'a2a GB (dp)':>13}{'a2a GB (chained)':>18}{'plan s':>8}")
    rows = {}
    for policy, tol in policies:
        start = time.perf_counter()
        plan = plan_placement(stats, devices, policy=policy, replicas=0 if policy == "round-robin" else replicas,
                              load_tolerance=tol)
        seconds = time.perf_counter() - start
        dp, chained = simulate(plan, stats), simulate(plan, stats, home="chained")
        label = policy + (f" +{tol:.0%}" if tol else "")
        rows[label] = {"balance": float(dp.balance.mean()), "worst": float(dp.balance.min()),
                       "bytes": float(dp.a2a_bytes.sum()), "chained": float(chained.a2a_bytes.sum())}
        r = rows[label]
        print(f"  {label:<16}{r['balance']:>13.4f}{r['worst']:>13.4f}{r['bytes'] / 1e9:>13.3f}"
              f"{r['chained'] / 1e9:>18.3f}{seconds:>8.2f}")
    base = rows["balanced"]
    for label in ("affinity", "affinity +5%"):
        if label in rows:
            a = rows[label]
            print(f"  {label} vs balanced: a2a bytes {a['bytes'] / base['bytes'] - 1:+.1%} (dp), "
                  f"{a['chained'] / base['chained'] - 1:+.1%} (chained); balance {a['balance'] - base['balance']:+.4f}")
    print(f"  balanced vs round-robin: {base['balance'] / rows['round-robin']['balance']:.2f}x balance; "
          f"vs EPLB: {base['balance'] - rows['eplb']['balance']:+.4f} (mean), {base['worst'] - rows['eplb']['worst']:+.4f} (worst)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 64 x 256 on 256 devices run")
    args = parser.parse_args()
    stats = synthetic_stats(16, 64, tokens=16384, top_k=2, zipf=1.2, seed=0)
    compare("16 layers x 64 experts, top-2, Zipf s=1.2, independent routing, 8 devices, 8 replicas/layer", stats, 8, 8)
    stats = synthetic_stats(16, 64, tokens=16384, top_k=2, zipf=1.0, clusters=8, cluster_boost=32, seed=0)
    compare("16 layers x 64 experts, top-2, Zipf s=1.0, correlated (8 topics), 8 devices, 8 replicas/layer", stats, 8, 8)
    if not args.quick:
        start = time.perf_counter()
        stats = synthetic_stats(64, 256, tokens=8192, top_k=8, zipf=1.0, clusters=32, cluster_boost=16, seed=0)
        print(f"\n(synthetic statistics for 64 x 256 drawn in {time.perf_counter() - start:.1f}s)")
        compare("64 layers x 256 experts, top-8, Zipf s=1.0, correlated (32 topics), 256 devices, 256 replicas/layer",
                stats, 256, 256)


if __name__ == "__main__":
    main()
