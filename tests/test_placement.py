"""The placement planner, EPLB baseline, affinity refinement, simulator and partition CLI (no processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import moefx
from moefx.cli import main as cli_main
from moefx.placement.eplb import eplb_placement, replicate
from moefx.placement.errors import PlacementError, PlanMismatchError
from moefx.placement.planner import Plan, model_fingerprint, plan_placement
from moefx.placement.simulator import simulate
from moefx.placement.stats import LoadStats, calibration_batches, record_stats, synthetic_stats

from toy_models import stack_of_mlps


def _stats(loads, coselect=None, transitions=None, tokens=None) -> LoadStats:
    loads = np.asarray(loads, dtype=float)
    L, E = loads.shape
    return LoadStats(
        layer_names=[f"l{i}" for i in range(L)], loads=loads,
        coselect=np.zeros((L, E, E)) if coselect is None else np.asarray(coselect, dtype=float),
        transitions=np.zeros((L - 1, E, E)) if transitions is None else np.asarray(transitions, dtype=float),
        tokens=np.full(L, loads.sum() / L if tokens is None else tokens), dispatch_bytes=np.full(L, 4),
        combine_bytes=np.full(L, 4), expert_bytes=np.full(L, 100), shared_bytes=1000,
    )


def _check_slots(plan: Plan, replicas: int) -> None:
    slots = -(-(plan.num_experts + replicas) // plan.num_devices)
    for layer in range(len(plan.layers)):
        assert all(c >= 1 for c in plan.replicas(layer)), "every expert is placed"
        assert all(len(d) <= slots for d in plan.layers[layer]), "no device over its slot count"
        assert all(len(set(d)) == len(d) for d in plan.layers[layer]), "one copy of an expert per device"


def test_eplb_replicates_the_hottest_experts():
    counts = replicate(np.array([100.0, 10, 10, 10]), 6)
    assert counts.tolist() == [3, 1, 1, 1]
    assert replicate(np.array([100.0, 10, 10, 10]), 6, max_replicas=2).tolist() == [2, 2, 1, 1]
    (layer,) = eplb_placement(np.array([[100.0, 10, 10, 10]]), 2, 2)  # at most one copy per device
    assert sorted(e for experts in layer for e in experts) == [0, 0, 1, 1, 2, 3]
    assert all(len(set(d)) == len(d) for d in layer)


@pytest.mark.parametrize("policy", ["eplb", "balanced", "affinity"])
@pytest.mark.parametrize(("devices", "replicas"), [(2, 2), (3, None), (4, 12), (2, 8)])
def test_no_device_holds_two_copies_of_an_expert(policy, devices, replicas):
    stats = synthetic_stats(3, 8, tokens=2048, top_k=2, zipf=1.5, clusters=2, cluster_boost=8, seed=1)
    plan = plan_placement(stats, devices, policy=policy, replicas=replicas)
    _check_slots(plan, (-8) % devices if replicas is None else replicas)


def test_more_replicas_than_one_per_device_is_an_error():
    stats = synthetic_stats(2, 8, tokens=512, top_k=2, seed=0)
    with pytest.raises(PlacementError, match="at most 8 with 8 experts on 2 devices"):
        plan_placement(stats, 2, policy="balanced", replicas=9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_beats_round_robin_and_matches_or_beats_eplb_on_zipf(seed):
    stats = synthetic_stats(6, 32, tokens=4096, top_k=2, zipf=1.2, seed=seed)
    rr = plan_placement(stats, 8, policy="round-robin")
    eplb = plan_placement(stats, 8, policy="eplb", replicas=8)
    ours = plan_placement(stats, 8, policy="balanced", replicas=8)
    _check_slots(ours, 8)
    b = {p.policy: simulate(p, stats).balance for p in (rr, eplb, ours)}
    assert b["balanced"].mean() > b["round-robin"].mean() + 0.2
    assert np.all(b["balanced"] >= b["eplb"] - 1e-12)  # layer by layer, never worse than the anchor


def test_affinity_cuts_traffic_without_losing_balance_on_correlated_loads():
    stats = synthetic_stats(6, 32, tokens=8192, top_k=2, zipf=1.0, clusters=4, cluster_boost=32, seed=0)
    balanced = plan_placement(stats, 4, policy="balanced", replicas=4)
    affinity = plan_placement(stats, 4, policy="affinity", replicas=4)
    loose = plan_placement(stats, 4, policy="affinity", replicas=4, load_tolerance=0.05)
    _check_slots(affinity, 4)
    for home in ("data-parallel", "chained"):
        base = simulate(balanced, stats, home=home).a2a_bytes.sum()
        assert simulate(affinity, stats, home=home).a2a_bytes.sum() < base
        assert simulate(loose, stats, home=home).a2a_bytes.sum() < 0.95 * base
    assert simulate(affinity, stats).balance.min() >= simulate(balanced, stats).balance.min() - 1e-12
    assert simulate(loose, stats).balance.min() >= simulate(balanced, stats).balance.min() / 1.05 - 1e-9


def test_simulator_numbers_by_hand():
    # 2 devices, experts {0,1} on device 0 and {2,3} on device 1; 10 tokens pick (0,1), 6 pick (0,2).
    co = np.zeros((1, 4, 4))
    co[0, 0, 1] = co[0, 1, 0] = 10
    co[0, 0, 2] = co[0, 2, 0] = 6
    stats = _stats([[16, 10, 6, 0]], coselect=co, tokens=16)
    plan = Plan(num_devices=2, layer_names=["l0"], num_experts=4, layers=[[[0, 1], [2, 3]]])
    sim = simulate(plan, stats)
    assert sim.device_load.tolist() == [[26.0, 6.0]]
    assert sim.balance[0] == pytest.approx(16 / 26)
    # device 0 gets 16 token copies (the 10 (0,1) tokens once), device 1 gets 6; half are remote; 8 bytes each
    assert sim.device_bytes[0].tolist() == [pytest.approx(16 * 0.5 * 8), pytest.approx(6 * 0.5 * 8)]


def test_chained_traffic_counts_transitions_across_devices():
    trans = np.zeros((1, 2, 2))
    trans[0, 0, 0] = 10  # expert 0 -> expert 0 of the next layer, 10 tokens
    trans[0, 1, 1] = 4
    stats = _stats([[10, 4], [10, 4]], transitions=trans, tokens=14)
    same = Plan(2, ["a", "b"], 2, [[[0], [1]], [[0], [1]]])
    crossed = Plan(2, ["a", "b"], 2, [[[0], [1]], [[1], [0]]])
    assert simulate(same, stats, home="chained").a2a_bytes[1] == 0
    assert simulate(crossed, stats, home="chained").a2a_bytes[1] == pytest.approx(14 * 8)
    # the planner's device alignment finds the aligned labelling by itself
    plan = plan_placement(stats, 2, policy="affinity", replicas=0)
    assert simulate(plan, stats, home="chained").a2a_bytes[1] == 0


def test_custom_policy_function_and_its_errors():
    stats = _stats([[5, 5, 5, 5]])
    plan = plan_placement(stats, 2, policy=lambda layer, e: [0, 1] if e == 0 else e % 2)
    assert plan.layers[0] == [[0, 2], [0, 1, 3]] and plan.replicas(0) == [2, 1, 1, 1]
    with pytest.raises(PlacementError, match=r"on device 7; devices are 0\.\.1"):
        plan_placement(stats, 2, policy=lambda layer, e: 7)
    with pytest.raises(PlacementError, match="on no device"):
        plan_placement(stats, 2, policy=lambda layer, e: [])


def test_more_devices_than_experts_needs_replication():
    stats = _stats([[5, 1, 1, 1]])
    with pytest.raises(PlacementError, match=r"8 devices but only 4 experts.*--replicas 4"):
        plan_placement(stats, 8, policy="balanced", replicas=0)
    plan = plan_placement(stats, 8, policy="balanced")  # default: replicas fill the devices
    assert all(len(d) == 1 for d in plan.layers[0]) and plan.replicas(0)[0] >= 4


def test_memory_capacity_is_checked_with_numbers():
    stats = _stats([[5, 5, 5, 5]] * 2)  # 1000 B shared + 100 B per expert; 2 layers x 2 experts per device
    plan_placement(stats, 2, policy="balanced", device_memory=1400)
    with pytest.raises(PlacementError, match=r"device 0 needs 1.37 KiB \(1400 B\) \(1000 B shared weights \+ 4 experts\) but has 1.37 KiB \(1399 B\)"):
        plan_placement(stats, 2, policy="balanced", device_memory=1399)
    with pytest.raises(PlacementError, match="3 device memory sizes for 2 devices"):
        plan_placement(stats, 2, device_memory=[1, 2, 3])


def _converted(num_experts=8, router="topk"):
    model, inputs = stack_of_mlps()
    return moefx.convert(model, moefx.MoEConfig(router=router, num_experts=num_experts, top_k=2, init="random"), inputs)


def test_record_stats_counts_loads_coselection_and_transitions():
    moe = _converted()
    stats = record_stats(moe, calibration_batches(moe, None))
    assert stats.num_layers == 3 and stats.num_experts == 8
    assert stats.tokens.tolist() == [10, 10, 10]  # 2 x 5 tokens
    assert stats.loads.sum(1).tolist() == [20, 20, 20]  # top-2, dropless
    assert np.allclose(stats.coselect, stats.coselect.transpose(0, 2, 1))
    assert stats.coselect.sum() == 3 * 10 * 2  # one pair per token, counted (i, j) and (j, i)
    assert stats.transitions.sum() == 2 * 10 * 4  # k x k pairs per token per layer pair
    assert stats.dispatch_bytes.tolist() == [64] * 3 and stats.expert_bytes[0] > 0
    soft = _converted(router="soft")
    soft_stats = record_stats(soft, calibration_batches(soft, None))
    assert np.allclose(soft_stats.loads, soft_stats.loads[:, :1])  # every expert processes the same slots


def test_record_stats_leaves_out_padding_only_where_the_mask_lines_up_with_the_layer_input():
    """A [batch, seq] mask of real tokens drops padding from the counts when the layer sees [batch, seq, H];
    a layer that sees [seq, batch, H] (seq-first) has as many tokens, but the mask does not line up: all count."""
    moe = _converted()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False  # 3 padding tokens of 10
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    stats = record_stats(moe, [((x,), {}, mask)])
    assert stats.tokens.tolist() == [7, 7, 7] and stats.loads.sum(1).tolist() == [14, 14, 14]
    real_only = record_stats(moe, [((x[mask][None],), {})])  # the toy model routes each token on its own
    assert np.array_equal(stats.loads, real_only.loads) and np.array_equal(stats.coselect, real_only.coselect)
    seq_first = record_stats(moe, [((x.transpose(0, 1),), {}, mask)])
    assert seq_first.tokens.tolist() == [10, 10, 10]


def test_a_failure_in_the_counting_itself_is_not_blamed_on_the_data(monkeypatch):
    """An exception in record_stats' own router hook is a bug: it surfaces as itself, not as the calibration
    batch having failed in the model (which tells the user to fix their data)."""
    import moefx.placement.stats as stats_module

    moe = _converted()

    def broken_bincount(*args, **kwargs):
        raise ValueError("boom in the counting")

    monkeypatch.setattr(stats_module.np, "bincount", broken_bincount)
    with pytest.raises(ValueError, match="boom in the counting"):
        record_stats(moe, calibration_batches(moe, None))


def test_plan_round_trip_and_model_check(tmp_path):
    moe = _converted()
    stats = record_stats(moe, calibration_batches(moe, None))
    plan = plan_placement(stats, 2, fingerprint=model_fingerprint(moe))
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.layers == plan.layers and again.fingerprint == plan.fingerprint
    assert again.predicted["balance_mean"] == plan.predicted["balance_mean"]
    again.check_model(moe)
    with pytest.raises(PlanMismatchError, match="the plan was made for another model"):
        again.check_model(_converted(num_experts=4))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(PlanMismatchError, match="not a moefx plan"):
        Plan.load(tmp_path / "bad.json")


def test_plan_png_is_written(tmp_path):
    stats = synthetic_stats(4, 16, tokens=512, seed=0)
    plan = plan_placement(stats, 4)
    plan.render_png(tmp_path / "plan.png", stats)
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_import_moefx_does_not_load_networkx_or_matplotlib():
    code = "import sys, moefx, moefx.placement; print('networkx' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_partition_writes_plan_and_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out, plan_dir = tmp_path / "out", tmp_path / "plan"
    assert cli_main(["convert", "toy_models:stack_of_mlps", "--experts", "8", "--init", "random", "-o", str(out), "-q"]) == 0
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(6, 5, 16), calib)
    assert cli_main(["partition", str(out), "--devices", "4", "--calib", str(calib), "-o", str(plan_dir), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "3 MoE layers on 4 devices" in printed
    # the recorded example inputs (2 examples) cannot be split over 4 ranks: the printed command says so
    assert f"-m moefx.run {plan_dir} --inputs EXAMPLES.pt" in printed and "hold 2 example(s)" in printed
    names = sorted(p.name for p in plan_dir.iterdir())
    assert {"plan.json", "plan.png", "partition.json", "stats.npz", "recipe.json"} <= set(names)
    assert [n for n in names if n.startswith("rank-")] == [f"rank-0000{r}-of-00004.safetensors" for r in range(4)]
    plan = Plan.load(plan_dir / "plan.json")
    assert plan.num_devices == 4 and len(plan.predicted["device_load"]) == 3
    from safetensors.torch import load_file

    shard = load_file(str(plan_dir / "rank-00002-of-00004.safetensors"))
    assert shard["blocks.0.ffn.experts.w1"].shape[0] == len(plan.layers[0][2])  # only its own experts
    assert "blocks.0.norm.weight" in shard  # replicated non-expert weights
    # user errors: one line, exit code 2
    assert cli_main(["partition", str(out), "--devices", "16", "--no-replication", "-o", str(tmp_path / "p2")]) == 2
    assert "16 devices but only 8 experts" in capsys.readouterr().err
    assert cli_main(["partition", str(out), "--devices", "2", "-o", str(plan_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["partition", str(out), "--devices", "2", "--calib", str(tmp_path / "nope.pt"),
                     "-o", str(tmp_path / "p3")]) == 2
    assert "no such calibration file" in capsys.readouterr().err
