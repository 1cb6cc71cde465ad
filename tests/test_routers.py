"""The router library against small references written from each paper's math in this file.

Every reference below recomputes routing from the router's parameters with plain loops or dense tensor
algebra and runs the experts one at a time through ``ExpertBank.expert_forward``; none calls the router or
the dispatch op under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moefx
from moefx.errors import ConfigError
from moefx.layers import ExpertBank, MoELayer, routing_stats
from moefx.routers import (
    ROUTER_TYPES,
    ExpertChoiceRouter,
    SoftMoERouter,
    StaticRouter,
    TaskRouter,
    TopKRouter,
    build_router,
    check_router_causality,
    model_causality,
)
from moefx.tasks import extract_task, modality, task_ids

from conftest import tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
H = 8  # hidden size of the layer-level tests
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _layer(router: str, *, num_experts: int = 4, seed: int = 0, router_std: float = 1.0, **options) -> MoELayer:
    """A standalone MoE layer ``[..., H] -> [..., H]`` with random experts and a non-trivial router."""
    config = moefx.MoEConfig(router=router, num_experts=num_experts, **options)
    gen = torch.Generator().manual_seed(seed)
    bank = ExpertBank(num_experts, H, 12, H, "gelu", gated=False, up_bias=True, down_bias=True)
    router_module = build_router(H, config)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for p in router_module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * router_std)
    return MoELayer(router_module, bank).eval()


def _inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _probs(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """Softmax router probabilities ``[T, E]`` from the gate weights (``softmax(W x)``)."""
    with torch.no_grad():
        return torch.softmax(tokens @ layer.router.gate.weight.t(), dim=-1)


def _ranked(row: torch.Tensor) -> list[int]:
    """Expert ids of one probability row, largest first."""
    row = row.detach()
    return sorted(range(len(row)), key=lambda e: -float(row[e]))


def _combine_reference(layer: MoELayer, tokens: torch.Tensor, assignment: list[list[tuple[int, float]]]):
    """``y_t = sum_(e, w) w * FFN_e(x_t)`` over a token's kept assignments, one expert call at a time."""
    out = torch.zeros(tokens.shape[0], layer.experts.out_features)
    for t, pairs in enumerate(assignment):
        for e, w in pairs:
            out[t] += w * layer.experts.expert_forward(e, tokens[t : t + 1])[0]
    return out


def _token_choice_reference(probs, k, capacity, normalize, order):
    """GShard/Switch token choice with capacity, filled in ``order`` (all first choices before seconds).

    Returns, per token, the kept ``(expert, weight)`` pairs.
    """
    num_tokens, num_experts = probs.shape
    chosen = [_ranked(probs[t])[:k] for t in range(num_tokens)]
    fill = [0] * num_experts
    kept: list[list[tuple[int, float]]] = [[] for _ in range(num_tokens)]
    for j in range(k):
        for t in order:
            e = chosen[t][j]
            if capacity is None or fill[e] < capacity:
                fill[e] += 1
                total = sum(float(probs[t, c]) for c in chosen[t]) if normalize else 1.0
                kept[t].append((e, float(probs[t, e]) / total))
    return kept


def _model_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------------------------------------
# every router converts real Transformers, trains, and reports
# ---------------------------------------------------------------------------------------------------------

ROUTER_OPTIONS = {
    "topk": {"capacity_factor": 1.0},
    "bpr": {"capacity_factor": 1.0},
    "expert-choice": {},
    "soft": {},
    "task": {"num_tasks": 3},
}


