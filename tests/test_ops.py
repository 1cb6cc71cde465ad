"""The dispatch ops against a per-token reference written from the math, plus autograd and export."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import moefx
from moefx.activations import ACTIVATIONS
from moefx.layers import ExpertBank, MoELayer
from moefx.routers import TopKRouter


def _weights(E=4, H=8, I=12, O=8, gated=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    return (r(E, I, H), r(E, I) if bias else None, r(E, I, H) if gated else None,
            r(E, I) if gated and bias else None, r(E, O, I), r(E, O) if bias else None)


def _per_token_reference(x, index, weight, w1, b1, w3, b3, w2, b2, act):
    """y_t = sum_j weight[t, j] * FFN_{index[t, j]}(x_t), skipping index -1; one token at a time."""
    f = ACTIVATIONS[act]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e < 0:
                continue
            xt = x[t].double()
            h = w1[e].double() @ xt + (b1[e].double() if b1 is not None else 0)
            h = f(h)
            if w3 is not None:
                h = h * (w3[e].double() @ xt + (b3[e].double() if b3 is not None else 0))
            y = w2[e].double() @ h + (b2[e].double() if b2 is not None else 0)
            out[t] += float(weight[t, j]) * y
    return out


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_moe_ffn_matches_per_token_reference(gated, bias, act):
    w = _weights(gated=gated, bias=bias)
    x = torch.randn(10, 8)
    index = torch.randint(0, 4, (10, 2))
    index[3, 1] = -1  # a dropped assignment contributes nothing
    weight = torch.rand(10, 2)
    got = torch.ops.moefx.moe_ffn(x, index, weight, *w, act)
    want = _per_token_reference(x, index, weight, *w, act)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_topk_moe_matches_softmax_topk_reference(normalize):
    w = _weights(gated=True)
    x = torch.randn(9, 8)
    logits = torch.randn(9, 4)
    probs = torch.softmax(logits.double(), -1)
    top = probs.topk(2, dim=-1)
    weight = top.values / top.values.sum(-1, keepdim=True) if normalize else top.values
    want = _per_token_reference(x, top.indices, weight, *w, "silu")
    got = torch.ops.moefx.topk_moe(x, logits, *w, 2, normalize, "silu")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_route_topk_is_softmax_topk_with_its_gradient(normalize):
    """route_topk (top k of the logits first when renormalising) equals softmax -> top k -> renormalise, in
    value and gradient, also for logits large enough to overflow a naive exp."""
    for offset in (0.0, 500.0):
        logits = (torch.randn(33, 8, dtype=torch.float64) * 2 + offset).requires_grad_(True)
        probs = torch.softmax(logits.float().double(), -1)  # route_topk computes in float32
        top = probs.topk(3, dim=-1)
        want = top.values / top.values.sum(-1, keepdim=True) if normalize else top.values
        index, weight = moefx.ops.route_topk(logits, 3, normalize)
        assert torch.equal(index, top.indices)
        torch.testing.assert_close(weight.double(), want.float().double(), rtol=1e-6, atol=1e-7)
        probe = torch.randn(33, 3, dtype=torch.float64)
        want_grad, = torch.autograd.grad((want * probe).sum(), logits)
        got_grad, = torch.autograd.grad((weight.double() * probe).sum(), logits)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_ops_backward_matches_autograd_of_reference():
    w = [t.requires_grad_(True) if t is not None else None for t in _weights(gated=True)]
    x = torch.randn(12, 8, requires_grad=True)
    logits = torch.randn(12, 4, requires_grad=True)
    y = torch.ops.moefx.topk_moe(x, logits, *w, 2, True, "gelu")
    grads = torch.autograd.grad(y.square().sum(), [x, logits, *[t for t in w if t is not None]])
    # Reference: the same math written with plain differentiable ops, dense over experts.
    probs = torch.softmax(logits, -1)
    vals, idx = probs.topk(2, -1)
    vals = vals / vals.sum(-1, keepdim=True)
    gate = torch.zeros_like(probs).scatter(1, idx, vals)  # [T, E]
    w1, b1, w3, b3, w2, b2 = w
    h = F.gelu(torch.einsum("th,eih->tei", x, w1) + b1) * (torch.einsum("th,eih->tei", x, w3) + b3)
    ref = torch.einsum("tei,eoi->teo", h, w2) + b2
    ref_y = (gate.unsqueeze(-1) * ref).sum(1)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref_y.square().sum(), [x, logits, *[t for t in w if t is not None]])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _layer(capacity_factor=None, E=4, k=2):
    cfg = moefx.MoEConfig(num_experts=E, top_k=k, capacity_factor=capacity_factor)
    bank = ExpertBank(E, 8, 12, 8, "relu", gated=False, up_bias=True, down_bias=True)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    return MoELayer(TopKRouter(8, cfg), bank)


def test_capacity_is_honoured_exactly_and_dropped_tokens_output_zero():
    layer = _layer(capacity_factor=0.5, E=4, k=1).eval()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0  # every token prefers expert 0
    x = torch.rand(16, 8) + 0.1
    y = layer(x)
    capacity = -(-16 * 0.5 // 4)  # ceil(T * cf / E) = 2
    stats = layer.router.last_stats
    assert int(stats.load[0]) == capacity
    dropped = (y.abs().sum(-1) == 0).sum().item()
    assert dropped == 16 - capacity
    assert stats.dropped_fraction == pytest.approx((16 - capacity) / 16)


def test_export_keeps_one_dispatch_node_per_layer():
    layer = _layer().eval()
    ep = torch.export.export(layer, (torch.randn(2, 5, 8),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moefx.topk_moe.default) == 1
    capped = torch.export.export(_layer(capacity_factor=1.0).eval(), (torch.randn(2, 5, 8),))
    targets = [n.target for n in capped.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moefx.moe_ffn.default) == 1


def test_fake_impl_shapes():
    torch.library.opcheck(torch.ops.moefx.topk_moe.default,
                          (torch.randn(5, 8), torch.randn(5, 4), *_weights(gated=True), 2, True, "silu"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (the kernel's multi-threaded paths), the caller's count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _new_thread_count() -> int:
    """The intra-op thread count a thread that has not used torch yet starts with."""
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def _kernel_case(tokens=60, k=2):
    weights = _weights(E=4, H=16, I=24, O=16, gated=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 16, generator=g)
    index = torch.randint(0, 4, (tokens, k), generator=g)
    index[tokens // 2, 1] = -1  # a dropped assignment
    return x, index, torch.rand(tokens, k, generator=g), weights


def test_eager_kernel_runs_glue_on_one_thread_and_gemms_on_all(monkeypatch, two_threads):
    """Without expert threads, with several intra-op threads the kernel runs its small ops on one thread and
    the GEMMs of experts with many rows on all of them, gives the per-token reference, and leaves the thread
    count as it found it."""
    from moefx import ops

    monkeypatch.setattr(ops, "_EXPERT_THREADS", False)
    monkeypatch.setattr(ops, "_MULTITHREAD_MIN_ROWS", 4)
    seen = {"gemm": set(), "activation": set()}
    here, silu = ops.linear_here, ACTIVATIONS["silu"]
    monkeypatch.setattr(ops, "linear_here", lambda *a: (seen["gemm"].add(torch.get_num_threads()), here(*a))[1])
    monkeypatch.setitem(ACTIVATIONS, "silu", lambda h: (seen["activation"].add(torch.get_num_threads()), silu(h))[1])
    x, index, weight, weights = _kernel_case(40)
    with torch.no_grad():
        got = ops.moe_ffn_kernel(x, index, weight, *weights, "silu")
    assert torch.get_num_threads() == 2
    assert seen == {"gemm": {2}, "activation": {1}}, seen
    want = _per_token_reference(x, index, weight, *weights, "silu")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tokens", "k"), [(3, 2), (60, 2), (60, 3)])
def test_eager_kernel_splits_rows_between_expert_threads(monkeypatch, tokens, k, two_threads):
    """With 2 intra-op threads the kernel's expert rows run on two threads (the caller and a worker), each
    with one intra-op thread; the result is the per-token reference, in and out of inference mode, and the
    caller's thread count, and the count new threads start with, are left as they were. (Top-2 pieces add
    into one output, top-3 ones into their own.)"""
    import threading

    from moefx import ops

    seen = set()
    here = ops.linear_here
    monkeypatch.setattr(ops, "linear_here", lambda *a: (
        seen.add((threading.current_thread().name, torch.get_num_threads())), here(*a))[1])
    x, index, weight, weights = _kernel_case(tokens, k)
    want = _per_token_reference(x, index, weight, *weights, "silu")
    with torch.no_grad():
        got = ops.moe_ffn_kernel(x, index, weight, *weights, "silu")
    with torch.inference_mode():
        got_inference = ops.moe_ffn_kernel(x, index, weight, *weights, "silu")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_inference.double(), want, rtol=1e-5, atol=1e-5)
    assert {n for n, _ in seen} == {threading.current_thread().name, "moefx-experts-0"}, seen
    # Through the op with weights that require grad: no graph under no_grad, the op's graph otherwise.
    params = [w.requires_grad_() if w is not None else None for w in weights]
    with torch.no_grad():
        assert not torch.ops.moefx.moe_ffn(x, index, weight, *params, "silu").requires_grad
    y = torch.ops.moefx.moe_ffn(x, index, weight, *params, "silu")
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(w.grad is not None for w in params if w is not None)
    assert {c for _, c in seen} == {1}
    assert torch.get_num_threads() == 2
    assert _new_thread_count() == 2


def test_expert_threads_lose_no_addition_into_the_shared_output(two_threads):
    """Top-2 pieces add into one output under a lock: with every token sent to experts 0 and 1, one per thread,
    both threads add into every row at about the same time, and no run loses an addition."""
    from moefx import ops

    g = torch.Generator().manual_seed(0)
    tokens, hidden = 16384, 128
    x = torch.randn(tokens, hidden, generator=g)
    index = torch.stack([torch.zeros(tokens, dtype=torch.long), torch.ones(tokens, dtype=torch.long)], dim=1)
    weight = torch.full((tokens, 2), 0.5)
    w1, w2 = torch.randn(2, 8, hidden, generator=g) * 0.1, torch.randn(2, hidden, 8, generator=g) * 0.1
    want = _per_token_reference(x[:64], index[:64], weight[:64], w1, None, None, None, w2, None, "silu")
    ref = sum(0.5 * F.linear(F.silu(F.linear(x, w1[e])), w2[e]) for e in range(2))
    torch.testing.assert_close(ref[:64].double(), want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        for _ in range(100):
            got = ops.moe_ffn_kernel(x, index, weight, w1, None, None, None, w2, None, "silu")
            assert (got - ref).abs().max() < 1e-4


def test_expert_workers_run_on_one_intra_op_thread_and_leave_the_callers_count(two_threads):
    """Workers made outside the kernel too: each keeps one intra-op thread (also in its first task), and the
    caller's count and the default of new threads stay what they were."""
    from moefx import ops

    workers = ops._ExpertWorkers(3)
    try:
        assert workers.submit(torch.get_num_threads).result(timeout=30) == 1
        assert [workers.submit(torch.get_num_threads).result(timeout=30) for _ in range(6)] == [1] * 6
        assert torch.get_num_threads() == 2
        assert _new_thread_count() == 2
    finally:
        workers.close()


