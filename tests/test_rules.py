"""FFN detection: each rule and linear form matched (counts), exact after upcycling (numbers), near-misses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx.errors import NoFFNFoundError
from moefx.passes import FindFFNPass

from toy_models import MLP, Block, FusedGatedMLP, GatedMLP, ReusedHidden, Stack


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class NewGELU(nn.Module):  # GPT-2's spelled-out tanh approximation
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class FunctionalMLP(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(h, d) * 0.2)
        self.b1 = nn.Parameter(torch.randn(h) * 0.2)
        self.w2 = nn.Parameter(torch.randn(d, h) * 0.2)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2)


class AddmmMLP(nn.Module):
    """Conv1D-style: weights stored [in, out], ``addmm`` on flattened tokens, views around it."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, h) * 0.2)
        self.b1 = nn.Parameter(torch.randn(h) * 0.2)
        self.w2 = nn.Parameter(torch.randn(h, d) * 0.2)
        self.b2 = nn.Parameter(torch.randn(d) * 0.2)

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, x.size(-1)), self.w1).view(x.size()[:-1] + (self.w1.shape[1],))  # noqa: RUF005 (fx cannot unpack)
        h = F.gelu(h, approximate="tanh")
        return torch.addmm(self.b2, h.view(-1, h.size(-1)), self.w2).view(h.size()[:-1] + (self.w2.shape[1],))  # noqa: RUF005


class MmBiasMLP(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(h, d) * 0.2)
        self.b1 = nn.Parameter(torch.randn(h) * 0.2)
        self.w2 = nn.Parameter(torch.randn(d, h) * 0.2)
        self.b2 = nn.Parameter(torch.randn(d) * 0.2)

    def forward(self, x):  # x: [tokens, d]
        return torch.mm(F.silu(torch.mm(x, self.w1.t()) + self.b1), self.w2.t()) + self.b2


CASES = {
    "relu": (lambda: MLP(act=nn.ReLU()), "mlp", "relu"),
    "gelu": (lambda: MLP(act=nn.GELU()), "mlp", "gelu"),
    "gelu-tanh": (lambda: MLP(act=nn.GELU(approximate="tanh")), "mlp", "gelu_tanh"),
    "gelu-new-spelled-out": (lambda: MLP(act=NewGELU()), "mlp", "gelu_tanh"),
    "quick-gelu": (lambda: MLP(act=QuickGELU()), "mlp", "quick_gelu"),
    "silu": (lambda: MLP(act=nn.SiLU()), "mlp", "silu"),
    "no-bias": (lambda: MLP(act=nn.ReLU(), bias=False), "mlp", "relu"),
    "dropout": (lambda: MLP(act=nn.GELU(), dropout=0.1), "mlp", "gelu"),
    "swiglu": (lambda: GatedMLP(act=F.silu), "glu", "silu"),
    "geglu": (lambda: GatedMLP(act=F.gelu, bias=True), "glu", "gelu"),
    "fused-gate-up": (FusedGatedMLP, "fused-glu", "silu"),
    "functional-linear": (FunctionalMLP, "mlp", "relu"),
    "addmm-conv1d-style": (AddmmMLP, "mlp", "gelu_tanh"),
}


def _two_block_model(make_ffn):
    torch.manual_seed(0)
    return Stack([Block(make_ffn()), Block(make_ffn())]).eval()


@pytest.mark.parametrize("capture", ["symbolic_trace", "torch.export program"])
@pytest.mark.parametrize("case", list(CASES))
def test_rule_matches_and_upcycle_is_exact(case, capture):
    make, rule, activation = CASES[case]
    model = _two_block_model(make)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        dense = model(x)
    if capture == "torch.export program":
        model = torch.export.export(model, (torch.randn(2, 5, 16),),
                                    dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO, 2: None},)).module()
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(torch.randn(2, 5, 16),))
    layers = moefx.moe_layers(moe)
    assert len(layers) == 2
    info = moe.moefx_info.layers
    assert {d["rule"] for d in info} == {rule}
    assert {d["activation"] for d in info} == {activation}
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_mm_plus_bias_form():
    torch.manual_seed(0)
    model = MmBiasMLP().eval()
    x = torch.randn(6, 16)
    program = torch.export.export(model, (x,)).module()
    forms = set()
    FindFFNPass()(program)
    (match,) = program.meta["moefx.ffn_matches"]
    forms.update(match.forms)
    assert forms == {"aten.mm+bias"}
    moe = moefx.convert(program, moefx.MoEConfig(num_experts=2, top_k=2), example_inputs=(x,))
    torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-5)


