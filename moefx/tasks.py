"""Task-MoE on the converted model: running it on one task, and cutting it down to one task's experts.

The routing context itself (:func:`task_ids`, :func:`modality`, the values routers read) lives in
:mod:`moefx.context`, below the routers; this module re-exports it, so ``moefx.tasks`` stays the one place a
user reaches for::

    with moefx.tasks.task_ids([0, 2, 2, 1]):   # one task id per example, or one int for the batch
        out = model(input_ids)

    with moefx.tasks.modality(is_image):       # one modality id per token, shaped like the inputs [batch, seq]
        out = model(inputs_embeds=embeddings)
        loss = task_loss(out) + moefx.aux_loss(model)

:func:`task_context` runs a model on one ``--task-id`` (with the checks the commands need), and
:func:`extract_task` cuts a Task-MoE model down to one task's experts: a smaller model that runs without
the context and gives the same outputs for that task.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .capture import CapturedModule
from .context import current_modality, current_task_ids, modality, task_ids
from .errors import ConfigError
from .layers import MoELayer
from .routers import StaticRouter, TaskRouter

__all__ = ["current_modality", "current_task_ids", "extract_task", "modality", "task_context", "task_ids"]


def task_context(model: nn.Module, task: int | None, what: str = "the model") -> contextlib.AbstractContextManager:
    """:func:`task_ids` with ``task`` for a model with task-routed MoE layers (``router='task'``); nothing for one
    without. One clear error where a task-routed model gets no task (``task`` None), ``task`` is out of range, or
    a model without task routing gets one. ``what`` names the model in messages. (Commands use it to run a
    model on ``--task-id N``.)"""
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
            module.rebind()  # graphs are bound to module objects; rebind to the new layers
    info = getattr(model, "moefx_info", None)
    if info is not None:  # the recipe no longer rebuilds this model: say what it is
        info = copy.copy(info)
        info.source = {**info.source, "extracted_task": task}
        object.__setattr__(model, "moefx_info", info)
    return model