@pytest.mark.parametrize("router", sorted(ROUTER_OPTIONS))
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_router_converts_hf_model_and_trains(router, arch):
    """Convert, forward (train mode), backward: finite aux losses with gradients, stats for every layer."""
    config = moefx.MoEConfig(router=router, num_experts=4, top_k=2, z_loss_weight=1e-3, local_entropy_weight=1e-2,
                             global_entropy_weight=1e-2, allow_noncausal=True, **ROUTER_OPTIONS[router])
    with task_ids(0):  # convert() runs the model once to verify it; a task router needs ids for that
        model = moefx.convert(tiny_hf_model(arch), config)
    layers = moefx.moe_layers(model)
    assert len(layers) == 2
    assert all(type(layer.router) is ROUTER_TYPES[router] for _, layer in layers)
    model.train()
    ids = torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    with task_ids([0, 2, 1]), modality(ids % 2):
        out = _model_output(model(input_ids=ids))
    assert torch.isfinite(out).all()
    aux = moefx.aux_loss(model)
    assert torch.isfinite(aux) and aux.requires_grad
    for _, layer in layers:
        assert layer.aux_losses, "every router reports at least the z-loss and the entropy losses"
        assert all(torch.isfinite(v) and v.requires_grad for v in layer.aux_losses.values())
    (out.float().square().mean() + aux).backward()
    for _, layer in layers:
        grads = [p.grad for p in layer.router.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert layer.experts.w2.grad is not None and torch.isfinite(layer.experts.w2.grad).all()
    stats = routing_stats(model)
    assert list(stats) == [name for name, _ in layers]
    for entry in stats.values():
        assert entry["router"] == router and entry["tokens"] == 21
        assert set(entry["modalities"]) == {0, 1}
        assert 0.0 <= entry["routing_success_rate"] <= 1.0


def test_aux_loss_sums_every_layer():
    config = moefx.MoEConfig(num_experts=4, z_loss_weight=1e-3, local_entropy_weight=0.1)
    model = moefx.convert(tiny_hf_model("gpt2"), config)
    model(input_ids=torch.randint(0, 96, (2, 6)))
    want = sum(v for _, layer in moefx.moe_layers(model) for v in layer.aux_losses.values())
    torch.testing.assert_close(moefx.aux_loss(model), want)


# ---------------------------------------------------------------------------------------------------------
# topk: capacity and priority
# ---------------------------------------------------------------------------------------------------------


@PROPERTY
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(2, 6),
    k=st.integers(1, 3),
    cf=st.sampled_from([None, 0.25, 0.5, 1.0, 1.25, 2.0]),
    normalize=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_topk_matches_gshard_reference(tokens, experts, k, cf, normalize, seed):
    """Capacity C = ceil(T*cf/E) honoured exactly; all first choices before any second; drops output zero."""
    k = min(k, experts)
    layer = _layer("topk", num_experts=experts, top_k=k, capacity_factor=cf, normalize_weights=normalize, seed=seed)
    x = _inputs(tokens, H, seed=seed)
    y = layer(x)
    capacity = None if cf is None else math.ceil(tokens * cf / experts)
    kept = _token_choice_reference(_probs(layer, x), k, capacity, normalize, order=range(tokens))
    torch.testing.assert_close(y, _combine_reference(layer, x, kept), rtol=1e-4, atol=1e-5)
    load = [sum(e == f for pairs in kept for f, _ in pairs) for e in range(experts)]
    assert layer.router.last_stats.load.tolist() == load
    if capacity is not None:
        assert max(load) <= capacity
        # Honoured exactly: an expert below capacity dropped nothing routed to it.
        demand = [sum(e in _ranked(_probs(layer, x)[t])[:k] for t in range(tokens)) for e in range(experts)]
        assert load == [min(d, capacity) for d in demand]
    dropped = [t for t in range(tokens) if not kept[t]]
    if dropped:  # a token with every assignment dropped gets exactly zero: it passes through the residual
        assert torch.all(y[dropped] == 0)
    expected_drop = sum(k - len(p) for p in kept) / (tokens * k)
    assert layer.router.last_stats.dropped_fraction == pytest.approx(expected_drop)


def test_dropped_tokens_pass_through_the_residual_in_a_model():
    """Capacity drops inside GPT-2: a dropped token's MoE output is zero, so the block output is its input."""
    config = moefx.MoEConfig(num_experts=4, top_k=1, capacity_factor=0.25, router_init_std=1.0)
    model = moefx.convert(tiny_hf_model("gpt2"), config)
    layer = moefx.moe_layers(model)[0][1]
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    model(input_ids=torch.randint(0, 96, (2, 16)))
    index = layer.router.last_stats
    assert index.dropped_fraction > 0.5
    y = seen["y"].reshape(-1, seen["y"].shape[-1])
    zero_rows = (y == 0).all(-1).sum().item()
    assert zero_rows == round(index.dropped_fraction * y.shape[0])


# ---------------------------------------------------------------------------------------------------------
# bpr: Batch Priority Routing
# ---------------------------------------------------------------------------------------------------------


@PROPERTY
@given(
    tokens=st.integers(2, 40),
    experts=st.integers(2, 5),
    k=st.integers(1, 2),
    cf=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_bpr_matches_priority_reference(tokens, experts, k, cf, seed):
    """Tokens sorted by their top gate value (descending) fill the capacity buffers."""
    layer = _layer("bpr", num_experts=experts, top_k=k, capacity_factor=cf, seed=seed, router_std=2.0)
    x = _inputs(tokens, H, seed=seed)
    y = layer(x)
    probs = _probs(layer, x)
    order = sorted(range(tokens), key=lambda t: -float(probs[t].max()))
    kept = _token_choice_reference(probs, k, math.ceil(tokens * cf / experts), True, order)
    torch.testing.assert_close(y, _combine_reference(layer, x, kept), rtol=1e-4, atol=1e-5)


@PROPERTY
@given(tokens=st.integers(4, 48), experts=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_bpr_drops_the_lowest_priority_tokens(tokens, experts, seed):
    """Under a tight capacity (top-1), every token an expert dropped has a lower top gate than any it kept."""
    layer = _layer("bpr", num_experts=experts, top_k=1, capacity_factor=0.5, seed=seed, router_std=2.0)
    x = _inputs(tokens, H, seed=seed)
    routing = layer.router(x)
    probs = _probs(layer, x)
    top_gate, choice = probs.max(-1)
    for e in range(experts):
        mine = choice == e
        kept = top_gate[mine & (routing.expert_index[:, 0] == e)]
        dropped = top_gate[mine & (routing.expert_index[:, 0] < 0)]
        if len(kept) and len(dropped):
            assert float(dropped.max()) <= float(kept.min())
        assert len(kept) == min(int(mine.sum()), math.ceil(tokens * 0.5 / experts))
    plain = _layer("topk", num_experts=experts, top_k=1, capacity_factor=0.5, seed=seed, router_std=2.0)
    plain_kept = plain.router(x).expert_index[:, 0] >= 0
    bpr_kept = routing.expert_index[:, 0] >= 0
    assert bpr_kept.sum() == plain_kept.sum()  # same number kept, chosen by priority instead of position
    assert float(top_gate[bpr_kept].sum()) >= float(top_gate[plain_kept].sum()) - 1e-6


# ---------------------------------------------------------------------------------------------------------
# expert-choice
# ---------------------------------------------------------------------------------------------------------


@PROPERTY
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 20),
    experts=st.integers(2, 6),
    cf=st.sampled_from([None, 0.5, 1.0, 2.0, 3.0]),
    seed=st.integers(0, 10_000),
)
def test_expert_choice_matches_reference(batch, seq, experts, cf, seed):
    """Each expert takes its top-C tokens of each sequence, C = ceil(m*cf/E); combine weight = S[t, e]."""
    layer = _layer("expert-choice", num_experts=experts, top_k=2, capacity_factor=cf, seed=seed)
    x = _inputs(batch, seq, H, seed=seed)
    y = layer(x)
    c = min(seq, max(1, math.ceil(seq * (2 if cf is None else cf) / experts)))
    kept: list[list[tuple[int, float]]] = [[] for _ in range(batch * seq)]
    per_token = [0] * (batch * seq)
    for b in range(batch):
        scores = _probs(layer, x[b])  # [m, E]
        for e in range(experts):
            for t in sorted(range(seq), key=lambda i: -float(scores[i, e]))[:c]:
                kept[b * seq + t].append((e, float(scores[t, e])))
                per_token[b * seq + t] += 1
    want = _combine_reference(layer, x.reshape(-1, H), [sorted(p) for p in kept])
    torch.testing.assert_close(y.reshape(-1, H), want, rtol=1e-4, atol=1e-5)
    stats = layer.router.last_stats
    assert stats.load.tolist() == [batch * c] * experts  # every expert processes exactly C tokens per sequence
    assert stats.dropped_fraction == pytest.approx(per_token.count(0) / len(per_token))


def test_expert_choice_gives_a_token_zero_to_all_experts():
    layer = _layer("expert-choice", num_experts=4, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # experts all love large x[0]
    x = torch.zeros(1, 8, H)
    x[0, :, 0] = torch.arange(8.0)
    routing = layer.router(x.reshape(-1, H), 8)
    per_token = (routing.expert_index >= 0).sum(-1)
    # C = 2 per expert: expert 0 takes the largest x[0], the flatter experts the smallest ones.
    assert per_token.sum() == 4 * 2 and per_token.min() == 0 and per_token.max() >= 3
    assert torch.all(layer(x)[0, per_token == 0] == 0)  # untaken tokens pass through the residual


# ---------------------------------------------------------------------------------------------------------
# soft
# ---------------------------------------------------------------------------------------------------------


def _soft_reference(layer: MoELayer, x: torch.Tensor, p: int) -> torch.Tensor:
    """Soft MoE from the paper: L = norm(X) (scale * norm(Phi)); D = softmax_m(L); C = softmax_slots(L)."""
    router = layer.router
    n = router.num_experts
    phi = router.slots[:, :, :p].reshape(H, n * p)  # slot s = (expert s // p, slot s % p)
    phi = phi / phi.norm(dim=0, keepdim=True) * router.log_scale.exp()
    out = []
    for seq in x:  # one group per sequence
        logits = (seq / seq.norm(dim=-1, keepdim=True)) @ phi  # [m, n*p]
        dispatch = torch.softmax(logits, dim=0)
        combine = torch.softmax(logits, dim=1)
        slots = dispatch.t() @ seq  # [n*p, d]
        ys = torch.stack([layer.experts.expert_forward(s // p, slots[s : s + 1])[0] for s in range(n * p)])
        out.append(combine @ ys)
    return torch.stack(out)


@pytest.mark.parametrize(("seq", "options", "p"), [
    (8, {}, 2),  # default: m / n slots per expert
    (10, {}, 3),  # ceil(m / n)
    (8, {"capacity_factor": 0.5}, 1),
    (8, {"slots_per_expert": 3}, 3),  # configurable
])
def test_soft_matches_reference_and_gradients(seq, options, p):
    layer = _layer("soft", num_experts=4, router_std=1.0, **options)
    x = _inputs(2, seq, H).requires_grad_(True)
    y = layer(x)
    assert layer.router.slots_per_expert(seq) == p
    want = _soft_reference(layer, x, p)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    # Fully differentiable: the gradients through the slots match those of the dense reference.
    params = [x, layer.router.slots, layer.router.log_scale, layer.experts.w1]
    got = torch.autograd.grad(y.square().sum(), params)
    ref = torch.autograd.grad(want.square().sum(), params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
        assert g.abs().sum() > 0
    assert layer.router.last_stats.dropped_fraction == 0.0  # no token dropped


@PROPERTY
@given(seq=st.integers(2, 16), seed=st.integers(0, 10_000), data=st.data())
def test_soft_is_permutation_equivariant_and_sequences_are_independent(seq, seed, data):
    layer = _layer("soft", num_experts=3, seed=seed)
    x = _inputs(3, seq, H, seed=seed)
    y = layer(x)
    perm = torch.tensor(data.draw(st.permutations(range(seq))))
    torch.testing.assert_close(layer(x[:, perm]), y[:, perm], rtol=1e-4, atol=1e-5)
    other = _inputs(2, seq, H, seed=seed + 1)  # change the other sequences of the batch
    torch.testing.assert_close(layer(torch.cat([x[:1], other]))[0], y[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# task
# ---------------------------------------------------------------------------------------------------------


def test_task_routing_depends_only_on_the_task():
    layer = _layer("task", num_experts=6, top_k=2, num_tasks=3)
    x = _inputs(4, 5, H)
    with task_ids([2, 0, 2, 1]):
        routing = layer.router(x.reshape(-1, H), 5)
        y = layer(x)
    table = torch.softmax(layer.router.task_logits.detach(), -1)
    for b, task in enumerate([2, 0, 2, 1]):
        experts = _ranked(table[task])[:2]
        index = routing.expert_index[b * 5 : (b + 1) * 5]
        assert all(sorted(row) == sorted(experts) for row in index.tolist())  # every token of the task
        total = sum(float(table[task, e]) for e in experts)
        want = _combine_reference(layer, x[b], [[(e, float(table[task, e]) / total) for e in experts]] * 5)
        torch.testing.assert_close(y[b], want, rtol=1e-4, atol=1e-5)
    with task_ids(1):  # one int for the whole batch
        y1 = layer(x)
    with task_ids([1, 1, 1, 1]):
        torch.testing.assert_close(layer(x), y1)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_extract_task_is_smaller_and_identical(arch):
    config = moefx.MoEConfig(router="task", num_tasks=3, num_experts=4, top_k=2, init="random",
                             router_init_std=1.0)
    with task_ids(0):
        model = moefx.convert(tiny_hf_model(arch), config)
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    for task in range(3):
        with task_ids(task):
            want = _model_output(model(input_ids=ids))
        small = extract_task(model, task)
        assert small.moefx_info.source["extracted_task"] == task
        got = _model_output(small(input_ids=ids))  # no task context needed
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        layers = moefx.moe_layers(small)
        assert all(isinstance(layer.router, StaticRouter) and layer.num_experts == 2 for _, layer in layers)
        big_params = sum(p.numel() for p in model.parameters())
        small_params = sum(p.numel() for p in small.parameters())
        expert_params = sum(p.numel() for _, layer in moefx.moe_layers(model) for p in layer.experts.parameters())
        assert small_params <= big_params - expert_params // 2
    with task_ids(0):  # the original is untouched
        torch.testing.assert_close(_model_output(model(input_ids=ids)), _model_output(extract_task(model, 0)(input_ids=ids)))


def test_task_errors_say_what_to_pass():
    with pytest.raises(ConfigError, match="num_tasks"):
        moefx.MoEConfig(router="task")
    with pytest.raises(ConfigError, match="capacity_factor"):
        moefx.MoEConfig(router="task", num_tasks=2, capacity_factor=1.0)
    layer = _layer("task", num_tasks=3)
    x = _inputs(2, 5, H)
    with pytest.raises(ConfigError, match=r"moefx\.tasks\.task_ids"):
        layer(x)
    with task_ids([0, 1, 2]), pytest.raises(ConfigError, match="one task id per example"):
        layer(x)
    with task_ids(7), pytest.raises(ConfigError, match="num_tasks=3"):
        layer(x)
    with pytest.raises(ConfigError, match="one int"):
        task_ids([[[0, 1]]]).__enter__()  # 3-D: neither per example nor per token
    with pytest.raises(ConfigError, match="router='task'"):
        extract_task(_layer("topk"), 0)
    with pytest.raises(ConfigError, match="out of range"):
        extract_task(layer, 5)


# ---------------------------------------------------------------------------------------------------------
# aux losses and statistics
# ---------------------------------------------------------------------------------------------------------


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p)).sum(-1)


@pytest.mark.parametrize("threshold", [None, 0.5, 10.0])
@pytest.mark.parametrize("with_modality", [False, True])
def test_aux_losses_match_reference(threshold, with_modality):
    weights = {"load_balance_weight": 0.3, "z_loss_weight": 0.2, "local_entropy_weight": 0.5,
               "global_entropy_weight": 0.7}
    layer = _layer("topk", num_experts=4, top_k=2, capacity_factor=1.0, global_entropy_threshold=threshold,
                   **weights)
    x = _inputs(3, 6, H)
    mask = (torch.arange(18).reshape(3, 6) % 3 == 0).long()  # modality 1: every third token
    if with_modality:
        with modality(mask):
            layer(x)
    else:
        layer(x)
    aux = layer.aux_losses
    tokens = x.reshape(-1, H)
    logits = tokens @ layer.router.gate.weight.t()
    probs = torch.softmax(logits, -1)
    first = torch.tensor([_ranked(p)[0] for p in probs])
    f = torch.stack([(first == e).float().mean() for e in range(4)])
    torch.testing.assert_close(aux["load_balance"], 0.3 * 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(aux["z_loss"], 0.2 * torch.logsumexp(logits, -1).square().mean())
    groups = [probs[mask.reshape(-1) == m] for m in (0, 1)] if with_modality else [probs]
    local = sum(_entropy(g).mean() for g in groups) / len(groups)
    torch.testing.assert_close(aux["local_entropy"], 0.5 * local)
    if threshold is None:
        glob = sum(-_entropy(g.mean(0)) for g in groups) / len(groups)
    else:
        glob = sum(torch.clamp(threshold - _entropy(g.mean(0)), min=0) for g in groups) / len(groups)
    torch.testing.assert_close(aux["global_entropy"], 0.7 * glob)
    if threshold == 10.0:  # above log(E): the thresholded loss is still pushing, with a gradient
        assert aux["global_entropy"] > 0 and aux["global_entropy"].requires_grad


def test_global_entropy_threshold_stops_pushing():
    layer = _layer("topk", num_experts=4, global_entropy_weight=1.0, global_entropy_threshold=0.1, router_std=0.01)
    layer(_inputs(2, 5, H))  # near-uniform routing: entropy ~ log 4 > 0.1
    assert layer.aux_losses["global_entropy"].item() == 0.0


def test_routing_stats_per_layer_and_modality():
    config = moefx.MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0, router_init_std=1.0)
    model = moefx.convert(tiny_hf_model("bert"), config)
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :3] = True
    with modality(mask):
        model(input_ids=ids)
    stats = routing_stats(model)
    assert len(stats) == 2
    for entry in stats.values():
        assert sum(entry["load"]) == round(20 * (1 - entry["dropped_fraction"]))
        assert max(entry["load"]) <= 5  # ceil(20 * 1.0 / 4)
        assert entry["balance"] == pytest.approx(sum(entry["load"]) / 4 / max(entry["load"]))
        text, image = entry["modalities"][0], entry["modalities"][1]
        assert (text["tokens"], image["tokens"]) == (14, 6)
        assert [a + b for a, b in zip(text["load"], image["load"])] == entry["load"]
        rate = (text["routing_success_rate"] * 14 + image["routing_success_rate"] * 6) / 20
        assert rate == pytest.approx(entry["routing_success_rate"])
    with pytest.raises(ConfigError, match="one modality id per token"), modality(torch.zeros(3, 3, dtype=torch.long)):
        model(input_ids=ids)


# ---------------------------------------------------------------------------------------------------------
# causality
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["soft", "expert-choice"])
def test_token_mixing_routers_leak_the_future_in_a_causal_decoder(router):
    """Perturb the last token of a GPT-2 input: with a token-mixing router, earlier positions change."""
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    variants = [ids.clone() for _ in range(4)]
    for i, changed in enumerate(variants):
        changed[0, -1] = (ids[0, -1] + 7 * (i + 1)) % 96
    leaks = {}
    for name in ("topk", router):
        config = moefx.MoEConfig(router=name, num_experts=4, top_k=1, allow_noncausal=True, init="random",
                                 router_init_std=1.0)
        model = moefx.convert(tiny_hf_model("gpt2"), config)
        with torch.no_grad():
            base = model(input_ids=ids).logits[0, :-1]
            leaks[name] = torch.stack([(model(input_ids=v).logits[0, :-1] - base).abs().amax(-1) for v in variants])
    assert leaks["topk"].max() < 1e-5  # token choice stays causal: earlier positions do not move
    assert leaks[router].max() > 1e-3  # an earlier position saw the future token
    if router == "soft":
        assert (leaks[router][:, 0] > 1e-4).all()  # every slot mixes every token: even position 0 moves


def test_check_router_causality_refuses_token_mixing_on_causal_models():
    gpt2, llama, bert = tiny_hf_model("gpt2"), tiny_hf_model("llama"), tiny_hf_model("bert")
    for router in ("soft", "expert-choice"):
        for model in (gpt2, llama):
            with pytest.raises(ConfigError, match="allow_noncausal=True") as info:
                check_router_causality(model, moefx.MoEConfig(router=router))
            assert "\n" not in str(info.value) and router in str(info.value)
            check_router_causality(model, moefx.MoEConfig(router=router, allow_noncausal=True))
        check_router_causality(bert, moefx.MoEConfig(router=router))  # an encoder is fine
    for router in ("topk", "bpr"):
        check_router_causality(gpt2, moefx.MoEConfig(router=router, capacity_factor=1.0))
    check_router_causality(llama, moefx.MoEConfig(router="task", num_tasks=2))
    assert model_causality(bert) is None and model_causality(gpt2)
    assert model_causality(tiny_hf_model("vit")) is None and model_causality(tiny_hf_model("distilbert")) is None
    assert "is_causal" in model_causality(tiny_hf_model("t5"))  # its decoder attends causally
    # a converted model is still recognised (the attention modules keep is_causal)
    converted = moefx.convert(gpt2, moefx.MoEConfig(num_experts=2, top_k=1))
    with pytest.raises(ConfigError):
        check_router_causality(converted, moefx.MoEConfig(router="soft"))


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"router": "switch"}, "unknown router 'switch': choose one of bpr, expert-choice, soft, task, topk"),
    ({"router": "bpr"}, "needs a capacity_factor"),
    ({"router": "topk", "slots_per_expert": 2}, "only applies to router='soft'"),
    ({"router": "soft", "slots_per_expert": 0}, "slots_per_expert must be at least 1"),
    ({"router": "topk", "num_tasks": 2}, "only applies to router='task'"),
    ({"router": "task", "num_tasks": 0}, "num_tasks must be at least 1"),
    ({"local_entropy_weight": -1.0}, "local_entropy_weight must be a non-negative number"),
    ({"global_entropy_threshold": float("nan")}, "global_entropy_threshold must be a non-negative number"),
    ({"allow_noncausal": "yes"}, "allow_noncausal must be True or False"),
    ({"max_slots_per_expert": 0}, "max_slots_per_expert must be at least 1"),
])
def test_wrong_router_options_are_clear_config_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moefx.MoEConfig(**options)


