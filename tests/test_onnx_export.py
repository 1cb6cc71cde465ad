"""ONNX export: the graph has the expected nodes, ONNX Runtime agrees with torch, and the file is a real artefact.

Three layers, as for every export path: the translation chose what it should (one ``com.microsoft.MoE`` node
per fused layer, standard domains only when unfused, fallbacks named in the report), the numbers agree (ONNX
Runtime at a batch and sequence length other than the export's against the converted torch model), and the
file stands alone (onnx.checker, a fresh process without moefx).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moefx
from moefx.errors import MoefxError, OutputExistsError

from conftest import tiny_hf_model
from toy_models import MLP, Block, GatedMLP, Stack

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from moefx.onnx import OnnxExportError, export_onnx  # noqa: E402
from moefx.onnx.translations import (  # noqa: E402
    ATEN_TRANSLATIONS,
    GELU_APPROXIMATION,
    ONNX_ACTIVATIONS,
    TRANSLATIONS,
)

STANDARD_DOMAINS = {"", "ai.onnx"}
#: What a fused split layer may hold besides its one MoE node: the top-k that sets router_probs (no expert math).
ROUTING_OPS = {"com.microsoft::MoE", "Softmax", "TopK", "ScatterElements", "Expand", "Shape", "Concat", "Cast",
               "CastLike", "Constant"}


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_vs_torch(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Max abs difference between ONNX Runtime and the torch model over every float output.

    ``inputs["task_ids"]``, if there, is a graph input for ONNX Runtime and the ``moefx.task_ids`` context for torch.
    """
    sess = session(path)
    got = sess.run(None, {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})
    inputs = dict(inputs)
    tasks = inputs.pop("task_ids", None)
    with torch.no_grad(), (moefx.task_ids(tasks) if tasks is not None else contextlib.nullcontext()):
        out = model(**inputs, **({"use_cache": False} if "use_cache" in _params(model) else {}))
    want = [t for t in (out.values() if hasattr(out, "values") else out) if isinstance(t, torch.Tensor)]
    assert len(got) == len(want)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want) if w.is_floating_point())


def _params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def hf_inputs(name: str, batch: int, seq: int, seed: int, padded: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (batch, seq), generator=g)
    inputs = {"input_ids": ids}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        inputs["attention_mask"] = mask
    if name == "t5":
        inputs["decoder_input_ids"] = ids[:, : max(seq // 2, 1)]
    return inputs


def moe_nodes(model_proto) -> list:
    return [n for n in model_proto.graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]


def assert_no_per_expert_subgraphs(model_proto, num_experts: int) -> None:
    """Expert weights ([E, ...] initializers) feed only MoE nodes: no Gather/Slice per expert, no expert loop."""
    expert_weights = {i.name for i in model_proto.graph.initializer if len(i.dims) == 3 and i.dims[0] == num_experts}
    assert expert_weights
    for node in model_proto.graph.node:
        if expert_weights & set(node.input):
            assert (node.domain, node.op_type) == ("com.microsoft", "MoE"), node.op_type


def assert_standard_domains_only(model_proto) -> None:
    assert {n.domain for n in model_proto.graph.node} <= STANDARD_DOMAINS
    assert {o.domain for o in model_proto.opset_import} <= STANDARD_DOMAINS


def toy_model(ffn_factory, d: int = 16, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Stack([Block(ffn_factory(), d) for _ in range(layers)]).eval()


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x) ** 2


# ---------------------------------------------------------------------------------------------------------
# import cost, registry
# ---------------------------------------------------------------------------------------------------------


def test_import_moefx_does_not_import_onnx():
    code = ("import sys, moefx; heavy = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir', 'moefx.onnx') "
            "if m in sys.modules]; assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_activation_and_dispatch_op_has_a_translation():
    from moefx.activations import ACTIVATIONS

    assert set(ACTIVATIONS) <= set(ONNX_ACTIVATIONS)
    assert {torch.ops.moefx.topk_moe.default, torch.ops.moefx.moe_ffn.default} <= set(TRANSLATIONS)


class _StableSorts(nn.Module):
    def forward(self, x):
        return torch.argsort(x, dim=-1, descending=True, stable=True), torch.sort(x, dim=0, stable=True)


def test_stable_sort_translation_breaks_ties_like_torch(tmp_path):
    """Batch Priority Routing sorts with stable=True, which torch.onnx does not translate by itself."""
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 1.0, 2.0, 0.0], [2.0, 3.0, 1.0, 2.0, 0.0]])
    program = torch.onnx.export(_StableSorts().eval(), (x,), dynamo=True, custom_translation_table=ATEN_TRANSLATIONS,
                                verbose=False)
    program.save(str(tmp_path / "sort.onnx"))
    got = session(tmp_path / "sort.onnx").run(None, {"x": x.numpy()})
    order, (values, indices) = _StableSorts()(x)
    for g, w in zip(got, [order, values, indices]):
        np.testing.assert_array_equal(g, w.numpy())


