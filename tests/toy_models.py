"""Small plain-PyTorch models (and factories for the CLI's package.module:factory form) used by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d=16, h=32, act=None, bias=True, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias)
        self.act = act if act is not None else nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class GatedMLP(nn.Module):
    def __init__(self, d=16, h=32, act=F.silu, bias=False):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=bias)
        self.up = nn.Linear(d, h, bias=bias)
        self.down = nn.Linear(h, d, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class FusedGatedMLP(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block around any FFN module."""

    def __init__(self, ffn: nn.Module, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn = ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ReusedHidden(nn.Module):
    """Not a pure FFN: the hidden activation also feeds a side output."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.side = nn.Linear(h, 1)

    def forward(self, x):
        hidden = F.gelu(self.fc1(x))
        return self.fc2(hidden) + self.side(hidden)


class NoFFN(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.proj(x))


class DataDependentFFN(nn.Module):
    """An FFN inside a module that neither symbolic_trace nor torch.export can capture."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if h.sum().item() > 1e9:  # data-dependent Python control flow
            h = h * 0
        return self.fc2(h)


def stack_of_mlps():
    torch.manual_seed(0)
    model = Stack([Block(MLP()) for _ in range(3)]).eval()
    return model, (torch.randn(2, 5, 16),)


def no_ffn():
    return NoFFN().eval(), (torch.randn(2, 5, 16),)


def untraceable():
    torch.manual_seed(0)
    return Stack([Block(DataDependentFFN())]).eval(), (torch.randn(2, 5, 16),)


def reused_hidden():
    return Stack([Block(ReusedHidden())]).eval(), (torch.randn(2, 5, 16),)


def nan_weights():
    model, inputs = stack_of_mlps()
    with torch.no_grad():
        model.blocks[1].ffn.fc1.weight[0, 0] = float("nan")
    return model, inputs


def non_finite_weights():
    """NaN in one FFN's up projection and Inf in another's down projection: converted as they are, with warnings."""
    model, inputs = stack_of_mlps()
    with torch.no_grad():
        model.blocks[0].ffn.fc1.weight[0, 0] = float("nan")
        model.blocks[2].ffn.fc2.weight[1, 1] = float("inf")
    return model, inputs


def raising_factory():
    raise RuntimeError("the checkpoint server is down")


class PatchMLP(nn.Module):
    """Patches of an image through a residual FFN that sits in the root module itself (its recipe name is '')."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.patch = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # [batch, patches, d]
        return x + self.fc2(F.gelu(self.fc1(x)))


def patch_mlp():
    torch.manual_seed(0)
    return PatchMLP().eval(), (torch.randn(2, 3, 16, 16),)