def test_config_round_trips_and_old_configs_load():
    config = moefx.MoEConfig(router="soft", slots_per_expert=2, local_entropy_weight=0.1,
                             global_entropy_weight=0.2, global_entropy_threshold=1.0, allow_noncausal=True)
    assert moefx.MoEConfig.from_dict(config.to_dict()) == config
    task = moefx.MoEConfig(router="task", num_tasks=5)
    assert moefx.MoEConfig.from_dict(task.to_dict()) == task
    old = {"version": 1, "router": "topk", "num_experts": 8, "top_k": 2, "capacity_factor": None,
           "normalize_weights": True, "router_init_std": 0.02, "load_balance_weight": 0.01, "z_loss_weight": 0.0,
           "init": "upcycle", "init_noise": 0.0, "expert_size": None, "seed": 0, "every": 1, "last": None,
           "layers": None, "exclude": None}
    assert moefx.MoEConfig.from_dict(old) == moefx.MoEConfig()


def test_every_config_router_has_a_class():
    assert set(ROUTER_TYPES) == set(moefx.config.ROUTERS)
    assert {name for name, cls in ROUTER_TYPES.items() if cls.mixes_tokens} == {"soft", "expert-choice"}
    assert isinstance(build_router(H, moefx.MoEConfig(router="soft")), SoftMoERouter)
    assert isinstance(build_router(H, moefx.MoEConfig(router="task", num_tasks=1)), TaskRouter)


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", sorted(ROUTER_OPTIONS))
def test_layer_exports_with_dynamic_shapes(router):
    """torch.export traces each router's layer (batch and sequence dynamic) and matches eager elsewhere."""
    layer = _layer(router, **ROUTER_OPTIONS[router])
    auto = torch.export.Dim.AUTO
    with task_ids(1):
        program = torch.export.export(layer, (_inputs(2, 12, H),), dynamic_shapes=({0: auto, 1: auto},),
                                      strict=False)
        other = _inputs(3, 10, H, seed=5)
        torch.testing.assert_close(program.module()(other), layer(other), rtol=1e-5, atol=1e-6)
    ops = {n.target for n in program.graph.nodes if n.op == "call_function"}
    fused = torch.ops.moefx.topk_moe.default if router == "task" else torch.ops.moefx.moe_ffn.default
    assert fused in ops  # the experts stay one dispatch node


