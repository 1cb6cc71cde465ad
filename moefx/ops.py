"""The MoE dispatch as ``torch.library`` custom ops.

Two ops, so that ``torch.export`` keeps one node per MoE layer and the ONNX exporter can translate that node
into one fused dispatch op:

``moefx::topk_moe(x, router_logits, w1, b1, w3, b3, w2, b2, k, normalize, activation)``
    Dropless token-choice top-k: softmax over the router logits, top k, optional renormalisation, experts,
    weighted sum. The same contract as ONNX Runtime's ``com.microsoft.MoE``.

``moefx::moe_ffn(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation)``
    A given assignment: token t goes to experts ``expert_index[t, :]`` (``-1`` = dropped) with weights
    ``combine_weight[t, :]``. Routers with capacity limits or their own assignment rule use it.

Shapes: ``x [T, H]``, ``w1 [E, I, H]`` (up, or gate when gated), ``w3 [E, I, H]`` (up of a gated FFN, else
None), ``w2 [E, O, I]``, biases ``[E, I]`` / ``[E, O]``; result ``[T, O]``.

The eager kernel (:func:`moe_ffn_kernel`) groups tokens by expert with one stable sort and runs one GEMM chain
per expert that has tokens (never a loop over tokens), adding each expert's weighted rows into the output in
place (``index_add_``); a single token (decoding) skips the sort. With several intra-op threads on CPU the
expert-sorted rows are cut into one piece per thread, and each piece runs on its own worker thread with one
intra-op thread (see :class:`_ExpertWorkers`). Its GEMMs go through oneDNN's matmul
where that is available and the expert has enough rows (see :func:`_linear`): on this project's AMD CPUs the
MKL GEMM behind ``F.linear`` runs at about half of oneDNN's speed for these shapes.
Backward recomputes the forward under autograd with the differentiable :func:`moe_ffn_reference` (like
activation checkpointing), so the op stores no hidden activations.

:func:`moe_ffn_kernel` is also what ``MoELayer`` calls directly in eager inference (no autograd, no tracing),
with the assignment its router already computed: the dispatcher round trip of a custom op and a second top-k
are then skipped. Under ``torch.export``, ``torch.compile``, FX tracing, a dispatch mode or autograd the layer
calls the ops, so the graph still holds one node per MoE layer.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
import os
import queue
import threading
from concurrent.futures import Future

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS

__all__ = [
    "expert_ffn",
    "linear_here",
    "moe_ffn",
    "moe_ffn_kernel",
    "moe_ffn_reference",
    "route_topk",
    "serial_glue",
    "topk_moe",
    "topk_moe_reference",
    "zeros_ahead",
]


def route_topk(router_logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top k, optional renormalisation. Returns ``(index [T, k], weight [T, k])``."""
    logits = router_logits.float()
    if normalize:
        # Softmax, top k, renormalise = the softmax of the k largest logits: the same function (and gradient),
        # without a softmax over all experts (at 512 tokens x 8 experts 4x cheaper on CPU).
        weight, index = torch.topk(logits, k, dim=-1)  # [T, k], largest first
        weight = torch.exp(weight - weight[..., :1])
        return index, weight / weight.sum(dim=-1, keepdim=True)
    probs = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # softmax; torch.softmax is slow on short rows
    probs = probs / probs.sum(dim=-1, keepdim=True)  # [T, E]
    weight, index = torch.topk(probs, k, dim=-1)  # [T, k]
    return index, weight