# ---------------------------------------------------------------------------------------------------------
# Hugging Face models: parity with torch at new shapes, graph structure
# ---------------------------------------------------------------------------------------------------------

HF_CASES = [("gpt2", "upcycle"), ("gpt2", "random"), ("bert", "random"), ("llama", "upcycle"),
            ("llama", "random"), ("t5", "random"), ("gpt2", "split"), ("bert", "split"), ("llama", "split-shared"),
            ("t5", "split-shared")]

#: MoEConfig per init of the parity matrix; "split-shared": 6 routed experts + a shared expert of 2 groups.
INIT_CONFIGS = {
    "upcycle": {"num_experts": 4, "top_k": 2, "init": "upcycle"},
    "random": {"num_experts": 4, "top_k": 2, "init": "random"},
    "split": {"num_experts": 4, "top_k": 2, "init": "split"},
    "split-shared": {"num_experts": 6, "top_k": 2, "init": "split", "shared_experts": 2},
}


def fused_experts(init: str) -> int:
    """Experts of the fused node: a shared expert of s groups joins as s always-on experts."""
    config = INIT_CONFIGS[init]
    return config["num_experts"] + config.get("shared_experts", 0)


@pytest.fixture(scope="module")
def converted_hf():
    cache: dict[tuple[str, str, bool], nn.Module] = {}

    def get(name: str, init: str, padded: bool = False) -> nn.Module:
        if (name, init, padded) not in cache:
            dense = tiny_hf_model(name)
            model = moefx.convert(dense, moefx.MoEConfig(**INIT_CONFIGS[init]),
                                  example_kwargs=hf_inputs(name, 2, 8, seed=0, padded=padded))
            if init.startswith("split"):
                # Without calibration data the layer bias is the dense down bias (none in LLaMA and T5) and the
                # expert down biases (compensation) are zero: give both values, so the export must place them.
                g = torch.Generator().manual_seed(5)
                with torch.no_grad():
                    for _, layer in moefx.moe_layers(model):
                        assert layer.router.unit_weights and layer.bias is not None
                        assert (layer.shared is not None) == (init == "split-shared")
                        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
                        layer.experts.b2.copy_(torch.randn(layer.experts.b2.shape, generator=g) * 0.1)
            cache[name, init, padded] = model
        return cache[name, init, padded]

    return get


#: Split layers run unfused through the same moefx function as other assignments: one unfused case is enough.
HF_PARAMS = [pytest.param(n, i, fused, id=f"{n}-{i}-{'fused' if fused else 'unfused'}")
             for n, i in HF_CASES for fused in (True, False)
             if fused or not i.startswith("split") or (n, i) == ("t5", "split-shared")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "init", "fused"), HF_PARAMS)