# ---------------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_aux.py", "limoe.py"])
def test_examples_run(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEFX_EXAMPLE_STEPS": "20"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "success rate" in result.stdout or "balance" in result.stdout, result.stdout


@pytest.mark.parametrize("router_cls", [TopKRouter, ExpertChoiceRouter])
def test_gate_takes_the_kernel_gemm_only_when_nothing_observes_it(monkeypatch, router_cls):
    """In eager inference the gate runs through the eager kernel's GEMM routine, with nn.Linear's logits; with
    autograd, a hook on the gate, a dispatch mode (a FLOP counter), autocast or a tensor-subclass weight it is
    the module call."""
    from torch.utils.flop_counter import FlopCounterMode

    from moefx import ops

    routine, calls = ops.linear_here, []
    monkeypatch.setattr(ops, "linear_here", lambda *args: calls.append(args[0].shape) or routine(*args))
    router = router_cls(32, moefx.MoEConfig(num_experts=8, top_k=2, init="split")).eval()  # split: gate bias
    assert router.gate.bias is not None or router_cls is ExpertChoiceRouter
    x = torch.randn(40, 32)
    with torch.no_grad():
        expected = router.gate(x).float()
    with torch.inference_mode():
        logits = router(x, 40).logits
    assert calls == [x.shape]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)

    calls.clear()
    assert router(x, 40).logits.requires_grad  # autograd: the module
    seen = []
    hook = router.gate.register_forward_hook(lambda *_: seen.append(True))
    with torch.inference_mode():
        router(x, 40)
    hook.remove()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        router(x, 40)
    assert counter.get_total_flops() >= 2 * 40 * 32 * 8
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        router(x, 40)  # autocast runs the module's GEMM in bfloat16

    class Wrapped(torch.Tensor):  # a weight of a tensor subclass (quantized weights are) handles its own GEMM
        pass

    router.gate.weight = torch.nn.Parameter(router.gate.weight.detach().as_subclass(Wrapped), requires_grad=False)
    with torch.inference_mode():
        router(x, 40)
    assert calls == [] and seen == [True]


def test_task_context_for_commands():
    """``task_context`` (what --task-id does): the task's ids for a task-routed model, nothing for another, and
    one clear error for a missing task, one out of range, a negative one, or a task for a token-routed model."""
    from moefx.tasks import current_task_ids, task_context

    tasks = MoELayer(TaskRouter(8, moefx.MoEConfig(router="task", num_tasks=3, num_experts=4)),
                     ExpertBank(4, 8, 12, 8, "silu", gated=False, up_bias=False, down_bias=False))
    tokens = MoELayer(TopKRouter(8, moefx.MoEConfig(num_experts=4)),
                      ExpertBank(4, 8, 12, 8, "silu", gated=False, up_bias=False, down_bias=False))
    with task_context(tasks, 2):
        assert current_task_ids() == 2
    with task_context(tokens, None):
        assert current_task_ids() is None
    for model, task, says in [(tasks, None, "route by task .* --task-id N"), (tasks, 3, "out of range: .* 3 tasks"),
                              (tasks, -1, "non-negative"), (tokens, 0, "applies to models converted with")]:
        with pytest.raises(ConfigError, match=says):
            task_context(model, task, "m")
