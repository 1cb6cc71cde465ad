"""Fuzzed architectures: random small Transformer-like models, each converted, checked and exported.

For every generated model: the FFNs found are the FFNs built, upcycling is exact, and the fused ONNX export
runs in ONNX Runtime with the converted model's output. ``--hypothesis-profile thorough`` runs hundreds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import moefx

ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class FuzzFFN(nn.Module):
    def __init__(self, d, inter, act, bias, gated, fused):
        super().__init__()
        self.act, self.gated, self.fused = ACTS[act], gated, fused
        if gated and fused:
            self.gate_up = nn.Linear(d, 2 * inter, bias=bias)
        else:
            self.up = nn.Linear(d, inter, bias=bias)
            if gated:
                self.gate = nn.Linear(d, inter, bias=bias)
        self.down = nn.Linear(inter, d, bias=bias)

    def forward(self, x):
        if self.gated and self.fused:
            g, u = self.gate_up(x).chunk(2, dim=-1)
            return self.down(self.act(g) * u)
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class FuzzBlock(nn.Module):
    def __init__(self, d, ffn, pre_norm, heads):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads
        self.ffn = ffn

    def attention(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attention(self.norm1(x))
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ffn(x))


class FuzzModel(nn.Module):
    def __init__(self, spec):
        super().__init__()
        d, vocab = spec["d"], 50
        self.embed = nn.Embedding(vocab, d)
        ffns = [FuzzFFN(d, spec["inter"], spec["act"], spec["bias"], spec["gated"], spec["fused"])
                for _ in range(spec["depth"])]
        if spec["shared"] and len(ffns) > 1:
            ffns[-1] = ffns[0]  # one FFN module used by two blocks
        self.blocks = nn.ModuleList(FuzzBlock(d, f, spec["pre_norm"], 2) for f in ffns)
        self.head = nn.Linear(d, vocab, bias=False)
        if spec["tied"]:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


specs = st.fixed_dictionaries({
    "depth": st.integers(1, 3),
    "d": st.sampled_from([8, 12, 16]),
    "inter": st.integers(4, 40),
    "act": st.sampled_from(sorted(ACTS)),
    "bias": st.booleans(),
    "gated": st.booleans(),
    "fused": st.booleans(),
    "pre_norm": st.booleans(),
    "shared": st.booleans(),
    "tied": st.booleans(),
    "experts": st.integers(1, 4),
    "seed": st.integers(0, 2**16),
})


def _build(spec):
    torch.manual_seed(spec["seed"])
    model = FuzzModel(spec).eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(spec["seed"]))
    return model, ids


def _distinct_ffns(model):
    return len({id(b.ffn) for b in model.blocks})


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs)
def test_fuzzed_model_converts_exactly(spec):
    model, ids = _build(spec)
    k = min(2, spec["experts"])
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=spec["experts"], top_k=k), example_inputs=(ids,))
    assert len(moefx.moe_layers(moe)) == _distinct_ffns(model)
    other = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(other), moe(other)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          max_examples=max(8, settings().max_examples // 10))  # exports are slow: a tenth of the profile
@given(spec=specs)
def test_fuzzed_model_exports_to_onnx_runtime(spec, tmp_path_factory):
    import onnxruntime as ort

    model, ids = _build(spec)
    k = min(2, spec["experts"])
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=spec["experts"], top_k=k), example_inputs=(ids,))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    moefx.export_onnx(moe, (ids,), path, verify=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        want = moe(other).numpy()
    # ORT's GELU is the tanh approximation (up to 4.7e-4 per activation); through up to three layers and the
    # vocabulary head its error grows with the logits (1.1e-3 at logits up to 15 was seen), so it scales with them.
    tolerance = max(1e-3, 2e-4 * float(abs(want).max())) if spec["act"] == "gelu" else 1e-4
    assert abs(got - want).max() <= tolerance
