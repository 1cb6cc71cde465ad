"""Parameter and FLOP counts, read from what a model actually executes (torch) or from its graph (ONNX).

Torch models: one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`. Every matrix product
is counted from its real operand shapes (``2 * M * N * K``, as PyTorch's own counter does; elementwise ops,
softmax and normalisation are not counted), and so is ``scaled_dot_product_attention`` on CPU, which PyTorch's
counter leaves out. moefx's dispatch ops are counted from their real arguments: the
number of token-expert assignments the call computed (``T * k`` for ``moefx::topk_moe``; the kept entries of
``expert_index`` for ``moefx::moe_ffn``) times one expert's FLOPs. The same pass records, per MoE layer, the
tokens it saw and the assignments it ran, which gives the active parameters per token.

ONNX files: ``MatMul``, ``Gemm``, ``Conv`` and ``com.microsoft.MoE`` (``tokens * k`` assignments) nodes,
counted from their operand shapes in one ONNX Runtime run (every operand exposed as an output).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers import MoELayer

__all__ = ["ModelCost", "count_onnx", "count_torch", "expert_flops"]


@dataclass
class ModelCost:
    """What one forward pass of a model costs, per token.

    ``params``: all parameters. ``active_params_per_token``: parameters a token touches: everything outside
    the MoE experts plus, per MoE layer, (assignments / tokens) experts' worth of expert parameters.
    ``flops_per_token``: counted FLOPs of the pass / tokens; ``ffn_flops_per_token``: the part inside the
    FFN (dense FFN modules, or MoE layers, router included).
    """

    tokens: int
    params: int
    active_params_per_token: float
    flops_per_token: float
    ffn_flops_per_token: float | None = None
    ffn_layers: int = 0
    moe_layers: list[dict[str, Any]] = field(default_factory=list)  # per MoE layer: tokens, assignments, ...

    @property
    def ffn_fraction(self) -> float | None:
        """Share of the FLOPs spent in the FFN (dense) or MoE layers."""
        if self.ffn_flops_per_token is None or not self.flops_per_token:
            return None
        return self.ffn_flops_per_token / self.flops_per_token

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ffn_fraction": self.ffn_fraction}


def expert_flops(w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> int:
    """FLOPs of one token through one expert: its GEMMs, ``2*H*I`` (``x2`` when gated) ``+ 2*I*O``."""
    _, inter, hidden = w1.shape
    out = w2.shape[1]
    return 2 * hidden * inter * (2 if w3 is not None else 1) + 2 * inter * out


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared parameter once


def count_torch(model: nn.Module, args: tuple = (), kwargs: dict | None = None,
                ffn_modules: list[str | list[str]] | None = None, tokens: int | None = None) -> ModelCost:
    """Count parameters and FLOPs of one forward ``model(*args, **kwargs)`` (run under no_grad).

    Args:
        ffn_modules: the dense FFNs, whose FLOPs are reported as the FFN's: each the qualified name of its module,
            or the list of its projection modules' names (an FFN whose module holds more than the FFN); MoE
            layers are found by themselves.
        tokens: tokens of the input (default: the rows the first FFN or MoE layer to run sees; in a model
            without one, the element count of the first integer input, else the product of all but the last
            dimension of the first tensor input).
    """
    # nn.MultiheadAttention / nn.TransformerEncoderLayer in eval mode take a fused fast path the counter does
    # not see (a dense nn.TransformerEncoder counted no FLOPs at all); count their standard ops instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _count_torch(model, args, kwargs or {}, ffn_modules, tokens)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count_torch(model: nn.Module, args: tuple, kwargs: dict, ffn_modules: list[str | list[str]] | None,
                 tokens: int | None) -> ModelCost:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    records: dict[str, dict[str, Any]] = {}
    stack: list[tuple[str, int]] = []  # the MoE layers being run, and the counter's total when each began

    # Each MoE layer's FLOPs: the counter's total after its call less before (the counter's per-module split
    # misses layers called from a captured graph, a BERT layer's say).
    counter: Any = None

    def pre_hook(name):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            entry = records.setdefault(name, {"name": name, "tokens": 0, "assignments": 0, "calls": 0, "flops": 0})
            entry["tokens"] += 0 if x is None else x.numel() // x.shape[-1]
            entry["calls"] += 1
            stack.append((name, counter.get_total_flops() if counter is not None else 0))
        return hook

    def post_hook(module, inputs, output):
        name, start = stack.pop()
        if counter is not None:
            records[name]["flops"] += counter.get_total_flops() - start

    def dispatch_formula(w1_at, assignments_of):
        def formula(*op_args, out_val=None, **op_kwargs):
            w1, w3, w2 = op_args[w1_at], op_args[w1_at + 2], op_args[w1_at + 4]
            assignments = assignments_of(op_args)
            if stack:
                records[stack[-1][0]]["assignments"] += assignments
            return assignments * expert_flops(w1, w3, w2)

        formula._get_raw = True  # FlopCounterMode passes the real tensors, not their shapes
        return formula

    mapping = {
        # topk_moe(x, logits, w1, b1, w3, b3, w2, b2, k, ...); moe_ffn(x, index, weight, w1, b1, w3, b3, w2, ...)
        torch.ops.moefx.topk_moe: dispatch_formula(2, lambda a: a[0].shape[0] * int(a[8])),
        torch.ops.moefx.moe_ffn: dispatch_formula(3, lambda a: int((a[1] >= 0).sum())),
        # scaled_dot_product_attention on CPU, which PyTorch's counter leaves out (it counts the CUDA kernels)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    }
    # One pass first, uncounted: a captured container (CapturedModule) that meets a new input structure captures
    # it with torch.export, whose traced ops the counter would count, and record symbolic sizes, as well.
    with torch.no_grad():
        model(*args, **kwargs)
    handles = []
    for name, module in layers:
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook))
    # Tokens: the rows the first FFN (dense or MoE) to run sees, e.g. a ViT's patches, not its pixel rows. An FFN
    # run in chunks (transformers' chunk_size_feed_forward) sees them over consecutive calls on pieces of one
    # tensor, which are summed; a module run again on another tensor (one FFN shared by every layer, as in
    # ALBERT) is not counted again. The first input is held until the pass ends, so that no later tensor
    # takes its storage's address.
    ffn_rows: list[int] = []
    first: list = []  # the first FFN to run and its input, while its calls are still being counted

    def count_rows(module, args, kwargs):
        x = _first_tensor(args, kwargs)
        if x is None or (ffn_rows and not first):
            return
        if not ffn_rows:
            first.extend((module, x))
            ffn_rows.append(0)
        elif first[0] is not module or x.untyped_storage().data_ptr() != first[1].untyped_storage().data_ptr():
            first.clear()  # another FFN, or another tensor: the first FFN's rows are all counted
            return
        ffn_rows[0] += x.numel() // x.shape[-1]

    ffn_groups = [[entry] if isinstance(entry, str) else list(entry) for entry in ffn_modules or ()]
    named = set(names[0] for names in ffn_groups if names)
    ffns = [m for _, m in layers] + [m for name, m in model.named_modules() if name and name in named]
    for module in ffns:
        handles.append(module.register_forward_pre_hook(count_rows, with_kwargs=True))
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        first.clear()
    counts = counter.get_flop_counts()
    total_flops = counter.get_total_flops()
    root = next((k for k in counts if k != "Global" and "." not in k), type(model).__name__)
    per_module = {k: sum(v.values()) for k, v in counts.items()}

    def flops_of(name: str) -> int:
        return per_module.get(f"{root}.{name}" if name else root, 0)

    n_tokens = tokens if tokens is not None else ffn_rows[0] if ffn_rows else _infer_tokens(args, kwargs)
    params = _count_parameters(model)
    active = float(params)
    moe_info = []
    for name, layer in layers:
        bank = layer.experts
        per_expert = sum(t.numel() // bank.num_experts for t in bank.weights() if t is not None)
        rec = records.get(name, {"tokens": 0, "assignments": 0, "calls": 0, "flops": 0})
        per_token = rec["assignments"] / rec["tokens"] if rec["tokens"] else 0.0
        active -= per_expert * bank.num_experts
        active += per_token * per_expert
        moe_info.append({"name": name, "tokens": rec["tokens"], "assignments": rec["assignments"],
                         "experts_per_token": per_token, "params_per_expert": per_expert,
                         "flops": rec["flops"]})
    if layers:
        ffn_flops: float | None = float(sum(d["flops"] for d in moe_info))
    elif ffn_modules:
        ffn_flops = float(sum(flops_of(name) for names in ffn_groups for name in names))
    else:
        ffn_flops = None
    return ModelCost(
        tokens=n_tokens,
        params=params,
        active_params_per_token=active,
        flops_per_token=total_flops / max(n_tokens, 1),
        ffn_flops_per_token=None if ffn_flops is None else ffn_flops / max(n_tokens, 1),
        ffn_layers=len(layers) or len(ffn_modules or []),
        moe_layers=moe_info,
    )


def _attention_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args, out_shape=None, **kwargs) -> int:
    """``softmax(q k^T) v``: ``2 * Sq * Sk * (Dk + Dv)`` per batch and query head, the two matrix products (like
    PyTorch's formula for the CUDA kernels: the causal mask's skipped half is counted too). Grouped-query
    attention (fewer key/value heads) costs the same per query head."""
    *lead, s_q, d_k = query
    s_k, d_v = key[-2], value[-1]
    return 2 * math.prod(lead) * s_q * s_k * (d_k + d_v)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module call's first tensor argument with at least one dimension (positional first), or None."""
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)