def test_eager_kernel_raises_an_error_from_an_expert_thread(monkeypatch, two_threads):
    """An error in a worker's piece reaches the caller (after every piece has finished), and the workers
    keep serving later calls."""
    import threading

    from moefx import ops

    rows = ops._expert_rows

    def failing(x, e, *args):
        if threading.current_thread().name.startswith("moefx-experts"):
            raise RuntimeError("worker failed")
        return rows(x, e, *args)

    x, index, weight, weights = _kernel_case()
    monkeypatch.setattr(ops, "_expert_rows", failing)
    with pytest.raises(RuntimeError, match="worker failed"), torch.no_grad():
        ops.moe_ffn_kernel(x, index, weight, *weights, "silu")
    monkeypatch.setattr(ops, "_expert_rows", rows)
    with torch.no_grad():
        got = ops.moe_ffn_kernel(x, index, weight, *weights, "silu")
    torch.testing.assert_close(got.double(), _per_token_reference(x, index, weight, *weights, "silu"),
                               rtol=1e-5, atol=1e-5)


def _kernel_in_child(queue):
    torch.set_num_threads(2)
    x, index, weight, weights = _kernel_case()
    with torch.no_grad():
        got = moefx.ops.moe_ffn_kernel(x, index, weight, *weights, "silu")
    queue.put(float((got.double() - _per_token_reference(x, index, weight, *weights, "silu")).abs().max()))