def test_hidden_reused_elsewhere_is_not_converted_and_says_why():
    model = Stack([Block(ReusedHidden()), Block(MLP())]).eval()
    analysis = moefx.analyze(model, (torch.randn(2, 5, 16),))
    assert [f.name for f in analysis.ffns] == ["blocks.1.ffn"]
    reasons = [m.reason for m in analysis.near_misses if m.where.startswith("blocks.0")]
    assert any("not pure" in r and "side" in r for r in reasons), reasons


def test_unknown_activation_is_a_near_miss():
    model = Stack([Block(MLP(act=nn.LeakyReLU(0.3)))]).eval()
    analysis = moefx.analyze(model, (torch.randn(2, 5, 16),))
    assert analysis.ffns == []
    assert any("activation" in m.reason and "not one moefx knows" in m.reason for m in analysis.near_misses)


class _Head(nn.Module):
    """A pooler -> classifier pair: Linear-tanh-Linear, but it changes the width (16 -> 3)."""

    def __init__(self, d=16, labels=3):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.out = nn.Linear(d, labels)

    def forward(self, x):
        return self.out(torch.tanh(self.dense(x[:, 0])))


def test_a_head_that_changes_the_width_is_a_near_miss_not_an_ffn():
    model = nn.Sequential(Stack([Block(MLP())]), _Head()).eval()
    analysis = moefx.analyze(model, (torch.randn(2, 5, 16),))
    assert [f.name for f in analysis.ffns] == ["0.blocks.0.ffn"]
    reasons = [m.reason for m in analysis.near_misses if m.where.startswith("1")]
    assert any("maps 16 features to 3" in r and "head" in r for r in reasons), analysis.near_misses


class _OuterFFN(nn.Module):
    """FFN blocks, then an FFN of the model itself around them; ``traceable=False``: only torch.export
    captures it (a Python float of a tensor size)."""

    def __init__(self, traceable: bool, d=16):
        super().__init__()
        self.stack = Stack([Block(MLP()), Block(GatedMLP())])
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.traceable = traceable

    def forward(self, x):
        x = self.stack(x)
        scale = 1.0 if self.traceable else float(x.shape[0]) / x.shape[0]
        return x + scale * self.down(F.gelu(self.up(x)))


def test_an_ffn_around_converted_blocks_keeps_their_conversion():
    """The outer FFN's module was captured before the blocks inside it were converted: it is captured again
    around their MoE layers, so all three are converted (not the blocks silently undone)."""
    model = _OuterFFN(traceable=True).eval()
    x = torch.randn(2, 5, 16)
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=4), example_inputs=(x,))
    names = [n for n, _ in moefx.moe_layers(moe)]
    assert names == ["stack.blocks.0.ffn", "stack.blocks.1.ffn", "moe"], names
    assert [d["name"] for d in moe.moefx_info.layers] == ["stack.blocks.0.ffn", "stack.blocks.1.ffn", ""]
    assert moe.moefx_info.warnings == []
    torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-5)
    calls = []
    for _, layer in moefx.moe_layers(moe):
        layer.register_forward_hook(lambda *_: calls.append(1))
    moe(x)
    assert len(calls) == 3  # every converted layer runs


def test_an_ffn_only_torch_export_captures_around_converted_blocks_stays_dense_with_a_warning():
    model = _OuterFFN(traceable=False).eval()
    x = torch.randn(2, 5, 16)
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=4), example_inputs=(x,))
    assert [d["name"] for d in moe.moefx_info.layers] == ["stack.blocks.0.ffn", "stack.blocks.1.ffn"]
    assert len(moefx.moe_layers(moe)) == 2
    (warning,) = moe.moefx_info.warnings
    assert warning.startswith("(root): left dense") and "_OuterFFN" in warning
    torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-5)
    alone = moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=4, exclude="stack"), example_inputs=(x,))
    assert [d["name"] for d in alone.moefx_info.layers] == [""]
    torch.testing.assert_close(alone(x), model(x), rtol=1e-5, atol=1e-5)


