"""``init='split'``: experts cut out of the dense FFN (MoEfication, LLaMA-MoE, CMoE).

The FFN's ``I`` hidden neurons are partitioned into ``num_experts + shared_experts`` equal groups. Expert e keeps
its neurons' rows of the up (and gate) projection and their columns of the down projection, so the experts
together hold exactly the dense FFN's parameters and running all of them (each with weight 1) is the dense
FFN. ``shared_experts`` groups form one always-on shared expert (CMoE); the rest are routed, top-k per token.

Partitions (:data:`~moefx.config.PARTITIONS`): ``random``; ``cluster``, balanced k-means on the neurons' input
weights (MoEfication's parameter clustering, no data needed); ``coactivation``, neurons that fire together on
calibration data grouped together (a balanced partition of the co-activation graph's spectral embedding).

The router is initialised without training (:func:`fit_router`): from calibration data, a linear classifier
fitted to predict, per token, the experts whose neurons carry the most activation mass (the oracle choice);
without data, MoEfication's centroid router (each expert scored by its neurons' mean pre-activation).

With calibration data each routed expert also gets a compensation bias (:func:`compensation`): the mean
output ``c_e`` of expert e over the calibration tokens the router does not send to it. The layer adds
``sum_e c_e`` to every token and expert e subtracts ``c_e`` when it runs, so a skipped expert contributes
its average instead of zero, and running every expert is still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .config import MoEConfig
from .errors import ConfigError
from .layers import ExpertBank, MoELayer
from .passes.ffn_rules import FFNMatch
from .routers import build_router

__all__ = ["SplitPlan", "balanced_kmeans", "build_split_layer", "plan_split", "split_sizes"]


def split_sizes(match: FFNMatch, config: MoEConfig) -> tuple[int, int]:
    """``(expert_size, shared_size)`` in neurons; raises if the FFN cannot be split evenly."""
    groups = config.num_experts + config.shared_experts
    hidden = match.hidden_features
    if hidden % groups:
        divisors = [d for d in range(2, min(hidden, 64) + 1) if hidden % d == 0]
        raise ConfigError(
            f"init='split' cuts the FFN's {hidden} hidden neurons into num_experts + shared_experts = {groups} "
            f"equal experts, but {hidden} is not divisible by {groups}; choose a total that divides it "
            f"(e.g. {', '.join(map(str, divisors[-6:]))})"
        )
    size = hidden // groups
    return size, size * config.shared_experts


def partition_used(config: MoEConfig, *, calibrated: bool) -> str:
    """The partition a split conversion uses: ``config.partition``, by default ``coactivation`` with
    calibration data and ``cluster`` without (see :func:`check_partition`)."""
    check_partition(config, calibrated=calibrated)
    return config.partition or ("coactivation" if calibrated else "cluster")


def check_partition(config: MoEConfig, *, calibrated: bool) -> None:
    """An explicit ``partition='coactivation'`` needs calibration data: one clear error, not another method."""
    if config.init == "split" and config.partition == "coactivation" and not calibrated:
        raise ConfigError("partition='coactivation' groups neurons by how they fire together on calibration "
                          "data; pass calib= (--calib FILE), or partition='cluster' to group them by their weights "
                          "alone")


@dataclass
class SplitPlan:
    """Which neurons go where: ``groups [E, expert_size]`` (routed experts) and ``shared [shared_size]``."""

    groups: torch.Tensor
    shared: torch.Tensor
    partition: str


# ---------------------------------------------------------------------------------------------------------
# Neuron statistics from the dense weights and (optionally) calibration inputs
# ---------------------------------------------------------------------------------------------------------


def hidden_activations(match: FFNMatch, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN's hidden activations ``[N, I]`` (what the down projection reads) for inputs ``x [N, H]``."""
    w = match.up_weight.detach()
    h = ACTIVATIONS[match.activation](F.linear(x.to(w.dtype), w, _detach(match.up_bias)))
    if match.gated:
        h = h * F.linear(x.to(w.dtype), match.gate_up_weight.detach(), _detach(match.gate_up_bias))
    return h.float()


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _down_norms(match: FFNMatch) -> torch.Tensor:
    return match.down_weight.detach().float().norm(dim=0)  # [I]: how much each neuron moves the output