def test_eager_kernel_works_in_a_forked_child_of_a_process_with_expert_threads(two_threads):
    """A forked child has no worker threads: it starts its own instead of waiting on the parent's."""
    import multiprocessing

    x, index, weight, weights = _kernel_case()
    with torch.no_grad():
        moefx.ops.moe_ffn_kernel(x, index, weight, *weights, "silu")  # the parent's workers exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_kernel_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) < 1e-5
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_layer_routes_on_one_thread_in_eager_inference(monkeypatch, two_threads):
    """A small router's ops run on one intra-op thread in eager inference (each op is smaller than a pool
    wake-up); in training, or with the switch off, they run on all threads."""
    from moefx import layers, ops

    cfg = moefx.MoEConfig(num_experts=4, top_k=2)
    bank = ExpertBank(4, 16, 24, 16, "silu", gated=True, up_bias=False, down_bias=False)
    layer = MoELayer(TopKRouter(16, cfg), bank)
    seen = []
    layer.router.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    x = torch.randn(2, 20, 16)
    with torch.inference_mode():
        layer.eval()(x)
    layer.train()(x)
    monkeypatch.setattr(ops, "SERIAL_GLUE", False)
    with torch.inference_mode():
        layer.eval()(x)
    monkeypatch.setattr(ops, "SERIAL_GLUE", True)
    monkeypatch.setattr(layers, "_SERIAL_ROUTER_MACS", 16 * 4 * 40 - 1)  # a router GEMM above the limit
    with torch.inference_mode():
        layer(x)
    assert seen == [1, 2, 2, 2]
    assert torch.get_num_threads() == 2


