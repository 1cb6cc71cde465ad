"""Example inputs: what a sample forward pass runs on.

The inputs a user gives (``example_inputs`` / ``example_kwargs``, or an ``--inputs FILE``) become one
``(args, kwargs)`` pair (:func:`normalize_inputs`, :func:`load_example_inputs`); a Hugging Face model without
any gets dummy ones from its config (:func:`default_inputs`). :func:`overlong_inputs` tells why a model
failed on inputs longer than its positions, for every message that reports a failed forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils import _pytree as pytree

from .checkpoint import check_safetensors
from .errors import MoefxError
from .hf import dummy_inputs, is_hf_model

__all__ = [
    "batch_size",
    "default_inputs",
    "load_example_inputs",
    "max_positions",
    "normalize_inputs",
    "overlong_inputs",
]


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of the given example inputs (a tensor, a tuple or list of positional inputs), or None
    when there are none."""
    if example_inputs is None and not example_kwargs:
        return None
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        args = (example_inputs,)
    return args, dict(example_kwargs or {})


def default_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """Dummy inputs from a Hugging Face model's config; None for any other model."""
    if is_hf_model(model):
        return (), dummy_inputs(model)
    return None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model with a table of learned positions takes (``config.max_position_embeddings``,
    GPT-2's ``n_positions``, less RoBERTa's offset of ``padding_idx + 1``); None when its config names none."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            limit = min(limit, module.num_embeddings - module.padding_idx - 1)  # positions start after padding
    return limit


def overlong_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(sequence length, the model's limit)`` when the token ids of a call are longer than
    :func:`max_positions` allows, else None."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    limit = max_positions(model)
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and limit and ids.shape[1] > limit:
        return int(ids.shape[1]), limit
    return None


def batch_size(inputs) -> int | None:
    """The batch :func:`split_batch` splits: the first dimension of the inputs' first tensor (None: no tensor)."""
    tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor) and x.dim() > 0]
    return int(tensors[0].shape[0]) if tensors else None


def load_example_inputs(path: str | os.PathLike) -> tuple[tuple, dict]:
    """Example inputs from a file, as ``(args, kwargs)``: a ``.pt`` file (read with ``weights_only``) holding a
    tensor (one positional input), a tuple or list (positional inputs) or a dict with string keys (keyword
    inputs); or a ``.safetensors`` file, whose tensors are keyword inputs by name."""
    path = Path(path)
    if not path.is_file():
        raise MoefxError(f"{path}: no such inputs file; pass a .pt or .safetensors file of example inputs")
    fix = ("save a tensor, a tuple of inputs or a dict of named inputs with torch.save (.pt), or named tensors "
           "with safetensors")
    if path.suffix == ".safetensors":
        check_safetensors(path, MoefxError, fix)
        return (), dict(load_file(str(path)))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise MoefxError(f"{path}: not readable as example inputs (not a torch.save file, or it holds more than "
                         f"tensors and plain values); {fix}") from None
    if isinstance(data, torch.Tensor):
        return (data,), {}
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    if isinstance(data, dict) and all(isinstance(k, str) for k in data):
        return (), dict(data)
    raise MoefxError(f"{path}: holds a {type(data).__name__}, not example inputs; {fix}")