def _weight_features(match: FFNMatch) -> torch.Tensor:
    """Per neuron, its input weights (gate and up rows of a gated FFN) normalised: ``[I, H or 2H]``."""
    rows = [match.up_weight.detach().float()]
    if match.gated:
        rows.append(match.gate_up_weight.detach().float())
    return F.normalize(torch.cat(rows, dim=1), dim=1)


def _coactivation_features(contrib: torch.Tensor, dims: int, generator: torch.Generator) -> torch.Tensor:
    """Spectral embedding of the neurons' co-activation graph, ``[I, dims]``.

    ``contrib [N, I]`` is each neuron's activation magnitude (times its down-projection norm) on N calibration
    tokens. The co-activation graph's weight between two neurons is the cosine similarity of their columns;
    its leading eigenvectors are the top right singular vectors of the column-normalised matrix, so a
    randomized SVD gives them without forming the ``I x I`` graph.
    """
    profile = F.normalize(contrib - contrib.mean(0, keepdim=True), dim=0)  # [N, I], unit columns
    q = min(dims + 8, min(profile.shape))
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    try:
        _, s, v = torch.svd_lowrank(profile, q=q, niter=4)
    finally:
        torch.random.set_rng_state(state)
    return F.normalize(v[:, :dims] * s[:dims], dim=1)


def balanced_kmeans(features: torch.Tensor, parts: int, generator: torch.Generator, iterations: int = 10) -> torch.Tensor:
    """Cluster the rows of ``features [N, d]`` into ``parts`` groups of exactly ``N / parts`` rows.

    Lloyd iterations whose assignment step is balanced: a row joins its nearest centroid that still has room,
    closest rows first (:func:`_balanced_assignment`). Returns ``[parts, N/parts]``
    row indices, each group sorted, groups ordered by their smallest index.
    """
    n = features.shape[0]
    size = n // parts
    centroids = features[torch.randperm(n, generator=generator)[:parts]].clone()
    assign = torch.empty(n, dtype=torch.long)
    row_norms = features.square().sum(1, keepdim=True)  # [N, 1]
    for _ in range(iterations):
        # Squared distances (one GEMM): |f|^2 - 2 f.c + |c|^2.
        distance = row_norms - 2 * features @ centroids.T + centroids.square().sum(1)  # [N, parts]
        new = _balanced_assignment(distance, size)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = torch.zeros_like(centroids).index_add_(0, assign, features) / size
    groups = [torch.nonzero(assign == c).flatten() for c in range(parts)]
    groups.sort(key=lambda g: int(g[0]))
    return torch.stack(groups)


def _balanced_assignment(distance: torch.Tensor, size: int) -> torch.Tensor:
    """Each row to a centroid, at most ``size`` rows per centroid, closest pairs first.

    Rounds: every unassigned row proposes to its nearest centroid that still has room; each centroid accepts
    its closest proposers up to its room. Rows refused try their next-nearest centroid in the next round.
    """
    n, parts = distance.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((parts,), size, dtype=torch.long)
    while True:
        rows = torch.nonzero(assign < 0).flatten()
        if rows.numel() == 0:
            return assign
        d = distance[rows].masked_fill((room == 0).unsqueeze(0), float("inf"))
        best = d.argmin(dim=1)
        best_d = d.gather(1, best.unsqueeze(1)).squeeze(1)
        for part in torch.unique(best).tolist():
            proposers = torch.nonzero(best == part).flatten()
            take = min(int(room[part]), proposers.numel())
            order = torch.argsort(best_d[proposers], stable=True)[:take]
            assign[rows[proposers[order]]] = part
            room[part] -= take


