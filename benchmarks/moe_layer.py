"""One FFN layer: moefx's MoE layer against the dense FFN and transformers' Mixtral block, eager and ORT.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/moe_layer.py              # 1 and 2 threads, 512 and 1 tokens
    OMP_WAIT_POLICY=PASSIVE python benchmarks/moe_layer.py --threads 1 --tokens 512 --json layer.json

Shapes (fp32): hidden 768; dense SwiGLU FFN with inter 3072; MoE: the same FFN split into 8 experts of inter
384 (total FFN parameters unchanged), top-2 with renormalised weights, so the ideal speed-up is 4x. Every
candidate of one (threads, tokens) cell is timed round-robin in one process (moefx.bench.interleaved) and
the script prints ratios of medians, which survive a noisy shared machine better than absolute times.

moefx's kernel runs its expert GEMMs through oneDNN where that is faster than ``F.linear`` (on AMD CPUs MKL's
GEMM is about half as fast); the script also times it restricted to ``F.linear``, the routine the dense FFN
and the Mixtral block use, so that both comparisons are visible.

ORT runs the MoE layer exported three ways: fused (one ``com.microsoft.MoE`` node), unfused (standard ops
only) and gather (``export_onnx(gather_experts=True)``: per expert, its tokens gathered and MatMuls with
constant weights that ORT pre-packs; the unfused export of a top-k layer is the same form). At 512 tokens it
also times the fused node's expert GEMMs alone, as ORT MatMuls on the same rows (weights packed on every run,
as the MoE kernel does, and pre-packed): how much of the node is GEMM, and the most a node with pre-packed
weights and no other cost could reach.

Goals (issue 5): ORT fused (or gather) MoE >= 3x ORT dense; eager MoE >= 3x eager dense and no slower than
MixtralSparseMoeBlock; Soft MoE with one slot per token (experts the size of the dense FFN, so its FLOPs
match) <= 1.3x dense; router overhead (everything but the expert GEMMs) < 15% of the layer at 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx import ops
from moefx.bench import interleaved, machine_info
from moefx.bench.runners import export_dense_onnx, ort_runner
from moefx.layers import ExpertBank, MoELayer
from moefx.routers import build_router

HIDDEN, INTER, EXPERTS, TOP_K = 768, 3072, 8, 2


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden: int = HIDDEN, inter: int = INTER) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def split_moe(dense: DenseSwiGLU, router: str = "topk", experts: int = EXPERTS, **config) -> MoELayer:
    """The dense FFN's neurons split into ``experts`` experts (total parameters unchanged)."""
    size = INTER // experts
    bank = ExpertBank(experts, HIDDEN, size, HIDDEN, "silu", gated=True, up_bias=False, down_bias=False)
    with torch.no_grad():
        bank.w1.copy_(dense.gate_proj.weight.reshape(experts, size, HIDDEN))
        bank.w3.copy_(dense.up_proj.weight.reshape(experts, size, HIDDEN))
        bank.w2.copy_(dense.down_proj.weight.reshape(HIDDEN, experts, size).permute(1, 0, 2))
    return _layer(bank, router, experts, **config)


def upcycled_moe(dense: DenseSwiGLU, router: str, experts: int = EXPERTS, **config) -> MoELayer:
    """Every expert a copy of the dense FFN (Sparse Upcycling)."""
    bank = ExpertBank(experts, HIDDEN, INTER, HIDDEN, "silu", gated=True, up_bias=False, down_bias=False)
    with torch.no_grad():
        bank.w1.copy_(dense.gate_proj.weight.expand(experts, -1, -1))
        bank.w3.copy_(dense.up_proj.weight.expand(experts, -1, -1))
        bank.w2.copy_(dense.down_proj.weight.expand(experts, -1, -1))
    return _layer(bank, router, experts, **config)


def _layer(bank: ExpertBank, router: str, experts: int, **config) -> MoELayer:
    cfg = moefx.MoEConfig(router=router, num_experts=experts, top_k=TOP_K, allow_noncausal=True, **config)
    module = build_router(HIDDEN, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return MoELayer(module, bank).eval()


def mixtral_block(layer: MoELayer) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    bank = layer.experts
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=bank.expert_size, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([bank.w1, bank.w3], dim=1))
        block.experts.down_proj.copy_(bank.w2)
    return block


def expert_counts(layer: MoELayer, x: torch.Tensor) -> list[int]:
    """How many of ``x``'s tokens the layer's router sends to each expert."""
    with torch.inference_mode():
        index = layer.router(x.reshape(-1, HIDDEN)).expert_index
    return torch.bincount(index.reshape(-1), minlength=EXPERTS).tolist()


