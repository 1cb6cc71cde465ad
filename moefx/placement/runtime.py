"""Expert-parallel execution on torch.distributed: :class:`ExpertParallelMoE` in place of each MoE layer.

Every rank holds the whole non-expert model (data parallel: each rank runs its own slice of the batch), the
router of every MoE layer, and only the experts the plan gives it. One MoE layer on one rank:

1. route its own tokens with the (replicated) router;
2. pick a replica for every (token, expert) assignment (token index modulo the replica count) and dedupe:
   a token goes **once** to each device that holds any of its experts, with the local expert indices and
   combine weights it needs there (``[k]`` per row, ``-1`` for "not on this device");
3. exchange the per-destination counts with ``all_to_all_single``, then the token rows and their
   index/weight rows with ``all_to_all_single`` and those uneven splits;
4. each device runs its local experts (``moefx::moe_ffn``) on what it received: one weighted partial sum
   per row;
5. send the partial sums back (the reverse splits) and add them up per token.

A split FFN's shared expert and output bias are replicated like the router and added locally.

Soft MoE runs the same exchange on slots: the slots (dispatch-weighted token averages of a sequence) are
formed locally, slot s goes to expert ``s // slots_per_expert`` with weight 1, and the combine is local.

Nothing here is CPU-specific: all tensors stay on the tokens' device, so NCCL on GPUs takes the same path
as gloo on CPU. Every collective runs under the process group's timeout; a failure (a peer that died or
hung) becomes an :class:`ExpertParallelError` naming the rank, the layer and the step. Forward only (the
exchange is not differentiable; train with the single-process model).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from moefx import ops
from moefx.errors import MoefxError
from moefx.layers import ExpertBank, MoELayer, moe_layers
from moefx.routers import Routing

from .errors import ExpertParallelError, PlanMismatchError
from .planner import Plan

__all__ = ["ExpertParallelMoE", "init_expert_parallel", "to_expert_parallel"]


def init_expert_parallel(backend: str | None = None, timeout: float = 60.0) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Every later collective fails
    after ``timeout`` seconds instead of hanging. Returns ``(rank, world_size)``.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:  # a launch mistake, not a failed collective: the usage exit code
        raise MoefxError(
            f"{', '.join(missing)} not set: launch with torchrun --nproc-per-node N -m moefx.run PLAN_DIR"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ["RANK"])
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise ExpertParallelError(
            f"rank {rank}: could not join the process group at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {timeout:g}s ({_first_line(exc)}); did every rank start?"
        ) from None
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return dist.get_rank(), dist.get_world_size()


class ExpertParallelMoE(nn.Module):
    """One MoE layer on one rank of an expert-parallel group (see the module docstring).

    Args:
        layer: the single-process layer (its router is shared; its experts are copied unless ``experts``
            is given).
        devices: the plan of this layer: ``devices[d]`` = logical experts rank d holds (in local order).
        rank, world_size: this rank and the group size (``len(devices)``).
        experts: this rank's local bank (``layer.experts.select_experts(devices[rank])`` by default).
        name: the layer's qualified name (for error messages).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        layer: MoELayer,
        devices: list[list[int]],
        rank: int,
        world_size: int,
        *,
        experts: ExpertBank | None = None,
        name: str = "",
        group=None,
    ) -> None:
        super().__init__()
        if len(devices) != world_size:
            raise PlanMismatchError(f"layer {name}: the plan has {len(devices)} devices but the group has {world_size} ranks")
        self.router = layer.router
        self.experts = experts if experts is not None else layer.experts.select_experts(list(devices[rank]))
        self.shared = layer.shared  # replicated, like the router: every rank runs it on its own tokens
        self.bias = layer.bias
        self.hidden_dropout = layer.hidden_dropout
        self.source = layer.source
        self.name = name
        self.rank, self.world_size, self.group = rank, world_size, group
        self.num_global_experts = layer.num_experts
        owners: list[list[tuple[int, int]]] = [[] for _ in range(layer.num_experts)]
        for d, experts_on_d in enumerate(devices):
            for i, e in enumerate(experts_on_d):
                owners[e].append((d, i))
        unplaced = [e for e, o in enumerate(owners) if not o]
        if unplaced:
            raise PlanMismatchError(f"layer {name}: experts {unplaced[:5]} are on no device in the plan")
        width = max(len(o) for o in owners)
        device = torch.zeros(layer.num_experts, width, dtype=torch.long)
        local = torch.zeros(layer.num_experts, width, dtype=torch.long)
        for e, o in enumerate(owners):
            for j, (d, i) in enumerate(o):
                device[e, j], local[e, j] = d, i
        self.register_buffer("owner_device", device, persistent=False)  # [E, max replicas]
        self.register_buffer("owner_local", local, persistent=False)
        self.register_buffer("owner_count", torch.tensor([len(o) for o in owners]), persistent=False)
        self.calls = 0

    @property
    def num_experts(self) -> int:
        return self.num_global_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])  # [T, H]
        group_size = lead[-1] if len(lead) >= 2 else tokens.shape[0]
        routing = self.router(tokens, group_size)
        if routing.dispatch is not None:
            y = self._soft_forward(tokens, routing)
        else:
            y = self._exchange(tokens, routing.expert_index, routing.combine_weight.to(tokens.dtype))
        if self.shared is not None:
            y = y + ops.expert_ffn(tokens, 0, *self.shared.weights(), self.shared.activation)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])

    def _soft_forward(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        dispatch = routing.dispatch.to(tokens.dtype)  # [G, m, S]
        combine = routing.combine.to(tokens.dtype)
        groups, m, num_slots = dispatch.shape
        slots = torch.einsum("gms,gmh->gsh", dispatch, tokens.reshape(groups, m, -1)).reshape(groups * num_slots, -1)
        slot_expert = torch.arange(num_slots, device=tokens.device) // routing.slots_per_expert  # [S]
        index = slot_expert.expand(groups, num_slots).reshape(-1, 1)  # [G*S, 1]
        y = self._exchange(slots, index, slots.new_ones(groups * num_slots, 1))  # [G*S, O]
        y = torch.einsum("gms,gso->gmo", combine, y.reshape(groups, num_slots, -1))
        return y.reshape(groups * m, -1)

    # -- the exchange ------------------------------------------------------------------------------------
    def _exchange(self, tokens: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[N, O]``: sum over k of ``weight[t, k] * expert_{index[t, k]}(tokens[t])`` across the group."""
        dev = tokens.device
        n, k = index.shape
        world = self.world_size
        valid = index >= 0
        expert = index.clamp_min(0)
        row = torch.arange(n, device=dev).unsqueeze(1).expand(n, k)  # [N, k]
        choice = row % self.owner_count[expert]  # replica: token index modulo the replica count
        dest = self.owner_device[expert, choice]  # [N, k]
        local = self.owner_local[expert, choice]
        # One row per (destination, token), sorted by destination: the send buffer in split order.
        key = torch.where(valid, dest * n + row, torch.full_like(row, -1))
        unique, inverse = torch.unique(key, return_inverse=True)  # sorted; -1 (dropped) first if present
        skip = int(unique.numel() > 0 and int(unique[0]) < 0)
        unique = unique[skip:]
        inverse = inverse - skip
        send_token = unique % n if n else unique
        send_dest = unique // n if n else unique
        rows = unique.numel()
        meta = torch.zeros(rows, 2 * k, dtype=torch.float64, device=dev)  # [local index + 1 | weight]
        slot = torch.arange(k, device=dev).expand(n, k)
        ok = valid
        meta[inverse[ok], slot[ok]] = (local[ok] + 1).double()
        meta[inverse[ok], k + slot[ok]] = weight[ok].double()
        send_counts = torch.bincount(send_dest, minlength=world).to(torch.long)  # [W]
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts, None, None, "exchanging token counts")
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        x_send = tokens.index_select(0, send_token)  # [rows, H]
        x_recv = tokens.new_empty(sum(recv_splits), tokens.shape[1])
        self._all_to_all(x_recv, x_send, recv_splits, send_splits, "dispatching tokens")
        meta_recv = meta.new_empty(sum(recv_splits), 2 * k)
        self._all_to_all(meta_recv, meta, recv_splits, send_splits, "dispatching routing")
        local_index = meta_recv[:, :k].long() - 1  # [R, k], -1 = not on this rank
        local_weight = meta_recv[:, k:].to(tokens.dtype)
        bank = self.experts
        out_features = bank.out_features
        if x_recv.shape[0] and bank.num_experts:
            w1, b1, w3, b3, w2, b2 = bank.weights()
            y_local = ops.moe_ffn(x_recv, local_index, local_weight, w1, b1, w3, b3, w2, b2, bank.activation)
        else:
            y_local = tokens.new_zeros(x_recv.shape[0], out_features)
        y_back = tokens.new_empty(rows, out_features)
        self._all_to_all(y_back, y_local.contiguous(), send_splits, recv_splits, "combining expert outputs")
        return tokens.new_zeros(n, out_features).index_add(0, send_token, y_back)

    def _all_to_all(self, output, input, output_splits, input_splits, what: str) -> None:
        try:
            dist.all_to_all_single(output, input, output_splits, input_splits, group=self.group)
        except Exception as exc:
            raise ExpertParallelError(
                f"rank {self.rank}: {what} in MoE layer {self.name or '?'} failed ({_first_line(exc)}); "
                "a peer rank died, hung past the process-group timeout, or ran a different model/batch structure"
            ) from None

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, local_experts={self.experts.num_experts} "
                f"of {self.num_global_experts}, source={self.source!r}")


def to_expert_parallel(model: nn.Module, plan: Plan, rank: int, world_size: int, *, group=None,
                       local_banks: dict[str, ExpertBank] | None = None) -> nn.Module:
    """Replace every MoE layer of ``model`` (in place) with its :class:`ExpertParallelMoE` for ``rank``.

    ``local_banks`` gives ready local banks by layer name (from a shard); otherwise the local experts are
    copied out of each layer's full bank.

    Raises:
        PlanMismatchError: the plan is for another model or another number of ranks.
    """
    if plan.num_devices != world_size:
        raise PlanMismatchError(
            f"the plan is for {plan.num_devices} devices but {world_size} ranks are running; launch with "
            f"--nproc-per-node {plan.num_devices} or make a plan with --devices {world_size}"
        )
    plan.check_model(model)
    layers = moe_layers(model)
    names = [n for n, _ in layers]
    if names != plan.layer_names:
        raise PlanMismatchError(
            f"the plan's MoE layers ({len(plan.layer_names)}, first {plan.layer_names[:1]}) are not this model's "
            f"({len(names)}, first {names[:1]}); run moefx partition again for this model"
        )
    for i, (name, layer) in enumerate(layers):
        bank = None if local_banks is None else local_banks.get(name)
        ep = ExpertParallelMoE(layer, plan.layers[i], rank, world_size, experts=bank, name=name, group=group)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ep)
        _annotate_graph(parent, child, plan.layers[i])
    return model


def _annotate_graph(parent: nn.Module, child: str, devices: list[list[int]]) -> None:
    """Record the placement on the FX node that calls the layer (``node.meta["moefx.device"]``)."""
    graph = getattr(parent, "graph", None)
    if graph is None:
        return
    for node in graph.nodes:
        if node.op == "call_module" and node.target == child:
            node.meta["moefx.device"] = {d: list(e) for d, e in enumerate(devices)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