def _infer_tokens(args: tuple, kwargs: dict) -> int:
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors:
        return 1
    ints = [t for t in tensors if not t.is_floating_point()]
    if ints:
        return ints[0].numel()
    t = tensors[0]
    return t.numel() // t.shape[-1] if t.dim() >= 2 else t.numel()


# -- ONNX ------------------------------------------------------------------------------------------------


def count_onnx(path: str, feed: dict[str, Any], tokens: int) -> ModelCost:
    """Parameters and FLOPs of an ONNX model: ``MatMul``, ``Gemm``, ``Conv`` and ``com.microsoft.MoE`` nodes,
    counted from their operand shapes in one ONNX Runtime run on ``feed`` (every operand made a graph output,
    so the shapes are the real ones, symbolic dimensions and contrib ops included)."""
    import onnx  # optional: needs moefx[onnx]
    import onnxruntime as ort

    from ..onnx.schemas import MS_DOMAIN  # optional: needs moefx[onnx]

    model = onnx.load(path)
    graph = model.graph
    initial = {init.name: list(init.dims) for init in graph.initializer}
    counted = [n for n in graph.node if (n.op_type in ("MatMul", "Gemm", "Conv") and n.domain in ("", "ai.onnx"))
               or (n.op_type == "MoE" and n.domain == MS_DOMAIN)]
    wanted = {name for n in counted for name in (*n.input[:5], n.output[0]) if name and name not in initial}
    existing = {o.name for o in graph.output}
    for name in sorted(wanted - existing):
        graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {**initial, **{name: list(v.shape) for name, v in zip(names, session.run(names, feed))}}
    params = sum(math.prod(init.dims) for init in graph.initializer if init.data_type in _FLOAT_TYPES)
    flops = moe_flops = 0
    idle_expert_params = 0.0
    moe_info = []
    for node in counted:
        ins = [shapes.get(name) if name else None for name in node.input]
        out = shapes[node.output[0]]
        if node.op_type == "MatMul":
            flops += 2 * math.prod(out) * ins[0][-1]
        elif node.op_type == "Gemm":
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            flops += 2 * math.prod(out) * (ins[0][0] if trans_a else ins[0][1])
        elif node.op_type == "Conv":
            flops += 2 * math.prod(out) * math.prod(ins[1][1:])
        else:  # com.microsoft.MoE: input, router_probs, fc1 [E, rows, H], fc1 bias, fc2 [E, O, I], ...
            k = next((att.i for att in node.attribute if att.name == "k"), 1)
            experts, rows, hidden = ins[2]
            _, out_features, inter = ins[4]
            n_tokens = math.prod(ins[0][:-1])
            layer_flops = n_tokens * k * (2 * hidden * rows + 2 * inter * out_features)
            flops += layer_flops
            moe_flops += layer_flops
            idle_expert_params += (experts - k) * (rows * hidden + out_features * inter)
            moe_info.append({"name": node.name, "tokens": n_tokens, "assignments": n_tokens * k,
                             "experts_per_token": float(k), "flops": layer_flops})
    return ModelCost(
        tokens=tokens,
        params=int(params),
        active_params_per_token=params - idle_expert_params,
        flops_per_token=flops / max(tokens, 1),
        ffn_flops_per_token=moe_flops / max(tokens, 1) if moe_info else None,
        ffn_layers=len(moe_info),
        moe_layers=moe_info,
    )


_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
