"""End-to-end healing (moefx.distill, heal(end_to_end=True), `moefx heal --seconds`): it brings the model's
output closer to the dense model's, never leaves it further than it started, warns when the data is small,
merges LoRA adapters back, and the MoE op's gradients it trains through agree with the math."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import moefx
from moefx import MoEConfig, ops
from moefx.calibrate import calibration_batches
from moefx.distill import EndToEnd, distill, hold_out, tokens_needed
from moefx.layers import ExpertBank

from conftest import tiny_hf_model


def _ids(seed: int, rows: int, seq: int = 12) -> torch.Tensor:
    return torch.randint(1, 96, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _batches(model, ids: torch.Tensor, batch_size: int = 8) -> list:
    return list(calibration_batches(ids, model, model.moefx_info.inputs, batch_size=batch_size))


def _split_llama(top_k: int = 2):
    dense = tiny_hf_model("llama")
    return dense, moefx.convert(dense, MoEConfig(init="split", num_experts=8, top_k=top_k))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_distillation_lowers_the_held_out_kl_of_a_split_llama():
    dense, moe = _split_llama()
    batches = _batches(moe, _ids(0, 160))
    unseen = EndToEnd(dense, _batches(moe, _ids(1, 32)))
    assert unseen.objective == "causal-kl" and not unseen.recompute  # the head re-applied to cached hidden states
    before = unseen.error(moe)
    grads = [p.requires_grad for p in moe.parameters()]
    report = distill(moe, dense, batches, seconds=None, steps=40, what="experts", lr=1e-3)
    assert report["objective"] == "causal-kl" and report["kept"] and report["steps"] == 40
    assert report["error_after"] < 0.8 * report["error_before"], report
    assert unseen.error(moe) < 0.8 * before  # on data it never saw, too
    assert [p.requires_grad for p in moe.parameters()] == grads and not moe.training


@pytest.mark.slow
def test_distillation_is_deterministic_given_steps_and_seed():
    dense, moe = _split_llama()
    batches = _batches(moe, _ids(0, 48))
    a, b = copy.deepcopy(moe), copy.deepcopy(moe)
    distill(a, dense, batches, seconds=None, steps=12, what="experts", seed=3)
    distill(b, dense, batches, seconds=None, steps=12, what="experts", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_heal_end_to_end_keeps_each_stage_only_if_the_held_out_output_improves():
    dense, moe = _split_llama()
    report = moefx.heal(moe, _ids(0, 160), dense=dense, steps=20, end_to_end=True, seconds=None, distill_steps=30)
    *layers, whole = report
    assert [r["layer"] for r in layers] == [name for name, _ in moefx.moe_layers(moe)]
    assert whole["layer"] == "(end to end)" and whole["objective"] == "causal-kl"
    assert whole["error_after"] <= whole["error_before"]
    assert "distillation" in whole["kept"] and whole["error_after"] < whole["layer_wise_error"]
    assert moe.moefx_info.healing == report
    json.dumps(report)  # goes into report.json


def test_a_tiny_calibration_set_warns_and_never_makes_the_model_worse(caplog):
    """Six sentences: the warning says how much data is needed; an aggressive learning rate overfits, and the
    held-out check returns the start, so the model is no worse on data it never saw."""
    dense, moe = _split_llama()
    start = _state(moe)
    unseen = EndToEnd(dense, _batches(moe, _ids(7, 64)))
    before = unseen.error(moe)
    with caplog.at_level(logging.WARNING, logger="moefx"):
        report = distill(moe, dense, _batches(moe, _ids(0, 6), batch_size=2), seconds=None, steps=30,
                         what="experts", lr=0.3)
    warning, = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in warning
    assert f"72 tokens (6 examples, 24 tokens held out); healing what='experts' needs about {tokens_needed('experts')} " \
           "tokens (about 768 examples like these)" in warning, warning
    assert report["warnings"] == [warning.removeprefix("moefx: warning: ")]
    assert not report["kept"] and report["error_after"] == report["error_before"]
    assert all(torch.equal(start[k], v) for k, v in moe.state_dict().items())
    assert unseen.error(moe) == before


@pytest.mark.slow
@pytest.mark.parametrize("lr", [None, 0.3])
def test_heal_end_to_end_on_tiny_data_never_lowers_the_unseen_figure(lr):
    """The whole of heal(end_to_end=True) on 12 sentences: whatever it keeps, the model's output on data it
    never saw is not further from the dense model's than before healing."""
    dense, moe = _split_llama()
    unseen = EndToEnd(dense, _batches(moe, _ids(7, 64)))
    before = unseen.error(moe)
    report = moefx.heal(moe, _ids(0, 12), dense=dense, steps=20, end_to_end=True, seconds=None, distill_steps=20, lr=lr)
    assert report[-1]["error_after"] <= report[-1]["error_before"]
    assert unseen.error(moe) <= before * 1.02, (before, unseen.error(moe), report[-1])