def expert_ffn(
    x: torch.Tensor,
    e: int,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Expert ``e`` of a stacked bank applied to rows ``x [N, H]``; differentiable (dropout: training only)."""
    h = ACTIVATIONS[activation](F.linear(x, w1[e], None if b1 is None else b1[e]))
    if w3 is not None:
        h = h * F.linear(x, w3[e], None if b3 is None else b3[e])
    if dropout > 0:
        h = F.dropout(h, dropout, training=True)
    return F.linear(h, w2[e], None if b2 is None else b2[e])


def _group_by_expert(expert_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token-expert assignments grouped by expert: ``(order, token, counts)``.

    ``order [kept]`` indexes the flattened ``[T*k]`` assignments, expert by expert; ``token [kept]`` is the
    token of each; ``counts [E]`` how many each expert got. Dropped assignments (-1) are left out.
    """
    k = expert_index.shape[1]
    flat_expert = expert_index.reshape(-1)  # [T*k]
    # Dropped assignments sort into an extra bucket past the last expert, which is then cut off.
    flat_expert = torch.where(flat_expert < 0, num_experts, flat_expert)
    order = torch.sort(flat_expert, stable=True)[1]
    counts = torch.bincount(flat_expert, minlength=num_experts + 1).tolist()
    order = order[: len(order) - counts[num_experts]]
    token = torch.div(order, k, rounding_mode="floor")
    return order, token, counts[:num_experts]


def moe_ffn_reference(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Grouped expert FFN for a given assignment; differentiable (the op's backward and the dropout path)."""
    out = x.new_zeros(expert_index.shape[0], w2.shape[1])
    order, token, counts = _group_by_expert(expert_index, w1.shape[0])
    if not len(order):
        return out
    x_sorted = x.index_select(0, token)  # [kept, H]
    # Each stacked weight split into its experts once: the backward of unbind stacks the experts' gradients in
    # one allocation, where indexing w[e] per expert would allocate and add a full [E, ...] gradient per expert
    # (a tenth of the op's forward + backward at 8 experts of SmolLM2's size, growing with the experts).
    banks = [None if w is None else w.unbind(0) for w in (w1, b1, w3, b3, w2, b2)]
    outputs = []
    start = 0
    for e, count in enumerate(counts):
        if count:
            segment = x_sorted[start : start + count]
            outputs.append(expert_ffn(segment, e, *banks, activation, dropout))
            start += count
    y = torch.cat(outputs, dim=0)  # [kept, O]
    gate = combine_weight.reshape(-1).index_select(0, order).to(y.dtype)
    return out.index_add(0, token, y * gate.unsqueeze(-1))


def moe_ffn_kernel(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    zeroed: Future | None = None,
) -> torch.Tensor:
    """The forward of :func:`moe_ffn_reference`, faster and not differentiable (in-place ops, ``out=`` GEMMs).

    Same arguments and result; ``combine_weight`` is used in ``x``'s dtype. ``zeroed``: what
    :func:`zeros_ahead` returned for this call (the zeroed output, made while the caller routed), or None.
    """
    act = ACTIVATIONS[activation]
    num_tokens = expert_index.shape[0]
    out_features = w2.shape[1]
    if num_tokens == 1:
        # Decoding: k expert calls on one row; no sort, no gather, no scatter.
        out = None
        for e, gate in zip(expert_index[0].tolist(), combine_weight[0].tolist()):
            if e < 0:
                continue
            y = _expert_rows(x, e, w1, b1, w3, b3, w2, b2, act)
            out = y.mul_(gate) if out is None else out.add_(y, alpha=gate)
        return x.new_zeros(1, out_features) if out is None else out
    threads = torch.get_num_threads()
    cpu = x.device.type == "cpu"
    with serial_glue(threads > 1 and cpu and (SERIAL_GLUE or _EXPERT_THREADS)):
        order, token, counts = _group_by_expert(expert_index, w1.shape[0])
        if not len(order):
            return x.new_zeros(num_tokens, out_features) if zeroed is None else zeroed.result()
        gate = combine_weight.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(-1)  # [kept, 1]
        weights = (w1, b1, w3, b3, w2, b2)
        if threads > 1 and cpu and _EXPERT_THREADS and len(order) >= _PARALLEL_MIN_ROWS * threads:
            # The sorted rows cut into contiguous pieces of about equal cost, one per thread; each piece gathers
            # its rows and runs its experts' GEMM chains on one intra-op thread (an expert cut in two runs in both).
            pieces = _pieces(counts, threads)
            inference = torch.is_inference_mode_enabled()
            workers = _expert_workers(threads - 1)
            # An output still being zeroed on a worker is waited for by each piece just before its first
            # addition, not here: the first GEMMs of the pieces run meanwhile (the worker zeroes, then takes its
            # piece).
            out = x.new_zeros(num_tokens, out_features) if zeroed is None else zeroed
            # At most two terms per token: 0 + a + b is the same float in either order, so every piece adds
            # into the one output, under a lock (no buffer per piece to zero and add up). With more terms the
            # order of the additions would change the result, so each piece has its own and they are summed.
            lock = threading.Lock() if expert_index.shape[1] <= 2 else None
            target = out if lock is not None else torch.Size((num_tokens, out_features))
            futures = [workers.submit(_run_piece, target, x, token, gate, counts, lo, hi, weights,
                                      activation, inference, lock) for lo, hi in pieces[1:]]
            try:
                out = _run_piece(out, x, token, gate, counts, *pieces[0], weights, activation, inference, lock)
            finally:
                results = [f.exception() or f.result() for f in futures]  # wait for every piece
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                if result is not out:
                    out.add_(result)
            return out
        out = x.new_zeros(num_tokens, out_features) if zeroed is None else zeroed.result()
        x_sorted = x.index_select(0, token)  # [kept, H]
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            # All threads for the GEMMs of an expert with many rows; switching costs more than it gains on few.
            gemm_threads = threads if count >= _MULTITHREAD_MIN_ROWS else None
            y = _expert_rows(x_sorted[start:end], e, *weights, act, gemm_threads)  # [count, O]
            out.index_add_(0, token[start:end], y.mul_(gate[start:end]))
            start = end
    return out


def zeros_ahead(num_tokens: int, out_features: int, like: torch.Tensor) -> Future | None:
    """Start zeroing the ``[num_tokens, out_features]`` output of a :func:`moe_ffn_kernel` call on an expert
    worker, so that it happens while the caller routes (which runs on one thread, the worker idle); pass the
    result as the kernel's ``zeroed``. None where the kernel would not use expert threads or the output is small.

    A fresh output of a few MB costs page faults as well as the memset: 0.1-0.4 ms at 512 tokens x 768, on the
    serial path of a 5-6 ms layer at 2 threads, depending on what the allocator kept from earlier calls.
    """
    threads = torch.get_num_threads()
    if not (
        _EXPERT_THREADS
        and threads > 1
        and like.device.type == "cpu"
        and num_tokens > 1
        and num_tokens * out_features * like.element_size() >= _ZEROS_AHEAD_MIN_BYTES
    ):
        return None
    return _expert_workers(threads - 1).submit(
        _zeros, (num_tokens, out_features), like.dtype, torch.is_inference_mode_enabled()
    )


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, inference: bool) -> torch.Tensor:
    with torch.inference_mode() if inference else torch.no_grad():
        return torch.zeros(shape, dtype=dtype)


def _pieces(counts: list[int], parts: int) -> list[tuple[int, int]]:
    """The expert-sorted rows (``counts[e]`` for expert ``e``) cut into ``parts`` contiguous ``(lo, hi)`` ranges of
    about equal cost, where a range costs its rows plus :data:`_CHAIN_ROWS` for every expert it touches.

    Each expert a piece runs streams that expert's weights once, whatever its row count: an expert cut in two is
    read by both threads. Cutting the rows evenly put a 5th expert of 11 rows into one of two pieces at 512
    tokens (8 experts, top-2), which made that piece 0.3 ms (7%) slower; the cuts now fall on expert
    boundaries unless cutting inside an expert balances better.
    """
    bounds = [0, *itertools.accumulate(c for c in counts if c)]  # expert i (of those with rows): bounds[i:i+2]
    total, n = bounds[-1], len(bounds) - 1
    pieces, lo, first = [], 0, 0  # first: the expert row lo falls in
    for left in range(parts, 1, -1):
        # Cutting at row p costs this piece a(p) and leaves b(p) for the remaining left - 1 pieces (see
        # _cut_sides). The first expert boundary past lo where a(p) >= b(p) (a rises with p, b falls): the best
        # cut is there, at the boundary before it, or inside the expert between them.
        def sides(p: int, i: int, inside: bool, lo=lo, first=first, left=left) -> tuple[float, float]:
            return _cut_sides(p, i, inside, lo, first, left, total, n)

        i = first + 1 + bisect.bisect_left(
            range(first + 1, n), True, key=lambda i: operator.ge(*sides(bounds[i], i, False)))
        candidates = [(bounds[j], j, False) for j in (i - 1, i) if lo < bounds[j] < total]
        c = i - 1  # the expert between those boundaries; inside it, a(p) = b(p) at:
        p = round(((left - 1) * (lo - _CHAIN_ROWS * (c - first + 1)) + total + _CHAIN_ROWS * (n - c + left - 2))
                  / left)
        if max(lo, bounds[c]) < p < bounds[c + 1]:
            candidates.append((p, c, True))
        if candidates:
            cut = min(candidates, key=lambda cand: (max(sides(*cand)), cand[0]))[0]
        else:  # fewer rows left than pieces
            cut = lo + (total - lo) // left
        cut = min(max(cut, lo + 1), total - left + 1)  # every piece gets at least one row
        pieces.append((lo, cut))
        lo = cut
        first = bisect.bisect_right(bounds, lo) - 1
    pieces.append((lo, total))
    if parts > 2:
        # With more pieces the greedy cuts are not always optimal (for two they are): never worse than even ones.
        even = list(itertools.pairwise(total * i // parts for i in range(parts + 1)))
        if max(_piece_cost(bounds, *p) for p in even) < max(_piece_cost(bounds, *p) for p in pieces):
            return even
    return pieces


def _piece_cost(bounds: list[int], lo: int, hi: int) -> int:
    """Rows ``lo:hi`` plus :data:`_CHAIN_ROWS` per expert they touch (expert ``i`` holds rows
    ``bounds[i]:bounds[i+1]``)."""
    touched = min(bisect.bisect_left(bounds, hi), len(bounds) - 1) - (bisect.bisect_right(bounds, lo) - 1)
    return hi - lo + _CHAIN_ROWS * touched


def _cut_sides(p: int, i: int, inside: bool, lo: int, first: int, left: int, total: int,
               n: int) -> tuple[float, float]:
    """For :func:`_pieces`: the cost of the piece from row ``lo`` (in expert ``first``) to a cut at row ``p``, and
    the mean cost of the ``left - 1`` pieces after it (``n`` experts with rows, ``total`` rows). The cut is at the
    start of expert ``i`` (this piece runs experts ``first..i-1``), or ``inside`` it (both sides run it). Each of
    the ``left - 2`` cuts still to come is counted as falling inside an expert, which both its sides then run."""
    return (p - lo + _CHAIN_ROWS * (i - first + inside),
            (total - p + _CHAIN_ROWS * (n - i + left - 2)) / (left - 1))


def _run_piece(out: torch.Tensor | torch.Size | Future, x: torch.Tensor, token: torch.Tensor, gate: torch.Tensor,
               counts: list[int], lo: int, hi: int, weights: tuple, activation: str,
               inference: bool, lock: threading.Lock | None = None) -> torch.Tensor:
    """Rows ``lo:hi`` of the expert-sorted assignments, added into ``out``: a new zero tensor if a shape; if a
    future, its result, waited for once the first expert's rows are ready. Each addition is made under ``lock``
    if given (``out`` shared with other pieces). Returns the tensor added into."""
    act = ACTIVATIONS[activation]
    # (torch.inference_mode(False) would turn gradients on: a worker runs under no_grad unless inference)
    with torch.inference_mode() if inference else torch.no_grad():
        if isinstance(out, torch.Size):
            out = x.new_zeros(out)
        x_piece = x.index_select(0, token[lo:hi])  # [hi - lo, H]
        start = 0
        for e, count in enumerate(counts):
            a, b = max(start, lo), min(start + count, hi)
            start += count
            if a < b:
                y = _expert_rows(x_piece[a - lo:b - lo], e, *weights, act).mul_(gate[a:b])
                if isinstance(out, Future):
                    out = out.result()
                with lock or contextlib.nullcontext():
                    out.index_add_(0, token[a:b], y)
    return out.result() if isinstance(out, Future) else out


class _ExpertWorkers:
    """Threads that run pieces of the eager kernel, each with one intra-op thread (see :func:`moe_ffn_kernel`).

    Splitting the experts' rows between threads that each run their GEMMs on one core beats running every
    GEMM on all cores one after another: no thread-pool wake-up or thread-count switch per GEMM, and the
    small ops between the GEMMs run in parallel too (a 512-token layer at 2 threads: 7.4 -> 5.2 ms; at 8
    tokens 3.5 -> 0.8 ms). The workers start on first use and live as long as the process.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        ready = threading.Barrier(count + 1)
        caller_threads = torch.get_num_threads()
        for i in range(count):
            threading.Thread(target=self._serve, args=(ready,), name=f"moefx-experts-{i}", daemon=True).start()
        ready.wait()
        # torch.set_num_threads in a worker also set the count that threads which have not yet used torch
        # start with: put back the caller's, now that every worker has its own.
        torch.set_num_threads(caller_threads)

    def _serve(self, ready) -> None:
        torch.get_num_threads()  # this thread's first use of torch sets its count: do it before setting it
        torch.set_num_threads(1)
        ready.wait()
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        future = Future()
        self._tasks.put((future, fn, args))
        return future

    def close(self) -> None:
        """Let the workers exit once the tasks already submitted are done."""
        for _ in range(self.count):
            self._tasks.put(None)


_WORKERS: dict[int, _ExpertWorkers] = {}  # by size; kept for the life of the process (idle ones block on a queue)
_WORKERS_LOCK = threading.Lock()


def _expert_workers(count: int) -> _ExpertWorkers:
    with _WORKERS_LOCK:
        workers = _WORKERS.get(count)
        if workers is None:
            workers = _WORKERS[count] = _ExpertWorkers(count)
        return workers


def _forget_workers() -> None:
    """In a forked child: none of the parent's threads exist (and the lock may have been held by one)."""
    global _WORKERS_LOCK
    _WORKERS.clear()
    _WORKERS_LOCK = threading.Lock()


# A forked child starts its own workers when it needs them.
os.register_at_fork(after_in_child=_forget_workers)

#: Whether the eager kernel splits the experts' rows between threads with one intra-op thread each
#: (``MOEFX_EXPERT_THREADS=0``: off; then its GEMMs run one after another on all threads).
_EXPERT_THREADS = os.environ.get("MOEFX_EXPERT_THREADS", "1") != "0"
_MULTITHREAD_MIN_ROWS = 64  # rows of one expert below which its GEMMs stay on one thread (no expert threads)
_PARALLEL_MIN_ROWS = 2  # assignments per thread below which one thread does all (a hand-over costs ~20 us)
#: What a thread's running one more expert costs, in rows of that expert: streaming its weights, about 0.19 ms
#: for a 768 x 384 SwiGLU expert against 0.007 ms per row on one core of this project's CPU (see :func:`_pieces`).
_CHAIN_ROWS = 27
_ZEROS_AHEAD_MIN_BYTES = 1 << 18  # below this the caller zeroes the output itself faster than a hand-over


#: Whether the eager kernel runs everything but its GEMMs on one thread (``MOEFX_SERIAL_GLUE=0``: off).
SERIAL_GLUE = os.environ.get("MOEFX_SERIAL_GLUE", "1") != "0"


@contextlib.contextmanager
def _intra_op_threads(count: int | None):
    """Run the block on ``count`` intra-op threads (None, or the current count: as it is), then put the count
    back. ``torch.set_num_threads`` sets the calling thread's count, and the count that threads which have not
    yet used torch start with; both are put back on exit."""
    current = torch.get_num_threads()
    if count is None or count == current:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(current)


def serial_glue(enabled: bool):
    """Run the block's ops on one intra-op thread (GEMMs inside it switch back, see :func:`_expert_rows`).

    The gathers, activations and scatters between expert GEMMs are small (one expert's rows): split over
    threads, each costs a wake-up of the pool, tens of microseconds under ``OMP_WAIT_POLICY=PASSIVE`` (the
    setting for shared machines), more than the work itself; at 2 threads this made a 512-token layer 1.7x
    slower.
    """
    return _intra_op_threads(1 if enabled else None)


def _expert_rows(x, e, w1, b1, w3, b3, w2, b2, act, threads: int | None = None) -> torch.Tensor:
    """Expert ``e`` on rows ``x``; ``threads``: run the GEMMs on that many threads (the rest on the current)."""
    h = act(_linear(x, w1[e], None if b1 is None else b1[e], threads))
    if w3 is not None:
        h.mul_(_linear(x, w3[e], None if b3 is None else b3[e], threads))
    return _linear(h, w2[e], None if b2 is None else b2[e], threads)


def _onednn_linear():
    """oneDNN's fp32 matmul (``torch.ops.mkldnn._linear_pointwise``), or None where this build lacks it."""
    if os.environ.get("MOEFX_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        x = torch.randn(8, 4)
        w = torch.randn(3, 4)
        if not torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), rtol=1e-5, atol=1e-6):
            return None
    except Exception:  # an op or a build without it
        return None
    return op


#: oneDNN matmul for the expert GEMMs of the eager kernel: on CPUs where the BLAS behind ``F.linear`` is slow
#: (MKL on AMD: about half of oneDNN's speed at these shapes) it is what makes the grouped experts fast.
#: ``MOEFX_ONEDNN=0`` in the environment turns it off.
_ONEDNN_LINEAR = _onednn_linear()
_ONEDNN_MIN_ROWS = 8  # below this oneDNN's per-call overhead outweighs its faster GEMM


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D ``x``, through oneDNN where that is faster (fp32 CPU, >= 8 rows); on
    ``threads`` intra-op threads if given (and back to the current count afterwards)."""
    if threads is None:  # (the common case: no context manager on this per-GEMM path)
        return linear_here(x, w, b)
    with _intra_op_threads(threads):
        return linear_here(x, w, b)


def linear_here(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D ``x`` on the current intra-op threads, through oneDNN where that is
    faster (fp32 CPU, >= 8 rows): the GEMM routine of the eager kernel, shared with the routers' gate."""
    if (
        _ONEDNN_LINEAR is not None
        and x.shape[0] >= _ONEDNN_MIN_ROWS
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and w.is_contiguous()
    ):
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def topk_moe_reference(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    k: int,
    normalize: bool,
    activation: str,
) -> torch.Tensor:
    index, weight = route_topk(router_logits, k, normalize)
    return moe_ffn_reference(x, index, weight.to(x.dtype), w1, b1, w3, b3, w2, b2, activation)


# -- moefx::moe_ffn ---------------------------------------------------------------------------------------


@torch.library.custom_op("moefx::moe_ffn", mutates_args=())
def moe_ffn(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    return moe_ffn_kernel(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation)


@moe_ffn.register_fake
def _moe_ffn_fake(x, expert_index, combine_weight, w1, b1, w3, b3, w2, b2, activation):
    return x.new_empty(x.shape[0], w2.shape[1])


# -- moefx::topk_moe --------------------------------------------------------------------------------------


@torch.library.custom_op("moefx::topk_moe", mutates_args=())
def topk_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    k: int,
    normalize: bool,
    activation: str,
) -> torch.Tensor:
    index, weight = route_topk(router_logits, k, normalize)
    return moe_ffn_kernel(x, index, weight.to(x.dtype), w1, b1, w3, b3, w2, b2, activation)


@topk_moe.register_fake
def _topk_moe_fake(x, router_logits, w1, b1, w3, b3, w2, b2, k, normalize, activation):
    return x.new_empty(x.shape[0], w2.shape[1])


# -- autograd: recompute the forward, differentiate the reference -----------------------------------------


def _make_autograd(reference, tensor_positions: tuple[int, ...], num_inputs: int):
    def setup_context(ctx, inputs, output):
        ctx.static = [None if i in tensor_positions else inputs[i] for i in range(num_inputs)]
        ctx.save_for_backward(*[inputs[i] for i in tensor_positions])

    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        args = list(ctx.static)
        wants = []
        for pos, tensor in zip(tensor_positions, saved):
            if tensor is not None and ctx.needs_input_grad[pos] and tensor.is_floating_point():
                tensor = tensor.detach().requires_grad_(True)
                wants.append((pos, tensor))
            args[pos] = tensor
        grads: list[torch.Tensor | None] = [None] * num_inputs
        if wants:
            with torch.enable_grad():
                out = reference(*args)
                computed = torch.autograd.grad(out, [t for _, t in wants], grad_output, allow_unused=True)
            for (pos, _), g in zip(wants, computed):
                grads[pos] = g
        return tuple(grads)

    return setup_context, backward


_setup, _backward = _make_autograd(moe_ffn_reference, tuple(range(9)), 10)
moe_ffn.register_autograd(_backward, setup_context=_setup)
_setup, _backward = _make_autograd(topk_moe_reference, tuple(range(8)), 11)
topk_moe.register_autograd(_backward, setup_context=_setup)
del _setup, _backward