def _piece_cost(counts, lo, hi, chain_rows):
    """Rows ``lo:hi`` of the expert-sorted rows, plus ``chain_rows`` for every expert they touch."""
    starts = [sum(counts[:e]) for e in range(len(counts) + 1)]
    touched = sum(1 for e, c in enumerate(counts) if c and starts[e] < hi and starts[e + 1] > lo)
    return hi - lo + chain_rows * touched


def test_pieces_cut_on_expert_boundaries_unless_cutting_inside_balances_better():
    """Hand-worked cuts, with each expert a piece runs costing 27 rows: at 512 tokens, 8 experts, top-2, the
    even row split (512 | 512) put 11 rows of expert 3 into the second piece (5 experts against 4, cost 647
    against 620); the boundary after expert 3 (523 | 501, 4 experts each: 631 | 609) is cheaper. One expert is
    cut in the middle; an expert of 300 rows and one of 2 are cut where both sides cost the same."""
    from moefx import ops

    assert ops._CHAIN_ROWS == 27
    assert ops._pieces([140, 132, 125, 126, 129, 118, 137, 117], 2) == [(0, 523), (523, 1024)]
    assert ops._pieces([1000], 2) == [(0, 500), (500, 1000)]
    # 300 rows of expert 0 and 2 of expert 7: the cut p inside expert 0 gives p + 27 = (300 - p) + 2 + 2 * 27.
    assert ops._pieces([300, 0, 0, 0, 0, 0, 0, 2], 2) == [(0, 164), (164, 302)]
    assert ops._pieces([0, 4, 0], 2) == [(0, 2), (2, 4)]
    assert ops._pieces([1, 0, 0, 3], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # every piece gets a row


@pytest.mark.parametrize("parts", [2, 3, 4, 16])
def test_pieces_cover_the_rows_and_never_cost_more_than_the_even_split(parts):
    """Random expert loads, skewed and balanced: the pieces are contiguous, non-empty and cover every row, and
    the costliest one never costs more than with the even row split (balanced top-2 loads over 16 pieces did,
    by half, before the cost of cuts still to come was counted)."""
    from moefx import ops

    g = torch.Generator().manual_seed(parts)
    for trial in range(300):
        experts = int(torch.randint(1, 17, (1,), generator=g))
        low = 0 if trial % 2 else 100  # skewed, or about balanced
        counts = torch.randint(low, 200, (experts,), generator=g).tolist()
        counts[int(torch.randint(0, experts, (1,), generator=g))] += parts  # at least one row per piece
        total = sum(counts)
        pieces = ops._pieces(counts, parts)
        assert len(pieces) == parts and pieces[0][0] == 0 and pieces[-1][1] == total
        assert all(lo < hi for lo, hi in pieces) and all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
        even = list(itertools.pairwise(total * i // parts for i in range(parts + 1)))
        chosen, even = (max(_piece_cost(counts, lo, hi, ops._CHAIN_ROWS) for lo, hi in cuts) for cuts in (pieces, even))
        assert chosen <= even, (counts, pieces)


@pytest.mark.parametrize("k", [2, 3])
def test_pieces_run_their_first_gemms_while_the_output_is_still_being_zeroed(monkeypatch, two_threads, k):
    """The output zeroed ahead is waited for by each piece only before its first addition: here zeroing can only
    finish once the caller's piece has run an expert, which never happened while the kernel waited for the zeros
    before starting its pieces (the wait then timed out). Top-2 pieces share that output; with three terms per
    token the caller's piece adds into it and the others into their own."""
    import threading

    from moefx import ops

    started, timed_out = threading.Event(), []
    zeros, rows = ops._zeros, ops._expert_rows

    def slow_zeros(*args):
        timed_out.append(not started.wait(timeout=5))
        return zeros(*args)

    def expert_rows(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            started.set()
        return rows(*args, **kwargs)

    monkeypatch.setattr(ops, "_ZEROS_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(ops, "_zeros", slow_zeros)
    monkeypatch.setattr(ops, "_expert_rows", expert_rows)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    w1, w3, w2 = (torch.randn(4, 24, 16, generator=g) * 0.3, torch.randn(4, 24, 16, generator=g) * 0.3,
                  torch.randn(4, 16, 24, generator=g) * 0.3)
    index = torch.stack([(torch.arange(40) + j) % 4 for j in range(k)], dim=1)
    weight = torch.rand(40, k, generator=g)
    with torch.inference_mode():
        got = ops.moe_ffn_kernel(x, index, weight, w1, None, w3, None, w2, None, "silu",
                                 zeroed=ops.zeros_ahead(40, 16, x))
    assert timed_out == [False]
    torch.testing.assert_close(got.double(), _per_token_reference(x, index, weight, w1, None, w3, None, w2, None,
                                                                   "silu"), rtol=1e-5, atol=1e-5)


def test_layer_zeroes_its_output_on_an_expert_worker_while_it_routes(monkeypatch, two_threads):
    """In eager inference at 2 threads a token-choice layer's output is zeroed on the expert worker (started
    before routing, in the caller's inference mode) and the result is the same as with the caller zeroing it;
    a Soft MoE layer, whose experts run on slots, starts none, nor does a layer under a dispatch mode (a FLOP
    counter), which calls its op."""
    import threading

    from torch.utils.flop_counter import FlopCounterMode

    from moefx import ops
    from moefx.routers import SoftMoERouter

    monkeypatch.setattr(ops, "_ZEROS_AHEAD_MIN_BYTES", 0)
    made = []
    zeros = ops._zeros
    monkeypatch.setattr(ops, "_zeros", lambda *a: (made.append(threading.current_thread().name), zeros(*a))[1])
    bank = ExpertBank(4, 16, 24, 16, "silu", gated=True, up_bias=False, down_bias=False)
    layer = MoELayer(TopKRouter(16, moefx.MoEConfig(num_experts=4, top_k=2)), bank).eval()
    for w in (bank.w1, bank.w3, bank.w2):
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(2, 20, 16)
    with torch.inference_mode():
        got = layer(x)
        assert made == ["moefx-experts-0"] and got.is_inference()
        monkeypatch.setattr(ops, "zeros_ahead", lambda *a: None)
        want = layer(x)
    assert torch.equal(got, want)
    with torch.no_grad():
        routing = layer.router(x.reshape(-1, 16))
    torch.testing.assert_close(
        got.reshape(-1, 16).double(),
        _per_token_reference(x.reshape(-1, 16), routing.expert_index, routing.combine_weight, *bank.weights(),
                             "silu"), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_ZEROS_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(ops, "_zeros", lambda *a: (made.append("soft"), zeros(*a))[1])
    soft = MoELayer(SoftMoERouter(16, moefx.MoEConfig(router="soft", num_experts=4)), bank).eval()
    with torch.inference_mode():
        soft(x)
    with torch.inference_mode(), FlopCounterMode(display=False):  # observed: the layer calls its op
        layer(x)
    assert made == ["moefx-experts-0"]