def test_hf_model_matches_torch(converted_hf, tmp_path, name, init, fused):
    model = converted_hf(name, init)
    layers = moefx.moe_layers(model)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, None, path, fused=fused)

    proto = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    assert len(report.layers) == len(layers)
    if fused:
        assert all(layer.fused and layer.nodes["com.microsoft::MoE"] == 1 for layer in report.layers)
        if init.startswith("split"):  # the router's own top-k picks which experts get router_probs 0
            assert all(set(layer.nodes) <= ROUTING_OPS for layer in report.layers), report.layers[0].nodes
        else:
            assert all(layer.nodes == {"com.microsoft::MoE": 1} for layer in report.layers)
        assert len(moe_nodes(proto)) == len(layers)
        assert_no_per_expert_subgraphs(proto, num_experts=fused_experts(init))
    elif init.startswith("split"):  # unit weights are an assignment: the moefx function, standard ops inside
        assert not any(layer.fused for layer in report.layers)
        assert {n.domain for n in proto.graph.node} <= STANDARD_DOMAINS | {"moefx"}
        assert {n.domain for f in proto.functions for n in f.node} <= STANDARD_DOMAINS
    else:
        assert not any(layer.fused for layer in report.layers)
        assert_standard_domains_only(proto)

    approximated = bool(report.approximations)
    assert approximated == (fused and name == "bert")  # only BERT has exact-GELU FFNs
    tolerance = 1e-3 if approximated else 1e-4
    assert report.verification["compared"] and report.verification["max_abs_error"] <= tolerance
    error = ort_vs_torch(path, model, hf_inputs(name, batch=3, seq=5, seed=1))  # export used batch 2, seq 8
    assert error <= tolerance, f"{name}/{init}: max abs error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_lora_layers_match_torch(tmp_path, name):
    """LoRA experts (frozen dense FFN + routed adapters, which no fused op covers) export as standard ops and
    match torch at new shapes, with adapters trained away from zero so that the routing matters."""
    dense = tiny_hf_model(name)
    model = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init="lora", lora_rank=3),
                          example_kwargs=hf_inputs(name, 2, 8, seed=0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in moefx.moe_layers(model):
            for adapter in (layer.up_b, layer.gate_up_b, layer.down_b):
                if adapter is not None:
                    adapter.copy_(torch.randn(adapter.shape, generator=g) * 0.2)
    inputs = hf_inputs(name, batch=3, seq=5, seed=1)
    with torch.no_grad():
        adapted = model(**inputs).logits
        baseline = dense(**inputs).logits
    assert (adapted - baseline).abs().max() > 1e-2  # the adapters change the output
    path = tmp_path / f"{name}-lora.onnx"
    report = export_onnx(model, None, path, fused=True)
    onnx.checker.check_model(str(path), full_check=True)
    assert len(report.layers) == len(moefx.moe_layers(model)) and not any(layer.fused for layer in report.layers)
    assert {layer.status for layer in report.layers} == {"unfused"}  # exported as standard ops, not "absent"
    assert all("adapters" in layer.lowering.method for layer in report.layers)
    assert_standard_domains_only(onnx.load(str(path)))
    error = ort_vs_torch(path, model, inputs)
    assert error <= 1e-4, f"{name}/lora: max abs error {error:.2e}"


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), QuickGELU(), nn.SiLU()],
                         ids=["gelu", "gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("init", ["upcycle", "split"])
def test_float16_standard_op_exports_run_in_onnx_runtime(tmp_path, act, init):
    """Half-precision models exported unfused (the moefx function / gathered top-k) and with gathered experts:
    activation constants in float16, and the ScatterND/ScatterElements additions (which ORT's CPU provider
    has no float16 kernel for) accumulated in float32; ORT matches torch."""
    model = toy_model(lambda: MLP(d=32, h=64, act=act), d=32)
    x = torch.randn(2, 5, 32)
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=4, top_k=2, init=init), example_inputs=(x,)).half()
    xh = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        want = moe(xh).float()
    for name, options in (("unfused", {"fused": False}), ("gather", {"gather_experts": True})):
        path = tmp_path / f"{name}.onnx"
        export_onnx(moe, (x.half(),), path, **options)
        got = torch.from_numpy(session(path).run(None, {"x": xh.numpy()})[0]).float()
        assert (got - want).abs().max() <= 1e-2 * max(1.0, float(want.abs().max())), name


