"""Per-call routing context: the task ids and modality masks a forward pass runs with.

Some routing signals are not in the hidden states an MoE layer sees: the task of each example (Task-MoE)
and the modality of each token (LIMoE's per-modality losses and statistics). The caller gives them for the
duration of a forward pass with a context manager (:func:`task_ids`, :func:`modality`, public as
``moefx.tasks.task_ids`` and ``moefx.tasks.modality``), and routers read them with :func:`current_task_ids`
and :func:`current_modality`, so the model's own ``forward`` signature stays untouched.

The values live in :mod:`contextvars` variables, so nested and concurrent (thread / asyncio) uses do not
see each other's values, and leaving the ``with`` block always restores the previous value. This module
sits below the routers that read it; :mod:`moefx.tasks` adds what needs the converted model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

from .errors import ConfigError

__all__ = ["current_modality", "current_task_ids", "modality", "normalize_task_ids", "task_ids", "traced_task_ids"]

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
    token = _TASK_IDS.set(normalize_task_ids(ids))
    try:
        yield
    finally:
        _TASK_IDS.reset(token)


@contextlib.contextmanager
def traced_task_ids(ids: torch.Tensor) -> Iterator[None]:
    """:func:`task_ids` for a tensor being traced (an ONNX export's task ids input): set as it is, since its
    values cannot be read to check them."""
    token = _TASK_IDS.set(ids)
    try:
        yield
    finally:
        _TASK_IDS.reset(token)


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


def normalize_task_ids(ids: int | Sequence[int] | torch.Tensor) -> int | torch.Tensor:
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
        return normalize_task_ids(int(value))
    if value.numel() and int(value.min()) < 0:
        raise ConfigError("task ids must be non-negative integers")
    return value.long()