def test_activation_probes_run_on_real_tensors_inside_a_trace():
    """A module recaptured while torch.export traces its parent names its activation from real probe
    values, not the fake tensors of the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moefx.activations import identify_activation, identify_gated_activation

    with FakeTensorMode():
        assert identify_activation(F.gelu) == "gelu"
        assert identify_gated_activation(lambda a, b: F.silu(a) * b) == ("silu", True)


@pytest.mark.parametrize("init", ["upcycle", "random", "lora"])
def test_a_model_on_the_meta_device_converts_and_runs_shape_only(init):
    """Meta tensors have shapes and no values: conversion, eval and train forwards (with the load-balancing
    loss) give meta outputs of the right shape; init='split', which needs the values, says so."""
    with torch.device("meta"):
        model = Stack([Block(MLP()), Block(GatedMLP())])
    x = torch.randn(2, 5, 16, device="meta")
    config = moefx.MoEConfig(num_experts=4, top_k=2, init=init, load_balance_weight=0.01)
    moe = moefx.convert(model, config, example_inputs=(x,))
    assert len(moefx.moe_layers(moe)) == 2
    assert moe.moefx_info.verification == {"compared": False, "reason": "meta tensors (shapes checked)"}
    for mode in (moe.eval, moe.train):
        mode()
        y = moe(x)
        assert y.is_meta and y.shape == x.shape
    assert moefx.aux_loss(moe).is_meta
    with pytest.raises(moefx.errors.ConfigError, match="meta device"):
        moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=2, init="split"), example_inputs=(x,))


def test_layer_selection_every_last_regex():
    model = Stack([Block(MLP()) for _ in range(6)]).eval()
    x = (torch.randn(2, 3, 16),)

    def converted(**sel):
        moe = moefx.convert(model, moefx.MoEConfig(num_experts=2, top_k=1, **sel), example_inputs=x)
        return [d["name"] for d in moe.moefx_info.layers]

    assert converted() == [f"blocks.{i}.ffn" for i in range(6)]
    assert converted(every=2) == ["blocks.1.ffn", "blocks.3.ffn", "blocks.5.ffn"]
    assert converted(last=2) == ["blocks.4.ffn", "blocks.5.ffn"]
    assert converted(layers=r"blocks\.[02]\.") == ["blocks.0.ffn", "blocks.2.ffn"]
    assert converted(every=2, last=3) == ["blocks.3.ffn", "blocks.5.ffn"]
    assert converted(exclude=r"blocks\.0\.") == [f"blocks.{i}.ffn" for i in range(1, 6)]
    with pytest.raises(moefx.MoefxError, match="matched none of the 6 FFNs"):
        converted(layers="nothing")


def test_without_example_inputs_symbolic_trace_still_finds_ffns():
    model = Stack([Block(MLP()), Block(GatedMLP())]).eval()
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=2, top_k=2))
    assert len(moefx.moe_layers(moe)) == 2
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-5)


def test_convert_does_not_modify_the_input_unless_inplace():
    model = Stack([Block(MLP())]).eval()
    moefx.convert(model, example_inputs=(torch.randn(2, 3, 16),))
    assert isinstance(model.blocks[0].ffn, MLP)
    moe = moefx.convert(model, example_inputs=(torch.randn(2, 3, 16),), inplace=True)
    assert moe is model and not isinstance(model.blocks[0].ffn, MLP)


def test_an_ffn_run_twice_in_one_call_is_a_near_miss_not_half_converted():
    """A block that applies its FFN to each half of the sequence: rewriting one application left the other dense.
    Neither is converted, and the near-miss says why."""

    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return x + torch.cat([self.down(torch.relu(self.up(half))) for half in x.chunk(2, dim=1)], dim=1)

    model = nn.Sequential(Halves(), Halves())
    x = torch.randn(2, 6, 16)
    with pytest.raises(NoFFNFoundError, match="its FFN runs more than once in one call of"):
        moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