def test_float16_lora_layers_run_in_onnx_runtime(tmp_path):
    """A half-precision LoRA model exports to ops ORT's CPU provider runs in float16 (its gate matrix is a
    one-hot sum: ORT has no float16 ScatterElements with reduction) and matches torch."""
    model = moefx.convert(tiny_hf_model("llama"), moefx.MoEConfig(num_experts=4, top_k=2, init="lora", lora_rank=3),
                          example_kwargs=hf_inputs("llama", 2, 8, seed=0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in moefx.moe_layers(model):
            for adapter in (layer.up_b, layer.gate_up_b, layer.down_b):
                adapter.copy_(torch.randn(adapter.shape, generator=g) * 0.2)
    model = model.half()
    path = tmp_path / "lora-f16.onnx"
    export_onnx(model, None, path)
    error = ort_vs_torch(path, model, hf_inputs("llama", batch=3, seq=5, seed=1))
    assert error <= 1e-2, f"float16 lora: max abs error {error:.2e}"


@pytest.mark.slow
def test_exact_keeps_exact_gelu_layers_unfused(converted_hf, tmp_path):
    model = converted_hf("bert", "random", padded=True)  # with an attention_mask input this time
    approximate = export_onnx(model, None, tmp_path / "approx.onnx")
    assert approximate.approximations == [GELU_APPROXIMATION]
    assert all(GELU_APPROXIMATION in layer.lowering.approximations for layer in approximate.layers)

    exact = export_onnx(model, None, tmp_path / "exact.onnx", exact=True)
    assert exact.approximations == []
    assert not any(layer.fused for layer in exact.layers)
    assert all("exact" in layer.lowering.reason for layer in exact.layers)
    assert moe_nodes(onnx.load(str(tmp_path / "exact.onnx"))) == []
    assert [i.name for i in session(tmp_path / "exact.onnx").get_inputs()] == ["input_ids", "attention_mask"]
    assert ort_vs_torch(tmp_path / "exact.onnx", model, hf_inputs("bert", 3, 5, seed=2, padded=True)) <= 1e-4
    assert ort_vs_torch(tmp_path / "approx.onnx", model, hf_inputs("bert", 3, 5, seed=2, padded=True)) <= 1e-3


def test_hf_model_converted_and_exported_with_positional_inputs(tmp_path):
    """BERT converted from positional ids, exported with the recorded inputs and with positional ones: its
    captured layers are primed with a padded mask either way (as with keyword inputs)."""
    ids = hf_inputs("bert", 2, 8, seed=0)["input_ids"]
    model = moefx.convert(tiny_hf_model("bert"), moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,))
    for name, inputs in (("recorded", None), ("positional", (ids,)), ("with-mask", (ids, torch.ones_like(ids)))):
        export_onnx(model, inputs, tmp_path / f"{name}.onnx")
        check = hf_inputs("bert", 3, 5, seed=2, padded=name == "with-mask")
        assert ort_vs_torch(tmp_path / f"{name}.onnx", model, check) <= 1e-3


@pytest.mark.slow
def test_runs_in_a_process_without_moefx(converted_hf, tmp_path):
    model = converted_hf("llama", "random")
    path = tmp_path / "llama.onnx"
    export_onnx(model, None, path)
    inputs = hf_inputs("llama", 1, 11, seed=3)
    np.save(tmp_path / "ids.npy", inputs["input_ids"].numpy())
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
        f"out = s.run(None, {{'input_ids': np.load({str(tmp_path / 'ids.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        "assert not [m for m in sys.modules if m.startswith('moefx') or m == 'torch'], 'imported moefx or torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits.numpy()
    assert np.abs(np.load(tmp_path / "out.npy") - want).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# every activation / gating variant: fused where ORT's kernel computes it, else unfused with a reason
# ---------------------------------------------------------------------------------------------------------

VARIANTS = {
    # id: (FFN factory, fused?, words the reason must contain when not fused)
    "relu": (lambda: MLP(act=nn.ReLU()), True, None),
    "gelu_tanh": (lambda: MLP(act=nn.GELU("tanh")), True, None),
    "silu-nobias": (lambda: MLP(act=nn.SiLU(), bias=False), True, None),
    "quick_gelu": (lambda: MLP(act=QuickGELU()), True, None),
    "swiglu": (lambda: GatedMLP(), True, None),
    "swiglu-bias": (lambda: GatedMLP(bias=True), True, None),
    "gated-quick_gelu": (lambda: GatedMLP(act=QuickGELU()), True, None),
    "geglu": (lambda: GatedMLP(act=nn.GELU()), False, "GeGLU"),
    "relu2": (lambda: MLP(act=SquaredReLU()), False, "relu2"),
    "tanh": (lambda: MLP(act=nn.Tanh()), False, "no such activation"),
    "gated-relu": (lambda: GatedMLP(act=nn.ReLU()), False, "no such activation"),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_activation_variants(tmp_path, variant):
    factory, fused, reason = VARIANTS[variant]
    model = toy_model(factory)
    config = moefx.MoEConfig(num_experts=4, top_k=2, init="random")
    moe = moefx.convert(model, config, torch.randn(2, 6, 16))
    report = export_onnx(moe, None, tmp_path / "toy.onnx")
    assert [layer.fused for layer in report.layers] == [fused, fused]
    if reason is not None:
        assert all(reason in layer.lowering.reason for layer in report.layers)
    x = torch.randn(3, 5, 16) * 3  # wide inputs reach the activations' tails
    sess = session(tmp_path / "toy.onnx")
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = moe(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(("top_k", "normalize"), [(1, False), (2, False), (4, False), (3, True)])
def test_routing_variants_fused(tmp_path, top_k, normalize):
    """Switch (k=1, raw gate), GShard-style raw top-2, all experts with raw softmax weights, renormalised top-3."""
    moe = moefx.convert(toy_model(GatedMLP), moefx.MoEConfig(num_experts=4, top_k=top_k, normalize_weights=normalize,
                                                               init="random"), torch.randn(2, 6, 16))
    report = export_onnx(moe, None, tmp_path / "toy.onnx")
    assert all(layer.fused for layer in report.layers)
    x = torch.randn(4, 3, 16)
    sess = session(tmp_path / "toy.onnx")
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - moe(x).numpy()).max() <= 1e-4


SPLIT_VARIANTS = {
    # id: (FFN factory, MoEConfig fields, fused?)
    "swiglu-bias-k3-shared1": (lambda: GatedMLP(bias=True), {"num_experts": 7, "top_k": 3, "shared_experts": 1}, True),
    "relu-k1": (lambda: MLP(act=nn.ReLU()), {"num_experts": 8, "top_k": 1}, True),
    "quick_gelu-shared3": (lambda: MLP(act=QuickGELU()), {"num_experts": 5, "top_k": 2, "shared_experts": 3}, True),
    "geglu-shared2": (lambda: GatedMLP(act=nn.GELU()), {"num_experts": 6, "top_k": 2, "shared_experts": 2}, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(SPLIT_VARIANTS))
def test_split_layer_variants(tmp_path, variant):
    """Unit weights with k = 1 and 3 (fc2 scaled by k + s), shared experts of 1 to 3 groups, biases; a layer
    ORT cannot run (GeGLU) falls back to the moefx function plus the shared expert and bias in standard ops."""
    factory, fields, fused = SPLIT_VARIANTS[variant]
    moe = moefx.convert(toy_model(factory), moefx.MoEConfig(init="split", **fields), torch.randn(2, 6, 16))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in moefx.moe_layers(moe):
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
            layer.experts.b2.copy_(torch.randn(layer.experts.b2.shape, generator=g))
    path = tmp_path / "split.onnx"
    report = export_onnx(moe, None, path)
    assert [layer.fused for layer in report.layers] == [fused, fused]
    proto = onnx.load(str(path))
    assert len(moe_nodes(proto)) == (2 if fused else 0)
    if fused:
        k = fields["top_k"] + fields.get("shared_experts", 0)
        assert all(layer.lowering.attributes["k"] == k for layer in report.layers)
        assert_no_per_expert_subgraphs(proto, num_experts=fields["num_experts"] + fields.get("shared_experts", 0))
    else:
        for layer in report.layers:
            calls = {op: n for op, n in layer.nodes.items() if op.startswith("moefx::")}
            assert "GeGLU" in layer.lowering.reason and list(calls.values()) == [1], layer.nodes
            assert next(iter(calls)).startswith("moefx::moe_ffn_gelu_gated")
    x = torch.randn(3, 5, 16) * 2
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - moe(x).numpy()).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# capacity factor: falls back to unfused (or fuses with log-weights when asked)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fuse_assigned", [False, True], ids=["fallback", "fuse-assigned"])
def test_capacity_factor_layer(tmp_path, fuse_assigned):
    config = moefx.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, init="random")
    moe = moefx.convert(toy_model(lambda: MLP(act=nn.SiLU())), config, torch.randn(2, 8, 16))
    path = tmp_path / "cap.onnx"
    report = export_onnx(moe, None, path, fuse_assigned=fuse_assigned)
    proto = onnx.load(str(path))
    if fuse_assigned:
        assert all(layer.fused and layer.nodes["com.microsoft::MoE"] == 1 for layer in report.layers)
        assert len(moe_nodes(proto)) == 2
    else:
        assert not any(layer.fused for layer in report.layers)
        assert all(layer.op == "moefx::moe_ffn" and "capacity" in layer.lowering.reason for layer in report.layers)
        assert moe_nodes(proto) == []
        assert "capacity" in report.render()
    x = torch.randn(3, 5, 16)  # 15 tokens, capacity ceil(15/4) = 4 per expert: drops
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = moe(x).numpy()
    assert all(layer.last_stats.dropped_fraction > 0 for _, layer in moefx.moe_layers(moe))
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["moefx-function", "gathered-topk"])
def test_float64_layers_run_in_onnx_runtime(tmp_path, capacity_factor):
    """Each expert's tokens are picked by NonZero over a bool mask: ORT's CPU provider has no float64 NonZero,
    so a mask of the weights' own dtype would not load. Both forms that pick tokens (the moefx function of a
    capacity-limited layer, the gathered unfused top-k) run in float64 and match torch."""
    config = moefx.MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor, init="random")
    moe = moefx.convert(toy_model(lambda: MLP(act=nn.SiLU())), config, torch.randn(2, 8, 16)).double()
    path = tmp_path / "f64.onnx"
    export_onnx(moe, (torch.randn(2, 8, 16, dtype=torch.float64),), path, fused=capacity_factor is not None)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = moe(x).numpy()
    assert got.dtype == np.float64 and np.abs(got - want).max() <= 1e-6  # routing weights are float32 in both