def plan_split(match: FFNMatch, config: MoEConfig, generator: torch.Generator,
               inputs: torch.Tensor | None = None) -> SplitPlan:
    """Partition the FFN's neurons (see the module docstring); ``inputs [N, H]`` are calibration inputs."""
    expert_size, shared_size = split_sizes(match, config)
    hidden = match.hidden_features
    partition = partition_used(config, calibrated=inputs is not None)
    if match.up_weight.is_meta:
        raise ConfigError(
            "init='split' builds its experts and router from the dense weights' values, which a model on the meta "
            "device does not have: load the weights first (--stream converts checkpoints larger than memory)")
    contrib = None
    if inputs is not None:
        contrib = hidden_activations(match, inputs).abs() * _down_norms(match)  # [N, I]
    if shared_size:
        if contrib is not None:
            score = contrib.mean(0)  # the most active neurons on the data (CMoE)
        else:
            score = match.up_weight.detach().float().norm(dim=1) * _down_norms(match)
        order = torch.argsort(score, descending=True, stable=True)
        shared, routed = order[:shared_size].sort().values, order[shared_size:].sort().values
    else:
        shared, routed = torch.empty(0, dtype=torch.long), torch.arange(hidden)
    if config.num_experts == 1:
        groups = routed.unsqueeze(0)
    elif partition == "random":
        groups = routed[torch.randperm(len(routed), generator=generator)].reshape(config.num_experts, expert_size)
        groups = groups.sort(dim=1).values
    else:
        if partition == "cluster":
            features = _weight_features(match)[routed]
        else:
            features = _coactivation_features(contrib[:, routed], max(config.num_experts, 8), generator)
        groups = routed[balanced_kmeans(features, config.num_experts, generator)]
    return SplitPlan(groups=groups, shared=shared, partition=partition)


# ---------------------------------------------------------------------------------------------------------
# Router and compensation
# ---------------------------------------------------------------------------------------------------------


def _expert_outputs(match: FFNMatch, groups: torch.Tensor, x: torch.Tensor, chunk: int = 4096):
    """Each routed expert's output (without any bias), ``[n, E, O]`` for successive chunks of ``n`` rows of
    ``x [N, H]``: one batched GEMM per chunk, and memory bounded by the chunk, never ``O(N E O)``."""
    down = match.down_weight.detach().float()[:, groups.flatten()]  # [O, E * Ie], expert by expert
    down = down.reshape(down.shape[0], *groups.shape).permute(1, 2, 0)  # [E, Ie, O]
    for rows in x.split(chunk):
        h = hidden_activations(match, rows)[:, groups.flatten()].reshape(rows.shape[0], *groups.shape)  # [n, E, Ie]
        yield torch.bmm(h.transpose(0, 1), down).transpose(0, 1)  # [n, E, O]


