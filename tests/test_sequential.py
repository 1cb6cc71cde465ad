"""Fitting layers in order on the converted model's own inputs (moefx.calibrate.fit_in_order), and convert's
sequential refit of split layers built on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moefx
from moefx.calibrate import fit_in_order
from moefx.errors import CalibrationError

from conftest import tiny_hf_model
from toy_models import MLP, Block, Stack


def _stack(blocks: int = 3, d: int = 8) -> Stack:
    torch.manual_seed(0)
    return Stack([Block(MLP(d, 16), d) for _ in range(blocks)]).eval()


def test_each_module_is_fitted_on_what_the_modules_fitted_before_it_give_it():
    model = _stack()
    names = [f"blocks.{i}.ffn" for i in range(3)]
    batches = [((torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)),), {}, None) for i in range(4)]
    seen: dict[str, torch.Tensor] = {}

    def fit(name: str, x: torch.Tensor) -> None:
        seen[name] = x.clone()
        with torch.no_grad():  # a change that moves every later module's inputs
            model.get_submodule(name).fc2.weight.mul_(3.0)

    assert fit_in_order(model, names, batches, fit) == names
    # Independent reference: with every fit applied, a plain forward pass gives each module exactly the
    # inputs it was fitted on (a module's own fit never changes its own inputs), batches in order.
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: recorded[n].append(a[0]))
             for n in names]
    with torch.no_grad():
        for args, _, _ in batches:
            model(*args)
    for h in hooks:
        h.remove()
    for n in names:
        expected = torch.cat([x.reshape(-1, 8) for x in recorded[n]])
        torch.testing.assert_close(seen[n], expected)
    # And they differ from the dense model's inputs after the first module (the fits moved them).
    assert not torch.allclose(seen[names[2]], torch.cat([b[0][0] for b in batches]).reshape(-1, 8))


def test_a_fit_that_runs_its_module_is_called_once_with_every_row():
    model = _stack(2)
    batches = [((torch.randn(2, 5, 8),), {}, None) for _ in range(3)]
    calls: list[tuple[str, int]] = []

    def fit(name: str, x: torch.Tensor) -> None:
        calls.append((name, x.shape[0]))
        model.get_submodule(name)(x[:7])  # judging the fit runs the module: no new rows, no second fit

    fit_in_order(model, ["blocks.0.ffn", "blocks.1.ffn"], batches, fit)
    assert calls == [("blocks.0.ffn", 30), ("blocks.1.ffn", 30)]


def test_padding_tokens_are_left_out_and_unreached_modules_not_fitted():
    model = _stack(2)
    mask = torch.tensor([[True, True, False]])
    batches = [((torch.randn(1, 3, 8),), {}, mask), ((torch.randn(1, 3, 8),), {}, None)]
    sizes = {}
    fitted = fit_in_order(model, ["blocks.0.ffn", "blocks.1.ffn", "blocks.1.norm"], batches,
                          lambda name, x: sizes.setdefault(name, x.shape[0]))
    assert sizes == {"blocks.0.ffn": 5, "blocks.1.ffn": 5, "blocks.1.norm": 5}
    assert fitted == ["blocks.0.ffn", "blocks.1.norm", "blocks.1.ffn"]  # in the order they are reached
    assert fit_in_order(model, ["blocks.0.ffn"], [], lambda name, x: None) == []


def test_a_failing_fit_or_batch_stops_every_pass_and_raises_once():
    model = _stack()
    batches = [((torch.randn(1, 4, 8),), {}, None) for _ in range(5)]

    def fit(name, x):
        if name == "blocks.1.ffn":
            raise ValueError("no fit")

    with pytest.raises(ValueError, match="no fit"):
        fit_in_order(model, ["blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn"], batches, fit)
    bad = [*batches, ((torch.randn(1, 4, 7),), {}, None)]  # the wrong width fails inside the model
    with pytest.raises(CalibrationError, match="batch 5 failed in the model"):
        fit_in_order(model, ["blocks.0.ffn", "blocks.1.ffn"], bad, lambda name, x: None)
    assert model.training is False and not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_sequential_refit_brings_a_split_llama_closer_to_the_dense_model():
    dense = tiny_hf_model("llama")
    vocab = dense.config.vocab_size
    calib = torch.randint(0, vocab, (48, 24), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, vocab, (16, 24), generator=torch.Generator().manual_seed(1))
    config = moefx.MoEConfig(init="split", num_experts=4, top_k=1)
    plain = moefx.convert(dense, config, calib=calib, sequential=False)
    refit = moefx.convert(dense, config, calib=calib)
    assert all("refit" not in d for d in plain.moefx_info.layers)
    assert all(d["refit"]["error_after"] <= d["refit"]["error_before"] for d in refit.moefx_info.layers)
    kl_plain = moefx.evaluate(plain, held_out, dense=dense).metrics["kl"]
    kl_refit = moefx.evaluate(refit, held_out, dense=dense).metrics["kl"]
    assert kl_refit < 0.9 * kl_plain, (kl_plain, kl_refit)


def test_every_expert_active_stays_exact_with_the_refit():
    dense = tiny_hf_model("llama")
    calib = torch.randint(0, dense.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    moe = moefx.convert(dense, moefx.MoEConfig(init="split", num_experts=4, top_k=4), calib=calib)
    x = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, nn.Module) for _, m in moefx.moe_layers(moe))