# ---------------------------------------------------------------------------------------------------------
# routers without an ORT kernel: one call of a model-local moefx function per layer
# ---------------------------------------------------------------------------------------------------------

ROUTER_CASES = [(name, router) for name in ("gpt2", "bert", "t5") for router in ("bpr", "expert-choice", "soft")]
ROUTER_PARAMS = [pytest.param(n, r, id=f"{n}-{r}", marks=[pytest.mark.slow] if n == "t5" else [])
                 for n, r in ROUTER_CASES]


def moefx_function_calls(model_proto) -> list:
    return [n for n in model_proto.graph.node if n.domain == "moefx"]


@pytest.mark.parametrize(("name", "router"), ROUTER_PARAMS)
def test_router_without_ort_kernel_exports_one_function_call_per_layer(tmp_path, name, router):
    extra = {"capacity_factor": 1.0} if router == "bpr" else {}
    if name in ("gpt2", "t5") and router in ("soft", "expert-choice"):
        extra["allow_noncausal"] = True  # token-mixing routers in a causal decoder (GPT-2, T5's decoder)
    config = moefx.MoEConfig(num_experts=4, top_k=2, init="random", router=router, **extra)
    model = moefx.convert(tiny_hf_model(name), config, example_kwargs=hf_inputs(name, 2, 8, seed=0))
    layers = moefx.moe_layers(model)
    path = tmp_path / f"{name}-{router}.onnx"
    report = export_onnx(model, None, path)

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    calls = moefx_function_calls(proto)
    assert len(calls) == len(layers) == (4 if name == "t5" else 2)  # T5: two encoder, two decoder FFNs
    functions = {(f.domain, f.name): f for f in proto.functions}
    assert {(n.domain, n.op_type) for n in calls} <= set(functions)
    assert all(f.domain == "moefx" and f.node for f in proto.functions)
    assert {n.domain for f in proto.functions for n in f.node} <= STANDARD_DOMAINS
    for function in proto.functions:  # each expert on its own tokens: one gather and scatter-add per expert
        ops = Counter(n.op_type for n in function.node)
        assert ops["NonZero"] == ops["ScatterND"] == 4 and "_e4" in function.name, (function.name, ops)
    assert {o.domain: o.version for o in proto.opset_import}["moefx"] == 1
    assert moe_nodes(proto) == []
    for layer in report.layers:
        assert not layer.fused and layer.op == "moefx::moe_ffn"
        assert layer.nodes == {f"moefx::{calls[0].op_type}": 1}
    assert report.verification["compared"] and report.verification["max_abs_error"] <= 1e-4
    # Soft and expert-choice slot counts depend on the sequence length: another batch at the export's
    # sequence length, then other lengths (the sequence axis stays dynamic).
    for batch, seq in ((3, 8), (3, 5), (1, 11)):
        error = ort_vs_torch(path, model, hf_inputs(name, batch, seq, seed=1))
        assert error <= 1e-4, f"{name}/{router} at batch {batch}, seq {seq}: max abs error {error:.2e}"