def test_a_start_that_cannot_be_improved_comes_back_bit_exact():
    """Every expert active: the split model is the dense model, the objective 0 and no step can beat it."""
    dense, moe = _split_llama(top_k=8)
    start = _state(moe)
    report = moefx.heal(moe, _ids(0, 40), dense=dense, end_to_end=True, seconds=None, distill_steps=10)
    assert report[-1]["kept"] == [] and report[-1]["error_after"] == report[-1]["error_before"]
    assert all(torch.equal(start[k], v) for k, v in moe.state_dict().items())
    distill(moe, dense, _batches(moe, _ids(0, 40)), seconds=None, steps=10, what="lora")
    assert all(torch.equal(start[k], v) for k, v in moe.state_dict().items())


def test_lora_distillation_merges_back_and_saves_and_loads(tmp_path):
    dense = tiny_hf_model("bert")
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=6, top_k=2, shared_experts=2))
    names = set(moe.state_dict())
    unseen = EndToEnd(dense, _batches(moe, _ids(1, 32)))
    assert unseen.objective == "embedding"
    before = unseen.error(moe)
    report = distill(moe, dense, _batches(moe, _ids(0, 120)), seconds=None, steps=30, what="lora")
    assert report["what"] == "lora" and report["kept"]
    assert unseen.error(moe) < before
    banks = [m for m in moe.modules() if isinstance(m, ExpertBank) or parametrize.is_parametrized(m)]
    assert banks and all(type(m) is ExpertBank and not parametrize.is_parametrized(m) for m in banks)
    assert set(moe.state_dict()) == names
    moefx.save(moe, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out", model=tiny_hf_model("bert"))
    ids = _ids(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, moe(input_ids=ids).last_hidden_state)


def test_what_auto_picks_lora_for_small_data_and_experts_for_enough():
    dense, moe = _split_llama()
    small = distill(copy.deepcopy(moe), dense, _batches(moe, _ids(0, 40)), seconds=None, steps=2)
    large = distill(copy.deepcopy(moe), dense, _batches(moe, _ids(0, 800, seq=12), batch_size=64), seconds=None, steps=2)
    assert (small["what"], large["what"]) == ("lora", "experts")
    assert not large["warnings"]


def test_hold_out_is_a_deterministic_tenth_and_cuts_a_single_batch_by_rows():
    batches = [((), {"input_ids": torch.full((2, 3), i)}, None) for i in range(25)]
    train, held = hold_out(batches)
    assert [int(b[1]["input_ids"][0, 0]) for b in held] == [9, 19]
    assert len(train) == 23
    assert len(hold_out(batches[:4])[1]) == 1 and hold_out(batches[:4])[1][0] is batches[3]
    one = ((), {"input_ids": torch.arange(20).view(10, 2)}, torch.ones(10, 2, dtype=torch.bool))
    (train_batch,), (held_batch,) = hold_out([one])
    assert train_batch[1]["input_ids"].shape[0] == 9 and held_batch[1]["input_ids"].tolist() == [[18, 19]]
    assert held_batch[2].shape == (1, 2)
    with pytest.raises(moefx.MoefxError, match="at least 2 calibration examples"):
        hold_out([((), {"input_ids": torch.ones(1, 3, dtype=torch.long)}, None)])


def test_the_moe_ops_gradients_agree_with_the_math():
    """Distillation trains through moefx::topk_moe: its gradients (the reference, differentiated) against a
    per-token sum over the chosen experts written from the math."""
    g = torch.Generator().manual_seed(0)
    experts, hidden, size, tokens, k = 5, 8, 6, 30, 2
    w1, w3 = (torch.randn(experts, size, hidden, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    w2 = torch.randn(experts, hidden, size, generator=g, dtype=torch.float64).requires_grad_()
    b2 = torch.randn(experts, hidden, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).requires_grad_()
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64).requires_grad_()
    probe = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    leaves = [x, logits, w1, w3, w2, b2]
    got = torch.autograd.grad((ops.topk_moe(x, logits, w1, None, w3, None, w2, b2, k, True, "silu") * probe).sum(),
                              leaves)
    top, index = torch.topk(logits, k, dim=-1)
    weight = torch.softmax(top, dim=-1)
    rows = []
    for t in range(tokens):
        out = 0
        for j in range(k):
            e = int(index[t, j])
            out = out + weight[t, j] * (w2[e] @ (F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])) + b2[e])
        rows.append(out)
    want = torch.autograd.grad((torch.stack(rows) * probe).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the routing runs in float32


def test_heal_from_the_cli_with_a_time_budget(tmp_path, capsys):
    from moefx.cli import main

    tiny_hf_model("llama").save_pretrained(tmp_path / "llama")
    torch.save(_ids(0, 64), tmp_path / "calib.pt")
    assert main(["convert", str(tmp_path / "llama"), "--init", "split", "--experts", "8", "--top-k", "2",
                 "-o", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["heal", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.pt"), "--steps", "10",
                 "--seconds", "60", "--distill-steps", "10", "-o", str(tmp_path / "healed"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "end to end (held-out causal-kl): " in out and "10 distillation steps" in out, out
    recipe = json.loads((tmp_path / "healed" / "report.json").read_text())
    assert recipe["healing"][-1]["layer"] == "(end to end)"
    with pytest.raises(SystemExit):
        main(["heal", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.pt"), "--seconds", "1", "--minutes",
              "1", "-o", str(tmp_path / "x")])
