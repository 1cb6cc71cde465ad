"""Per-call routing context (task ids, modality masks) and per-task model extraction.

Some routing signals are not in the hidden states an MoE layer sees: the task of each example (Task-MoE)
and the modality of each token (LIMoE's per-modality losses and statistics). The caller gives them for the
duration of a forward pass with a context manager, so the model's own ``forward`` signature stays untouched::

    with moefx.tasks.task_ids([0, 2, 2, 1]):   # one task id per example, or one int for the batch
        out = model(input_ids)

    with moefx.tasks.modality(is_image):       # one modality id per token, shaped like the inputs [batch, seq]
        out = model(inputs_embeds=embeddings)
        loss = task_loss(out) + moefx.aux_loss(model)

The values live in :mod:`contextvars` variables, so nested and concurrent (thread / asyncio) uses do not
see each other's values, and leaving the ``with`` block always restores the previous value.

:func:`extract_task` cuts a Task-MoE model down to one task's experts: a smaller model that runs without
the context and gives the same outputs for that task.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["current_modality", "current_task_ids", "extract_task", "modality", "task_context", "task_ids"]

_TASK_IDS: contextvars.ContextVar[int | torch.Tensor | None] = contextvars.ContextVar("moefx_task_ids", default=None)
_MODALITY: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("moefx_modality", default=None)


@contextlib.contextmanager
def task_ids(ids: int | Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Run the enclosed forward passes with these task ids (``router='task'``).

    Args:
        ids: one int (every example has this task), one int per example (a sequence or a 1-D integer
            tensor whose length is the batch size), or one int per token (a 2-D integer tensor shaped like the
            token ids, ``[batch, seq]``).
    """
    token = _TASK_IDS.set(_normalize_task_ids(ids))
    try:
        yield
    finally:
        _TASK_IDS.reset(token)


def task_context(model: nn.Module, task: int | None, what: str = "the model") -> contextlib.AbstractContextManager:
    """:func:`task_ids` with ``task`` for a model with task-routed MoE layers (``router='task'``); nothing for one
    without. One clear error where a task-routed model gets no task (``task`` None), ``task`` is out of range, or
    a model without task routing gets one. ``what`` names the model in messages. (Commands use it to run a
    model on ``--task-id N``.)"""
    from .routers import TaskRouter

    tasks = [m.num_tasks for m in model.modules() if isinstance(m, TaskRouter)]
    if isinstance(task, bool) or not (task is None or isinstance(task, int)) or (task is not None and task < 0):
        raise ConfigError(f"task_id (--task-id) must be a non-negative integer, got {task!r}")
    if tasks and task is None:
        raise ConfigError(f"{what}: its MoE layers route by task (router='task', {min(tasks)} tasks); pass the task "
                          "to run with --task-id N (task_id=N)")
    if not tasks and task is not None:
        raise ConfigError(f"{what}: task_id (--task-id) applies to models converted with router='task' "
                          "(--router task); this one routes by token")
    if tasks and task >= min(tasks):
        raise ConfigError(f"{what}: task_id (--task-id) {task} is out of range: the model has {min(tasks)} tasks "
                          f"(0-{min(tasks) - 1})")
    return task_ids(task) if tasks else contextlib.nullcontext()


@contextlib.contextmanager
def modality(mask: torch.Tensor | Sequence[Sequence[int]]) -> Iterator[None]:
    """Run the enclosed forward passes with one modality id per token (e.g. 0 = text, 1 = image).

    Routers then compute the LIMoE entropy losses per modality (averaged over the modalities present) and keep
    per-modality routing statistics (``moefx.layers.routing_stats``). ``mask`` is a bool or integer tensor
    with one entry per token the MoE layers see, in the same order: shaped like the token ids ``[batch,
    seq]`` for a Transformer.
    """
    value = torch.as_tensor(mask)
    if value.dtype == torch.bool:
        value = value.long()
    if value.is_floating_point() or value.is_complex():
        raise ConfigError(f"modality mask must hold integer (or bool) modality ids, got dtype {value.dtype}")
    if value.numel() and int(value.min()) < 0:
        raise ConfigError("modality ids must be non-negative integers")
    token = _MODALITY.set(value)
    try:
        yield
    finally:
        _MODALITY.reset(token)


def current_task_ids() -> int | torch.Tensor | None:
    """The task ids set by the innermost :func:`task_ids` block (an int, or a 1-D or 2-D int64 tensor), or None."""
    return _TASK_IDS.get()


def current_modality() -> torch.Tensor | None:
    """The modality mask set by the innermost :func:`modality` block, or None."""
    return _MODALITY.get()


def _normalize_task_ids(ids: int | Sequence[int] | torch.Tensor) -> int | torch.Tensor:
    if isinstance(ids, bool):
        raise ConfigError(f"task ids must be integers, got {ids!r}")
    if isinstance(ids, int):
        if ids < 0:
            raise ConfigError(f"task ids must be non-negative, got {ids}")
        return ids
    try:
        value = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(
            f"task ids must be one int or one int per example, got {type(ids).__name__}"
        ) from None
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex() or value.dim() > 2:
        raise ConfigError(
            f"task ids must be one int, a 1-D sequence of ints (one per example) or a 2-D [batch, seq] tensor "
            f"(one per token), got dtype {value.dtype} and shape {tuple(value.shape)}"
        )
    if value.dim() == 0:
        return _normalize_task_ids(int(value))
    if value.numel() and int(value.min()) < 0:
        raise ConfigError("task ids must be non-negative integers")
    return value.long()


def extract_task(model: nn.Module, task: int, *, inplace: bool = False) -> nn.Module:
    """A copy of a Task-MoE model that keeps only the experts task ``task`` routes to.

    Every MoE layer whose router is a ``TaskRouter`` is replaced by a layer holding only that task's top-k
    experts (in increasing expert order) and a fixed router with the task's combine weights. The result runs
    without :func:`task_ids` and gives the same outputs as the full model does under ``task_ids(task)``, with
    ``(E - k) / E`` fewer expert parameters. Layers with other routers are left as they are.

    Args:
        model: a model converted with ``MoEConfig(router="task", ...)``.
        task: the task id to keep.
        inplace: modify ``model`` itself instead of a deep copy.

    Raises:
        ConfigError: the model has no task-routed MoE layer, or ``task`` is out of range.
    """
    from .capture import CapturedModule
    from .layers import MoELayer
    from .routers import StaticRouter, TaskRouter

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)
               and isinstance(m.router, TaskRouter)]
    if not targets:
        raise ConfigError("extract_task needs a model converted with MoEConfig(router='task', num_tasks=...)")
    for _, layer in targets:
        layer.router._check_task(task)
    if not inplace:
        model = copy.deepcopy(model)
    for name, _ in targets:
        layer = model.get_submodule(name)
        with torch.no_grad():
            experts, weights = layer.router.task_route(task)
            order = torch.argsort(experts)
            small = MoELayer(
                StaticRouter(weights[order]),
                layer.experts.select_experts(experts[order].tolist()),
                hidden_dropout=layer.hidden_dropout,
                source=layer.source,
            )
        small.train(layer.training)
        if not name:  # the model is the MoE layer itself
            return small
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, small)
    for module in model.modules():
        if isinstance(module, CapturedModule):
            module._bound.clear()  # graphs are bound to module objects; rebind to the new layers
    info = getattr(model, "moefx_info", None)
    if info is not None:  # the recipe no longer rebuilds this model: say what it is
        info = copy.copy(info)
        info.source = {**info.source, "extracted_task": task}
        object.__setattr__(model, "moefx_info", info)
    return model