def expert_gemms_only(layer: MoELayer, x: torch.Tensor):
    """The expert GEMMs the layer's kernel runs on ``x`` alone: the same rows per expert, the same GEMM routine
    and, with several threads, the same split of the expert-sorted rows between expert threads."""
    counts = expert_counts(layer, x)
    kept = sum(counts)
    bank = layer.experts
    w1, w3, w2 = (w.detach() for w in (bank.w1, bank.w3, bank.w2))
    rows, hidden = torch.randn(kept, HIDDEN), torch.randn(kept, bank.expert_size)

    def gemms(lo: int, hi: int) -> None:
        start = 0
        for e, count in enumerate(counts):
            a, b = max(start, lo), min(start + count, hi)
            start += count
            if a < b:
                ops._linear(rows[a:b], w1[e], None)
                ops._linear(rows[a:b], w3[e], None)
                ops._linear(hidden[a:b], w2[e], None)

    def run():
        threads = torch.get_num_threads()
        if threads == 1 or not ops._EXPERT_THREADS:
            gemms(0, kept)
            return
        pieces = ops._pieces(counts, threads)
        futures = [ops._expert_workers(threads - 1).submit(gemms, lo, hi) for lo, hi in pieces[1:]]
        with ops.serial_glue(True):
            gemms(*pieces[0])
        for future in futures:
            future.result()

    return run


def ort_expert_gemms(layer: MoELayer, x: torch.Tensor, path: Path, prepacked: bool, threads: int):
    """The expert GEMMs of ORT's fused MoE node on ``x`` alone, as ORT MatMuls: per expert with tokens, its
    fc1 (gate and up, ``[rows, H] x [H, 2I]``) and fc2 (``[rows, I] x [I, H]``) on that expert's row count.
    ``prepacked``: weights as initializers, which ORT packs once at session start; else as inputs, packed on
    every run as the MoE kernel does. Returns the ORT runner."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    counts = expert_counts(layer, x)
    bank = layer.experts
    nodes, initializers, inputs, outputs, feed = [], [], [], [], {}
    rng = torch.Generator().manual_seed(0)
    for e, rows in enumerate(counts):
        if rows == 0:
            continue
        fc1 = torch.cat([bank.w1[e], bank.w3[e]]).detach().T.contiguous().numpy()  # [H, 2I]
        fc2 = bank.w2[e].detach().T.contiguous().numpy()  # [I, H]
        for name, shape in ((f"x{e}", [rows, HIDDEN]), (f"h{e}", [rows, bank.expert_size])):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            feed[name] = torch.randn(shape, generator=rng).numpy()
        for name, weight in ((f"fc1_{e}", fc1), (f"fc2_{e}", fc2)):
            if prepacked:
                initializers.append(numpy_helper.from_array(weight, name))
            else:
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(weight.shape)))
                feed[name] = weight
        nodes += [helper.make_node("MatMul", [f"x{e}", f"fc1_{e}"], [f"y{e}"]),
                  helper.make_node("MatMul", [f"h{e}", f"fc2_{e}"], [f"z{e}"])]
        outputs += [helper.make_tensor_value_info(f"y{e}", TensorProto.FLOAT, None),
                    helper.make_tensor_value_info(f"z{e}", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "expert_gemms", inputs, outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return ort_runner(path, feed, threads)


def with_aten_gemms(fn):
    """``fn`` with moefx's kernel restricted to ``F.linear`` (the GEMM routine dense and Mixtral use)."""

    def run():
        saved, ops._ONEDNN_LINEAR = ops._ONEDNN_LINEAR, None
        try:
            return fn()
        finally:
            ops._ONEDNN_LINEAR = saved

    return run