# ---------------------------------------------------------------------------------------------------------
# gather_experts: per-expert Gather + MatMul with constant weights (ORT pre-packs them)
# ---------------------------------------------------------------------------------------------------------

GATHER_CASES = [("llama", "random", {}), ("bert", "split-shared", {}),
                ("gpt2", "random", {"router": "soft", "allow_noncausal": True})]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "init", "extra"), GATHER_CASES, ids=[f"{n}-{i}-{e.get('router', 'topk')}"
                                                                        for n, i, e in GATHER_CASES])
def test_gather_experts_uses_constant_2d_weights_and_matches_torch(converted_hf, tmp_path, name, init, extra):
    if extra:
        config = moefx.MoEConfig(**{**INIT_CONFIGS[init], **extra})
        model = moefx.convert(tiny_hf_model(name), config, example_kwargs=hf_inputs(name, 2, 8, seed=0))
    else:
        model = converted_hf(name, init)
    path = tmp_path / "gather.onnx"
    report = export_onnx(model, None, path, gather_experts=True)
    proto = onnx.load(str(path))
    assert_standard_domains_only(proto)
    assert report.approximations == []  # erf GELU stays erf
    experts = moefx.moe_layers(model)[0][1].num_experts
    for layer in report.layers:
        assert not layer.fused and "gather_experts" in layer.lowering.reason
        assert layer.nodes["MatMul"] >= 2 * experts and layer.nodes["ScatterND"] == experts  # 2-3 per expert
    # Every MatMul that reads an expert weight reads a 2-D initializer (what ORT pre-packs), none a stacked bank.
    initializers = {i.name: list(i.dims) for i in proto.graph.initializer}
    weights = [node.input[1] for node in proto.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]
    assert len(weights) >= 2 * experts * len(report.layers)
    assert all(len(initializers[w]) == 2 for w in weights)
    assert not [dims for dims in initializers.values() if len(dims) == 3 and dims[0] == experts]
    assert report.verification["max_abs_error"] <= 1e-4
    for batch, seq in ((3, 5), (1, 11)):
        error = ort_vs_torch(path, model, hf_inputs(name, batch, seq, seed=1))
        assert error <= 1e-4, f"{name}/{init} at batch {batch}, seq {seq}: max abs error {error:.2e}"


# ---------------------------------------------------------------------------------------------------------
# task router: the task ids are a graph input
# ---------------------------------------------------------------------------------------------------------

