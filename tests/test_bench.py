"""moefx bench: FLOP and parameter counts on hand-computed examples, the eager fast path, the report, the CLI.

No timing assertions: latencies on a shared machine are noise; the benchmark scripts print ratios instead.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx import ops
from moefx.bench import (
    BenchReport,
    Measurement,
    Speedup,
    Timing,
    count_onnx,
    count_torch,
    interleaved,
    run_bench,
)
from moefx.bench.runners import onnx_feed, ort_session
from moefx.errors import ConfigError, ModelLoadError
from moefx.layers import ExpertBank, MoELayer
from moefx.routers import build_router
from moefx.sources import load_source

TESTS = Path(__file__).parent
E, H, I, O = 4, 8, 12, 8  # experts, hidden, expert inter, out


def _moe_layer(router: str = "topk", *, gated: bool = True, bias: bool = False, seed: int = 0, **config) -> MoELayer:
    cfg = moefx.MoEConfig(router=router, num_experts=E, top_k=2, allow_noncausal=True, **config)
    bank = ExpertBank(E, H, I, O, "silu", gated=gated, up_bias=bias, down_bias=bias)
    module = build_router(H, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*bank.parameters(), *module.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return MoELayer(module, bank).eval()


# ---------------------------------------------------------------------------------------------------------
# counting: hand-computed examples
# ---------------------------------------------------------------------------------------------------------


def test_dense_mlp_flops_and_params():
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    cost = count_torch(mlp, (torch.randn(2, 5, 8),))
    assert cost.tokens == 10
    assert cost.params == 8 * 32 + 32 + 32 * 8 + 8 == 552
    assert cost.active_params_per_token == 552
    assert cost.flops_per_token == 2 * 8 * 32 + 2 * 32 * 8 == 1024  # per token: two GEMM rows


class _Attention(nn.Module):
    """Self-attention through ``scaled_dot_product_attention``: 4 query heads, ``kv_heads`` key/value heads."""

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.qkv = nn.Linear(16, 32 + 2 * 8 * kv_heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([32, 8 * self.kv_heads, 8 * self.kv_heads], dim=-1)
        q = q.view(b, s, 4, 8).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, 8).transpose(1, 2) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != 4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_flops_are_counted(kv_heads):
    """scaled_dot_product_attention on CPU (which PyTorch's counter leaves out): ``q k^T`` and ``p v``, each
    ``2 * S * S * 8`` per batch and query head, grouped-query or not."""
    cost = count_torch(_Attention(kv_heads), (torch.randn(2, 10, 16),))
    projection = 2 * 16 * (32 + 2 * 8 * kv_heads)  # per token
    attention = 2 * (2 * 2 * 4 * 10 * 10 * 8)  # batch 2, 4 heads, S = 10, head size 8; per pass
    assert cost.flops_per_token * 20 == 20 * projection + attention


def test_llama_flops_per_token_include_attention():
    """A tiny LLaMA (hidden 32, 4 heads of 8, 2 key/value heads, SwiGLU 64, vocab 96, 2 layers), seq 6: per
    token and layer q/k/v/o projections, the SwiGLU FFN and attention over 6 positions; plus the LM head."""
    from conftest import tiny_hf_model

    seq = 6
    cost = count_torch(tiny_hf_model("llama"), (torch.randint(1, 96, (2, seq)),))
    layer = 2 * 32 * 32 * 2 + 2 * 32 * 16 * 2 + 2 * 32 * 64 * 3 + 2 * 4 * seq * (8 + 8)
    assert cost.tokens == 12
    assert cost.flops_per_token == 2 * layer + 2 * 32 * 96 == 44544


def test_vit_tokens_are_its_patches():
    """Tokens of a model that takes pixels: the rows its FFNs see (16 patches and the class token per image),
    not rows of pixels."""
    from conftest import tiny_hf_model

    vit = tiny_hf_model("vit")  # image 16, patch 4
    pixels = torch.randn(3, 3, 16, 16)
    assert count_torch(vit, (pixels,), ffn_modules=["layers.0.mlp", "layers.1.mlp"]).tokens == 3 * 17
    moe = moefx.convert(vit, moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(pixels,))
    assert count_torch(moe, (pixels,)).tokens == 3 * 17


def test_topk_moe_flops_and_active_params():
    layer = _moe_layer()
    cost = count_torch(layer, (torch.randn(2, 5, H),))
    per_expert_params = I * H * 2 + O * I  # w1, w3, w2 (no biases) = 288
    per_assignment = 2 * H * I * 2 + 2 * I * O  # gate+up GEMMs, down GEMM = 576 FLOPs
    router = 2 * H * E  # logits GEMM per token = 64 FLOPs
    assert cost.params == H * E + E * per_expert_params == 1184
    assert cost.active_params_per_token == H * E + 2 * per_expert_params == 608
    assert cost.flops_per_token == router + 2 * per_assignment == 1216
    assert cost.ffn_flops_per_token == cost.flops_per_token  # the layer is all FFN
    [info] = cost.moe_layers
    assert (info["tokens"], info["assignments"], info["experts_per_token"]) == (10, 20, 2.0)


def test_counting_a_model_whose_captured_layers_meet_a_new_input_structure():
    """A converted BERT's layers are captured with torch.export; counting it on an input structure they have
    not seen (no attention mask) counts the model's own ops once, not the tracing of a new capture: every MoE
    layer's tokens and top-2 assignments, and the same FLOPs as a second count."""
    from conftest import tiny_hf_model

    ids = torch.randint(1, 96, (2, 8))
    moe = moefx.convert(tiny_hf_model("bert"), moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    first = count_torch(moe, (), inputs)
    assert [(layer["tokens"], layer["assignments"]) for layer in first.moe_layers] == [(16, 32), (16, 32)]
    again = count_torch(moe, (), inputs)
    assert first.flops_per_token == again.flops_per_token
    json.dumps(first.to_dict())


def test_capacity_drops_are_not_counted():
    layer = _moe_layer(capacity_factor=0.5)
    x = torch.randn(3, 8, H)
    cost = count_torch(layer, (x,))
    kept = int(layer.router.last_stats.load.sum())  # the same forward's routing
    assert kept < 24 * 2
    assert cost.moe_layers[0]["assignments"] == kept
    assert cost.flops_per_token * 24 == 24 * 2 * H * E + kept * (2 * H * I * 2 + 2 * I * O)


def test_soft_moe_counts_slots_and_mixing():
    layer = _moe_layer("soft", gated=False)  # one slot per token: p = ceil(5 / 4) = 2 slots per expert
    cost = count_torch(layer, (torch.randn(2, 5, H),))
    slots = 2 * E * 2  # groups * experts * p
    assert cost.moe_layers[0]["assignments"] == slots
    assert cost.active_params_per_token == pytest.approx(H * E * 64 + 1 + slots / 10 * (I * H + O * I))
    # logits [5, 8 slots] + dispatch [8 slots, 5] @ [5, H] + combine [5, 8] @ [8, O], per group, plus experts
    mixing = 2 * (2 * 5 * H * 8 + 2 * 8 * 5 * H + 2 * 5 * 8 * O)
    assert cost.flops_per_token * 10 == mixing + slots * (2 * H * I + 2 * I * O)


def test_onnx_counts_match_torch(tmp_path):
    layer = _moe_layer()
    path = tmp_path / "layer.onnx"
    moefx.export_onnx(layer, (torch.randn(2, 5, H),), path, verify=False)
    x = torch.randn(3, 7, H)
    cost = count_onnx(str(path), onnx_feed(ort_session(path, 1), (x,), {}), tokens=21)
    torch_cost = count_torch(layer, (x,))
    assert cost.flops_per_token == torch_cost.flops_per_token == 2 * H * E + 2 * (2 * H * I * 2 + 2 * I * O)
    assert cost.params == torch_cost.params
    assert cost.active_params_per_token == torch_cost.active_params_per_token


# ---------------------------------------------------------------------------------------------------------
# the eager fast path and the kernel
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk", "soft", "expert-choice"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_inference_fast_path_matches_the_op_path(router, tokens):
    layer = _moe_layer(router, bias=True)
    x = torch.randn(1, tokens, H)
    with torch.inference_mode():
        fast = layer(x)  # moe_ffn_kernel called directly
    slow = layer(x.clone().requires_grad_(True))  # autograd: through the custom op
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)


def test_kernel_gemm_routines_agree(monkeypatch):
    w = [t if t is None else t.detach() for t in _moe_layer(bias=True).experts.weights()]
    x = torch.randn(64, H)
    index = torch.randint(-1, E, (64, 2))
    weight = torch.rand(64, 2)
    want = ops.moe_ffn_reference(x, index, weight, *w, "silu")
    got = ops.moe_ffn_kernel(x, index, weight, *w, "silu")
    monkeypatch.setattr(ops, "_ONEDNN_LINEAR", None)
    aten = ops.moe_ffn_kernel(x, index, weight, *w, "silu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aten, want, rtol=1e-5, atol=1e-6)


def test_lazy_statistics_and_losses_survive_copies():
    layer = _moe_layer(z_loss_weight=0.1)
    with torch.no_grad():
        layer(torch.randn(2, 6, H))
    clone = copy.deepcopy(layer)  # summarises the pending statistics first
    assert clone.router.last_stats.load.tolist() == layer.router.last_stats.load.tolist()
    assert sum(layer.router.last_stats.load.tolist()) == 24
    assert set(layer.aux_losses) == {"load_balance", "z_loss"}
    assert clone.aux_losses == {}


# ---------------------------------------------------------------------------------------------------------
# timing and report
# ---------------------------------------------------------------------------------------------------------


def test_timing_percentiles_and_interleaving():
    timing = Timing([0.001 * i for i in range(1, 101)])
    assert timing.p50 == pytest.approx(0.0505)
    assert timing.p90 == pytest.approx(0.0901)
    assert timing.p99 == pytest.approx(0.09901)
    calls = {"a": 0, "b": 0}
    results = interleaved({"a": lambda: calls.__setitem__("a", calls["a"] + 1),
                           "b": lambda: calls.__setitem__("b", calls["b"] + 1)},
                          rounds=3, min_seconds=0.01, min_reps=6)
    assert all(len(results[k].samples) >= 6 for k in "ab")


def test_report_renders_json_and_plot(tmp_path):
    report = BenchReport("out/")
    report.measurements = [Measurement("dense", "torch", 1, b, 16, b * 16, 2.0 * b, 2.5 * b, 3.0 * b, 10, 1.0)
                           for b in (1, 4)]
    report.measurements += [Measurement("moe", "torch", 1, b, 16, b * 16, 0.5 * b, 0.6 * b, 0.7 * b, 10, None)
                            for b in (1, 4)]
    report.speedups = [Speedup("model", "torch", 1, 1, 16, 4.0, 4.0)]
    text = report.render()
    assert "p50 ms" in text and "4.00x" in text and "100%" in text
    report.write_json(tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["measurements"][0]["tokens_per_s"] == pytest.approx(16 / 0.002)
    report.plot(tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------
# end to end and bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    from conftest import tiny_hf_model

    root = tmp_path_factory.mktemp("bench")
    tiny_hf_model("llama").save_pretrained(root / "llama")
    source = load_source(root / "llama")
    model = moefx.convert(source.model, moefx.MoEConfig(num_experts=4, top_k=2), source=source.to_dict())
    moefx.save(model, root / "out")
    return root / "out"


def test_run_bench_converted_model(converted_dir):
    report = run_bench(converted_dir, batches=[1, 2], seqs=[4], runtimes=["torch", "ort-fused", "ort-gather"],
                       min_seconds=0.01, rounds=1)
    keys = {(m.model, m.runtime, m.batch) for m in report.measurements}
    for batch in (1, 2):
        assert {("dense", "torch", batch), ("moe", "torch", batch), ("dense", "ort", batch),
                ("moe", "ort-fused", batch), ("ffn-dense", "torch", batch), ("ffn-moe", "ort-fused", batch),
                ("moe", "ort-gather", batch), ("ffn-moe", "ort-gather", batch)} <= keys
    assert {s.runtime for s in report.speedups} == {"torch", "ort-fused", "ort-gather"}
    dense, moe = report.costs["dense"], report.costs["moe"]
    assert moe["params"] > dense["params"]  # upcycled: 4 copies of each FFN
    # Upcycled top-2: each token runs two full-size experts, so the FFN FLOPs double (plus the router).
    ffn = report.costs["ffn-dense"]["flops_per_token"]
    assert report.costs["ffn-moe"]["flops_per_token"] == 2 * ffn + 2 * 32 * 4
    assert {s.scope for s in report.speedups} == {"ffn", "model"}
    assert all(s.realised > 0 and s.ideal < 1 for s in report.speedups)


def test_bench_counts_dense_and_moe_per_token_of_the_same_rows(tmp_path):
    """An FFN in the root module, on image patches: both sides count per patch (16 per 16x16 image, patches of
    4x4), not per row of pixels on the dense side; per token the 4x4x3 -> 16 patch projection (1536 FLOPs) plus
    the FFN 16 -> 32 -> 16 (2048), and for the MoE the router (2 * 16 * 4) and one upcycled expert."""
    source = load_source("toy_models:patch_mlp")
    moe = moefx.convert(source.model, moefx.MoEConfig(num_experts=4, top_k=1), *source.example_inputs[:1],
                        source=source.to_dict())
    moefx.save(moe, tmp_path / "out")
    report = run_bench(tmp_path / "out", batches=[1], seqs=[4], runtimes=["torch"], ffn=False, min_seconds=0.01,
                       rounds=1)
    dense, moe_cost = report.costs["dense"], report.costs["moe"]
    assert dense["tokens"] == moe_cost["tokens"] == 16
    assert dense["flops_per_token"] == 1536 + 2048
    assert moe_cost["flops_per_token"] == 1536 + 2 * 16 * 4 + 2048
    [model] = [s for s in report.speedups if s.scope == "model"]
    assert model.ideal == pytest.approx(3584 / 3712)


def test_bench_times_a_task_routed_model_on_the_task_given(tmp_path):
    """router='task': the task to time is required, in range, and used by torch (each token runs its task's
    top-2 experts) and by the ONNX files (their task_ids input); a token-routed model refuses a task id."""
    source = load_source("toy_models:stack_of_mlps")
    config = moefx.MoEConfig(router="task", num_tasks=3, num_experts=4, top_k=2)
    moefx.save(moefx.convert(source.model, config, *source.example_inputs[:1], source=source.to_dict()),
               tmp_path / "tasks")
    sizes = {"batches": [2], "seqs": [4], "ffn": False, "min_seconds": 0.01, "rounds": 1}
    with pytest.raises(ConfigError, match=r"route by task .* --task-id N"):
        run_bench(tmp_path / "tasks", runtimes=["torch"], **sizes)
    with pytest.raises(ConfigError, match="out of range: the model has 3 tasks"):
        run_bench(tmp_path / "tasks", runtimes=["torch"], task_id=3, **sizes)
    report = run_bench(tmp_path / "tasks", runtimes=["torch", "ort-fused", "ort-unfused"], task_id=2, **sizes)
    assert {(m.model, m.runtime) for m in report.measurements} == {
        ("dense", "torch"), ("moe", "torch"), ("dense", "ort"), ("moe", "ort-fused"), ("moe", "ort-unfused")}
    assert [layer["experts_per_token"] for layer in report.costs["moe"]["moe_layers"]] == [2.0] * 3
    moefx.save(moefx.convert(source.model, moefx.MoEConfig(num_experts=4), *source.example_inputs[:1],
                             source=source.to_dict()), tmp_path / "tokens")
    with pytest.raises(ConfigError, match="applies to models converted with router='task'"):
        run_bench(tmp_path / "tokens", runtimes=["torch"], task_id=0, **sizes)


def test_bench_counts_the_ffn_of_a_model_captured_layer_by_layer(tmp_path):
    """BERT's FFN spans two modules, so moefx captures the whole layer: the dense FFN FLOPs are its projections'
    (per token and layer 2 * 32 * 64 * 2, not the attention's too), the MoE FFN FLOPs its router and two
    upcycled experts per token (counted inside the captured graph), and the FFN is not timed alone."""
    from conftest import tiny_hf_model

    tiny_hf_model("bert").save_pretrained(tmp_path / "bert")
    source = load_source(tmp_path / "bert")
    moefx.save(moefx.convert(source.model, moefx.MoEConfig(num_experts=4, top_k=2), source=source.to_dict()),
               tmp_path / "out")
    report = run_bench(tmp_path / "out", batches=[2], seqs=[6], runtimes=["torch"], min_seconds=0.01, rounds=1)
    assert report.costs["dense"]["ffn_flops_per_token"] == 2 * (2 * 32 * 64 * 2)
    assert report.costs["moe"]["ffn_flops_per_token"] == 2 * (2 * 32 * 4 + 2 * (2 * 32 * 64 * 2))
    assert [layer["flops"] for layer in report.costs["moe"]["moe_layers"]] == [12 * (256 + 16384)] * 2
    assert {m.model for m in report.measurements} == {"dense", "moe"}
    assert any("FFN alone not measured" in note for note in report.notes)


def test_counting_torch_transformer_encoder_layers_in_eval_mode():
    """nn.TransformerEncoderLayer's eval fast path is one fused op the counter does not see: counted on its
    standard ops, per token and layer the in/out projections 2 * 32 * 128, the FFN 2 * 32 * 64 * 2 and
    attention over 8 positions 2 * 4 heads * 8 * (8 + 8)."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ffn = [[f"layers.{i}.linear1", f"layers.{i}.linear2"] for i in range(2)]
    cost = count_torch(encoder, (torch.randn(2, 8, 32),), ffn_modules=ffn)
    assert cost.flops_per_token == 2 * (2 * 32 * 128 + 2 * 32 * 64 * 2 + 2 * 4 * 8 * 16)
    assert cost.ffn_flops_per_token == 2 * (2 * 32 * 64 * 2) and cost.ffn_layers == 2
    assert torch.backends.mha.get_fastpath_enabled()  # put back


def test_bench_tokens_of_an_image_model_are_its_patches(tmp_path):
    """A ViT (16 patches and a class token per image) is timed per token of its patches, whatever --seq says."""
    from conftest import tiny_hf_model

    tiny_hf_model("vit").save_pretrained(tmp_path / "vit")
    source = load_source(tmp_path / "vit")
    moefx.save(moefx.convert(source.model, moefx.MoEConfig(num_experts=4, top_k=2), source=source.to_dict()),
               tmp_path / "out")
    report = run_bench(tmp_path / "out", batches=[1, 3], seqs=[128], runtimes=["torch"], ffn=False,
                       min_seconds=0.01, rounds=1)
    assert {(m.batch, m.tokens) for m in report.measurements} == {(1, 17), (3, 51)}


def test_counting_a_moe_layer_called_with_keywords():
    class Caller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = _moe_layer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.moe(x=x)

    cost = count_torch(Caller(), (torch.randn(2, 5, H),))
    assert cost.tokens == 10 and cost.moe_layers[0]["assignments"] == 20


def test_bench_an_exported_onnx_file_at_other_sizes(tmp_path):
    """An exported model's batch and sequence axes are dynamic and its feature axis keeps its size (it stayed
    symbolic where no op tied it to a weight, and bench made up 1 for it: ONNX Runtime then failed)."""
    import onnx

    source = load_source("toy_models:stack_of_mlps")
    moe = moefx.convert(source.model, moefx.MoEConfig(num_experts=4, top_k=2), *source.example_inputs[:1])
    moefx.export_onnx(moe, None, tmp_path / "m.onnx", verify=False)
    [x] = onnx.load(str(tmp_path / "m.onnx")).graph.input
    dims = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == 16
    report = run_bench(tmp_path / "m.onnx", batches=[1, 3], seqs=[7], min_seconds=0.01, rounds=1)
    assert {(m.batch, m.seq) for m in report.measurements} == {(1, 7), (3, 7)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS), MOEFX_QUIET="1")
    return subprocess.run([sys.executable, "-m", "moefx.cli", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_never_overwrites_a_file_without_force_nor_writes_into_the_model(converted_dir, tmp_path):
    """`--json` over an existing file needs --force; into the model directory (its recipe.json, say) never."""
    sizes = ["--batch", "1", "--seq", "4", "--runtimes", "torch", "--no-ffn", "--min-seconds", "0.01"]
    existing = tmp_path / "b.json"
    existing.write_text("keep")
    result = _cli(str(converted_dir), *sizes, "--json", str(existing))
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert existing.read_text() == "keep"
    recipe = (converted_dir / "recipe.json").read_bytes()
    result = _cli(str(converted_dir), *sizes, "--json", str(converted_dir / "recipe.json"), "--force")
    assert result.returncode == 2 and "inside the model" in result.stderr
    assert (converted_dir / "recipe.json").read_bytes() == recipe
    result = _cli(str(converted_dir), *sizes, "--json", str(tmp_path / "b.png"), "--plot", str(tmp_path / "b.png"))
    assert result.returncode == 2 and "name the same file" in result.stderr
    result = _cli(str(converted_dir), *sizes, "--json", str(existing), "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads(existing.read_text())["format"] == "moefx-bench"


def test_cli_writes_table_json_and_plot(converted_dir, tmp_path):
    result = _cli(str(converted_dir), "--batch", "1,2", "--seq", "4", "--runtimes", "torch", "--no-ffn",
                  "--min-seconds", "0.01", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert result.returncode == 0, result.stderr
    assert "p50 ms" in result.stdout and "realised" in result.stdout
    assert json.loads((tmp_path / "b.json").read_text())["format"] == "moefx-bench"
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "needle"), [
    (["README.md"], "not something moefx bench can run"),
    (["missing-dir/"], "no such file"),
    (["OUT", "--threads", "0"], "--threads"),
    (["OUT", "--batch", "1,x"], "'x' is not a positive integer"),
    (["OUT", "--seq", ""], "--seq"),
    (["OUT", "--runtimes", "tensorrt"], "tensorrt"),
    (["BAD.onnx"], "not a readable ONNX model"),
    (["OUT", "--plot", "latency.txt"], "--plot latency.txt: name a .png"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, converted_dir, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    root = Path(__file__).resolve().parents[1]
    args = [str(root / a) if a == "README.md" else str(converted_dir) if a == "OUT" else str(bad) if a == "BAD.onnx"
            else a for a in args]
    result = _cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0]


def test_api_errors():
    with pytest.raises(ConfigError, match="threads"):
        run_bench("out", threads=[0])
    with pytest.raises(ConfigError, match="batch"):
        run_bench("out", batches=[])
    with pytest.raises(ModelLoadError, match="no such file"):
        run_bench("definitely-missing")


def test_import_moefx_stays_light():
    code = ("import sys, moefx, moefx.bench, moefx.cli.bench; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_tokens_of_an_ffn_run_in_chunks_or_shared_by_every_layer():
    """Tokens are the rows the first FFN sees in one pass: summed over the chunks it runs on (transformers'
    chunk_size_feed_forward; only the first chunk's rows were counted), but not over the calls of an FFN module
    that every layer shares (ALBERT-style), each on the whole sequence."""
    import transformers as tf

    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                                      intermediate_size=64, chunk_size_feed_forward=2)).eval()
    ffn = [[f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense"] for i in range(2)]
    cost = count_torch(bert, (torch.randint(1, 96, (2, 6)),), ffn_modules=ffn)
    assert cost.tokens == 12 and cost.ffn_flops_per_token == 2 * (2 * 32 * 64 * 2)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

        def forward(self, x):
            for _ in range(3):
                x = x + self.mlp(x)
            return x

    cost = count_torch(Shared(), (torch.randn(2, 5, 16),), ffn_modules=["mlp"])
    assert cost.tokens == 10 and cost.ffn_flops_per_token == 3 * (2 * 16 * 32 * 2)