def eager_fn(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return module(x)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", default="512,1")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="measurement time per candidate and cell")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]

    torch.manual_seed(0)
    dense = DenseSwiGLU().eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.02)
    moe = split_moe(dense)
    mixtral = mixtral_block(moe)
    soft = upcycled_moe(dense, "soft", capacity_factor=1.0)  # one slot per token, full-size experts

    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cpus']} CPUs), torch {info['torch']}, "
          f"onnxruntime {info.get('onnxruntime', '-')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"layer: hidden {HIDDEN}, dense SwiGLU inter {INTER}; MoE {EXPERTS} x {INTER // EXPERTS}, top-{TOP_K} "
          f"(ideal 4x); fp32\n")
    check = torch.randn(1, 16, HIDDEN)
    with torch.inference_mode():
        torch.testing.assert_close(moe(check), mixtral(check), rtol=1e-4, atol=1e-5)

    results = []
    with tempfile.TemporaryDirectory(prefix="moefx-bench-") as tmp:
        files = {}
        if not args.no_ort:
            x_export = torch.randn(2, 5, HIDDEN)
            files["dense"] = Path(tmp) / "dense.onnx"
            export_dense_onnx(dense, (x_export,), {}, files["dense"])
            for key in ("moe-fused", "moe-unfused", "moe-gather"):
                files[key] = Path(tmp) / f"{key}.onnx"
                moefx.export_onnx(moe, (x_export,), files[key], fused=key == "moe-fused", verify=False, force=True,
                                  gather_experts=key == "moe-gather")
        for t in threads:
            torch.set_num_threads(t)
            for n in token_counts:
                x = torch.randn(1, n, HIDDEN)
                candidates = {
                    "dense": eager_fn(dense, x),
                    "moefx": eager_fn(moe, x),
                    "mixtral": eager_fn(mixtral, x),
                }
                if ops._ONEDNN_LINEAR is not None:
                    candidates["moefx-aten"] = with_aten_gemms(eager_fn(moe, x))
                if n > 1:
                    candidates["soft"] = eager_fn(soft, x)
                    candidates["expert-gemms"] = expert_gemms_only(moe, x)
                    if ops._ONEDNN_LINEAR is not None:
                        candidates["soft-aten"] = with_aten_gemms(eager_fn(soft, x))
                for key, file in files.items():
                    candidates[f"ort-{key}"] = ort_runner(file, _feed(file, x), t)
                if files and n > 1:
                    for key in ("raw", "prepacked"):
                        path = Path(tmp) / f"gemms-{key}-{n}.onnx"
                        candidates[f"ort-gemms-{key}"] = ort_expert_gemms(moe, x, path, key == "prepacked", t)
                start = time.perf_counter()
                timing = interleaved(candidates, rounds=args.rounds, min_seconds=args.min_seconds)
                ms = {k: v.p50 * 1e3 for k, v in timing.items()}
                row = {"threads": t, "tokens": n, "p50_ms": ms, "seconds": time.perf_counter() - start}
                ratios = {
                    "eager dense / moefx (goal >= 3)": ms["dense"] / ms["moefx"],
                    "eager moefx / mixtral (goal <= 1)": ms["moefx"] / ms["mixtral"],
                }
                if "moefx-aten" in ms:
                    ratios["  same GEMM routine as dense/Mixtral (F.linear): dense / moefx"] = ms["dense"] / ms["moefx-aten"]
                    ratios["  same GEMM routine as dense/Mixtral (F.linear): moefx / mixtral"] = (
                        ms["moefx-aten"] / ms["mixtral"])
                if "soft" in ms:
                    ratios["eager soft (slots = tokens) / dense (goal <= 1.3)"] = ms["soft"] / ms["dense"]
                    if "soft-aten" in ms:
                        ratios["  same GEMM routine (F.linear): soft / dense"] = ms["soft-aten"] / ms["dense"]
                    ratios["router overhead: 1 - expert GEMMs / moefx (goal < 0.15)"] = 1 - ms["expert-gemms"] / ms["moefx"]
                if files:
                    ratios["ORT dense / ORT fused MoE (goal >= 3)"] = ms["ort-dense"] / ms["ort-moe-fused"]
                    ratios["ORT dense / ORT unfused MoE"] = ms["ort-dense"] / ms["ort-moe-unfused"]
                    ratios["ORT dense / ORT gather MoE (gather_experts=True; goal >= 3)"] = (
                        ms["ort-dense"] / ms["ort-moe-gather"])
                if "ort-gemms-raw" in ms:
                    ratios["  ORT fused: share of the node in its expert GEMMs (as MatMuls packed per run)"] = (
                        ms["ort-gemms-raw"] / ms["ort-moe-fused"])
                    ratios["  ORT fused, ceiling: ORT dense / expert MatMuls with pre-packed weights"] = (
                        ms["ort-dense"] / ms["ort-gemms-prepacked"])
                row["ratios"] = ratios
                results.append(row)
                times = "  ".join(f"{k} {v:.3f}" for k, v in ms.items())
                print(f"threads {t}, tokens {n}: p50 ms: {times}")
                width = max(len(k) for k in ratios)
                for k, v in ratios.items():
                    print(f"    {k:<{width}}  {v:6.2f}")
                print()
                sys.stdout.flush()
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    return 0


def _feed(file: Path, x: torch.Tensor) -> dict:
    from moefx.bench.runners import onnx_feed, ort_session

    return onnx_feed(ort_session(file, 1), (x,), {})


if __name__ == "__main__":
    sys.exit(main())