TASK_CASES = [("llama", "example"), ("llama", "token"), ("gpt2", "example")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "per"), TASK_CASES, ids=[f"{n}-per-{p}" for n, p in TASK_CASES])
def test_task_router_takes_task_ids_as_a_graph_input(tmp_path, name, per):
    config = moefx.MoEConfig(router="task", num_tasks=3, num_experts=4, top_k=2, init="random", router_init_std=1.0)
    with moefx.task_ids(0):
        model = moefx.convert(tiny_hf_model(name), config, example_kwargs=hf_inputs(name, 2, 8, seed=0))
    path = tmp_path / "task.onnx"
    report = export_onnx(model, None, path, task_ids=per)
    assert all(layer.fused and layer.nodes == {"com.microsoft::MoE": 1} for layer in report.layers)
    assert any("task_ids" in note for note in report.notes)
    assert report.verification["compared"] and report.verification["max_abs_error"] <= 1e-4
    task_input = next(i for i in session(path).get_inputs() if i.name == "task_ids")
    assert task_input.type == "tensor(int64)" and len(task_input.shape) == (2 if per == "token" else 1)
    assert all(isinstance(d, str) for d in task_input.shape)  # dynamic batch (and sequence)
    ids_input = next(i for i in session(path).get_inputs() if i.name == "input_ids")
    assert task_input.shape == ids_input.shape[:len(task_input.shape)]  # the same symbols: one batch, one sequence

    inputs = hf_inputs(name, batch=3, seq=5, seed=1)  # export used batch 2, seq 8
    g = torch.Generator().manual_seed(2)
    cases = [torch.tensor([0, 1, 2]), torch.tensor([2, 2, 1]), torch.tensor([1, 0, 0])] if per == "example" else [
        torch.randint(0, 3, (3, 5), generator=g) for _ in range(2)]
    outputs = []
    for ids in cases:
        error = ort_vs_torch(path, model, {**inputs, "task_ids": ids})
        assert error <= 1e-4, f"task ids {ids.tolist()}: max abs error {error:.2e}"
        outputs.append(session(path).run(None, {k: v.numpy() for k, v in {**inputs, "task_ids": ids}.items()})[0])
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the ids really change the route
    for bad in (-1, 3):  # a task id out of range is an error, as in torch; -1 must not wrap around to task 2
        ids = torch.full_like(cases[0], bad)
        with pytest.raises(Exception, match="out of data bounds"):
            session(path).run(None, {k: v.numpy() for k, v in {**inputs, "task_ids": ids}.items()})


class _FlattensTokens(nn.Module):
    """Tokens flattened to [batch * seq, H] before the FFN: the MoE layer sees one group of all tokens."""

    def __init__(self):
        super().__init__()
        self.ffn = MLP(act=nn.ReLU())  # exact in the fused kernel (its GELU is the tanh approximation)

    def forward(self, x):
        return x + self.ffn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def test_per_token_task_ids_export_when_the_layer_sees_tokens_flattened(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    config = moefx.MoEConfig(router="task", num_tasks=3, num_experts=4, top_k=2, init="random", router_init_std=1.0)
    with moefx.task_ids(0):
        model = moefx.convert(_FlattensTokens().eval(), config, (x,))
    ids = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(1))
    report = export_onnx(model, (x,), tmp_path / "flat.onnx", task_ids=ids)
    assert report.verification["compared"] and report.verification["max_abs_error"] <= 1e-5
    other = torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(2))
    y = torch.randn(3, 4, 16)
    got = session(tmp_path / "flat.onnx").run(None, {"x": y.numpy(), "task_ids": other.numpy()})[0]
    with torch.no_grad(), moefx.task_ids(other):
        assert np.abs(got - model(y).numpy()).max() <= 1e-5