def expert_mass(match: FFNMatch, groups: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[N, E]``: the norm of each routed expert's output (without any bias) on ``x [N, H]``."""
    return torch.cat([out.norm(dim=-1) for out in _expert_outputs(match, groups, x)])


def oracle_choice(mass: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, E]`` 0/1: per token, the k experts whose outputs carry the most ``mass [N, E]`` (the ideal
    router's choice)."""
    return torch.zeros_like(mass).scatter_(1, torch.topk(mass, k, dim=-1).indices, 1.0)


def fit_router(x: torch.Tensor, target: torch.Tensor, iterations: int = 50,
               max_rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear router ``(weight [E, H], bias [E])`` fitted to predict ``target [N, E]`` (0/1) from ``x``.

    Logistic regression (binary cross-entropy per expert, a touch of L2 so that separable data stays bounded)
    on standardised inputs, full batch, L-BFGS from zero: deterministic, and converged in tens of iterations
    where first-order steps need hundreds. Its logits rank the experts; top-k of them is the routing. At most
    ``max_rows`` evenly spaced rows are used: an ``E x H`` classifier needs no more.
    """
    if x.shape[0] > max_rows:
        rows = torch.linspace(0, x.shape[0] - 1, max_rows).long()
        x, target = x[rows], target[rows]
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # standardised inputs: one step size and one penalty fit every model
    weight = torch.zeros(target.shape[1], x.shape[1], requires_grad=True)
    bias = torch.zeros(target.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(F.linear(z, weight, bias), target)
        loss = loss + 1e-5 * weight.square().sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    # Tens of small full-batch passes: one thread, since a parallel region's barrier costs more than these
    # ops save (10x more under CPU contention, where a spinning OpenMP thread waits for a descheduled one).
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    weight, bias = weight.detach(), bias.detach()
    # Undo the standardisation: w.(x - m)/s + b = (w/s).x + (b - w.m/s).
    return weight / std, bias - (weight / std) @ mean


def centroid_router(match: FFNMatch, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoEfication's similarity router without data: expert e's logit is the mean pre-activation of its
    neurons, each weighted by its down-projection norm."""
    w = match.up_weight.detach().float() * _down_norms(match)[:, None]
    b = _down_norms(match) * (match.up_bias.detach().float() if match.up_bias is not None else 0.0)
    return torch.stack([w[g].mean(0) for g in groups]), torch.stack([b[g].mean() for g in groups])


def compensation(match: FFNMatch, groups: torch.Tensor, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``c [E, O]``: each routed expert's mean output over the rows of ``x`` whose ``chosen [N, E]`` (0/1)
    routing skips it (0 if none does)."""
    skipped = 1.0 - chosen  # [N, E]
    sums = sum(torch.einsum("ne,neo->eo", s, out) for s, out in zip(skipped.split(4096), _expert_outputs(match, groups, x)))
    return sums / skipped.sum(0).clamp_min(1.0)[:, None]


def route(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, E]`` 0/1: the top-k experts of the linear router on ``x``."""
    logits = F.linear(x.float(), weight, bias)
    return torch.zeros_like(logits).scatter_(1, torch.topk(logits, k, dim=-1).indices, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


def empty_split_layer(match: FFNMatch, config: MoEConfig, source: str) -> MoELayer:
    """A split layer's modules, allocated but not initialised (``moefx.load`` fills them)."""
    expert_size, shared_size = split_sizes(match, config)
    kw = {"dtype": match.up_weight.dtype, "device": match.up_weight.device}

    def bank(experts: int, size: int, down_bias: bool) -> ExpertBank:
        return ExpertBank(experts, match.in_features, size, match.out_features, match.activation,
                          gated=match.gated, up_bias=match.up_bias is not None, down_bias=down_bias, **kw)

    router = build_router(match.in_features, config).to(**kw)
    experts = bank(config.num_experts, expert_size, True)
    shared = bank(1, shared_size, False) if shared_size else None
    bias = torch.zeros(match.out_features, **kw)
    return MoELayer(router, experts, hidden_dropout=match.dropout_p, source=source, shared=shared, bias=bias)


@torch.no_grad()
def build_split_layer(match: FFNMatch, config: MoEConfig, generator: torch.Generator, source: str,
                      inputs: torch.Tensor | None = None) -> MoELayer:
    """The split MoE layer for one FFN; ``inputs [N, H]`` are its calibration inputs (None: weights only)."""
    layer = empty_split_layer(match, config, source)
    plan = plan_split(match, config, generator, inputs)
    layer.split_partition = plan.partition  # reported by convert()
    _fill(layer.experts, match, plan.groups)
    if layer.shared is not None:
        _fill(layer.shared, match, plan.shared.unsqueeze(0))
    k = config.top_k
    if inputs is not None:
        weight, bias = fit_router(inputs, oracle_choice(expert_mass(match, plan.groups, inputs), k))
        comp = compensation(match, plan.groups, inputs, route(weight, bias, inputs, k))  # [E, O]
    else:
        weight, bias = centroid_router(match, plan.groups)
        comp = torch.zeros(config.num_experts, match.out_features)
    gate = layer.router.gate
    gate.weight.copy_(weight.to(gate.weight.dtype))
    gate.bias.copy_(bias.to(gate.bias.dtype))
    down_bias = match.down_bias.detach().float() if match.down_bias is not None else 0.0
    layer.experts.b2.copy_((-comp).to(layer.experts.b2.dtype))
    layer.bias.copy_((down_bias + comp.sum(0)).to(layer.bias.dtype))
    return layer


def _fill(bank: ExpertBank, match: FFNMatch, groups: torch.Tensor) -> None:
    """Copy the neurons ``groups [experts, size]`` of the dense FFN into ``bank`` (down bias left alone)."""
    up, gate_up, down = match.up_weight.detach(), _detach(match.gate_up_weight), match.down_weight.detach()
    for e, g in enumerate(groups):
        g = g.to(up.device)
        bank.w1[e].copy_(up[g])
        if bank.b1 is not None:
            bank.b1[e].copy_(match.up_bias.detach()[g])
        if bank.w3 is not None:
            bank.w3[e].copy_(gate_up[g])
        if bank.b3 is not None:
            bank.b3[e].copy_(match.gate_up_bias.detach()[g])
        bank.w2[e].copy_(down[:, g])


def expected_active_fraction(config: MoEConfig) -> float:
    """The fraction of the dense FFN's neurons a token runs through in a split layer."""
    return (config.shared_experts + config.top_k) / (config.num_experts + config.shared_experts)