def test_task_ids_for_a_model_without_task_routers_is_an_error(tmp_path, small_moe):
    with pytest.raises(MoefxError, match="no task-routed MoE layer"):
        export_onnx(small_moe, None, tmp_path / "m.onnx", task_ids=[0, 1])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# the report, the file
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_json_and_table(tmp_path):
    moe = moefx.convert(toy_model(GatedMLP), moefx.MoEConfig(num_experts=4, top_k=2), torch.randn(2, 6, 16))
    report = export_onnx(moe, None, tmp_path / "toy.onnx", report_path=tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"] == {"moe_layers": 2, "fused": 2, "unfused": 0, "nodes": sum(data["op_counts"].values())}
    assert data["op_counts"]["com.microsoft::MoE"] == 2
    assert data["file_bytes"] == (tmp_path / "toy.onnx").stat().st_size
    assert [layer["name"] for layer in data["layers"]] == [name for name, _ in moefx.moe_layers(moe)]
    assert data["layers"][0]["attributes"]["activation_type"] == "swiglu"
    assert data["inputs"][0]["shape"][0] != 2 and data["inputs"][0]["shape"][1] != 6  # dynamic batch, sequence
    text = report.render()
    assert "2 of 2 MoE layer(s) fused" in text and "blocks.0.ffn" in text
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_external_data(tmp_path, monkeypatch):
    import moefx.onnx.export as export_module

    moe = moefx.convert(toy_model(GatedMLP), moefx.MoEConfig(num_experts=4, top_k=2), torch.randn(2, 6, 16))
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the weights were over 1.5 GiB
    report = export_onnx(moe, None, tmp_path / "big.onnx")
    assert report.data_path == str(tmp_path / "big.onnx.data") and (tmp_path / "big.onnx.data").exists()
    assert report.file_bytes > (tmp_path / "big.onnx").stat().st_size
    assert report.verification["max_abs_error"] <= 1e-4  # ONNX Runtime found the weights

    # Re-exported small with force: the stale data file goes.
    export_onnx(moe, None, tmp_path / "big.onnx", force=True, external_data=False)
    assert not (tmp_path / "big.onnx.data").exists()


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear error, nothing written
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_moe():
    return moefx.convert(toy_model(MLP, layers=1), moefx.MoEConfig(num_experts=2, top_k=1), torch.randn(2, 4, 16))


def test_unconverted_model_is_an_error(tmp_path):
    with pytest.raises(MoefxError, match="no MoE layers: convert it first"):
        export_onnx(toy_model(MLP), torch.randn(2, 4, 16), tmp_path / "dense.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["missing-dir", "parent-is-file", "read-only-fs", "is-a-directory"])
def test_unwritable_output_is_an_error(tmp_path, small_moe, where):
    (tmp_path / "file").write_text("")
    path = {"missing-dir": tmp_path / "nope" / "m.onnx", "parent-is-file": tmp_path / "file" / "m.onnx",
            "read-only-fs": Path("/proc/m.onnx"), "is-a-directory": tmp_path}[where]
    with pytest.raises(MoefxError) as info:
        export_onnx(small_moe, None, path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_existing_output_needs_force(tmp_path, small_moe):
    path = tmp_path / "m.onnx"
    path.write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(small_moe, None, path)
    assert path.read_text() == "old"
    export_onnx(small_moe, None, path, force=True)
    assert session(path).get_inputs()


class _DataDependent(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            x = x * 2
        return self.inner(x)


@pytest.mark.slow
def test_export_failure_leaves_existing_file_untouched(tmp_path, small_moe):
    path = tmp_path / "m.onnx"
    path.write_text("old")
    with pytest.raises(OnnxExportError, match=r"torch\.onnx\.export failed") as info:
        export_onnx(_DataDependent(small_moe), torch.randn(2, 4, 16), path, force=True)
    assert "\n" not in str(info.value)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOEFX_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moefx.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_bfloat16_model_is_refused_by_the_check_with_advice_and_exports_as_float16(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 kernels: the check says so in one line (exit 2, nothing
    written) and names the ways out, which both work: --dtype float16, and --no-verify (bfloat16 weights)."""
    from moefx.cli import main

    dense = tiny_hf_model("llama").to(torch.bfloat16)
    moefx.save(moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2)), tmp_path / "out")
    onnx_path = tmp_path / "m.onnx"
    result = run_cli("export", str(tmp_path / "out"), "-o", str(onnx_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot run this bfloat16 model" in result.stderr and "--dtype float16" in result.stderr
    assert not onnx_path.exists() and "a bug in moefx" not in result.stderr
    assert main(["export", str(tmp_path / "out"), "-o", str(onnx_path), "--dtype", "float16", "-q"]) == 0
    loaded = moefx.load(tmp_path / "out").to(torch.float16)
    assert ort_vs_torch(onnx_path, loaded, hf_inputs("llama", 2, 5, seed=1)) <= 5e-3
    assert main(["export", str(tmp_path / "out"), "-o", str(onnx_path), "--no-verify", "--force", "-q"]) == 0
    import onnx

    weights = onnx.load(str(onnx_path)).graph.initializer
    assert {w.data_type for w in weights if len(w.dims) == 2} == {onnx.TensorProto.BFLOAT16}  # the weights


@pytest.mark.slow
def test_cli_export_of_a_saved_model(tmp_path):
    moe = moefx.convert(tiny_hf_model("llama"), moefx.MoEConfig(num_experts=4, top_k=2, init="random"))
    moefx.save(moe, tmp_path / "out")
    onnx_path, report_path = tmp_path / "llama.onnx", tmp_path / "report.json"

    result = run_cli("export", str(tmp_path / "out"), "-o", str(onnx_path), "--json", str(report_path))
    assert result.returncode == 0, result.stderr
    assert "2 of 2 MoE layer(s) fused" in result.stdout and "model.layers.0.mlp" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["summary"]["fused"] == 2 and report["op_counts"]["com.microsoft::MoE"] == 2
    inputs = hf_inputs("llama", 3, 5, seed=4)
    assert ort_vs_torch(onnx_path, moefx.load(tmp_path / "out"), inputs) <= 1e-4

    result = run_cli("export", str(tmp_path / "out"), "-o", str(onnx_path))  # exists, no --force
    assert result.returncode == 2 and "--force" in result.stderr and "Traceback" not in result.stderr

    result = run_cli("export", str(tmp_path / "out"), "-o", str(onnx_path), "--unfused", "--force", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert_standard_domains_only(onnx.load(str(onnx_path)))

    result = run_cli("export", str(tmp_path / "out"), "-o", str(onnx_path), "--gather-experts", "--force")
    assert result.returncode == 0, result.stderr
    assert_standard_domains_only(onnx.load(str(onnx_path)))
    assert "gather_experts" in result.stdout


@pytest.mark.slow
def test_cli_rejects_an_unconverted_model(tmp_path):
    tiny_hf_model("gpt2").save_pretrained(tmp_path / "dense")
    result = run_cli("export", str(tmp_path / "dense"), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no MoE layers" in lines[0] and "moefx convert" in lines[0]
    assert not (tmp_path / "m.onnx").exists()
