"""Hugging Face specifics: recognise a transformers model, make example inputs from its config, and build a
model from its config without allocating its weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["build_without_weights", "dummy_inputs", "empty_parameters", "is_hf_model"]


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel  # optional: needs moefx[hf]
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def dummy_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """Keyword inputs for one forward pass of a transformers model, built from its config (on the model's
    device unless ``device`` is given)."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    device = device if device is not None else next(iter(model.parameters())).device
    name = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, Any] = {}
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen).to(device)
    else:
        vocab = getattr(config, "vocab_size", None) or 100
        ids = torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen).to(device)
        inputs["input_ids"] = ids
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, : max(seq // 2, 1)].clone()
    return inputs


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation cost)
    while buffers stay real: a rotary embedding's ``inv_freq`` is computed as usual."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_without_weights(cls: Any, config: Any, *, dtype: torch.dtype | None = None,
                          real_buffers: bool = False) -> nn.Module:
    """``cls`` built from ``config`` with every parameter on the meta device, in eval mode.

    ``real_buffers=False``: buffers are meta tensors too (enough to capture and plan); ``True``: buffers hold
    their real values (what a model needs to run once its parameters are assigned).
    """
    kwargs = {} if dtype is None else {"dtype": dtype}
    with empty_parameters() if real_buffers else torch.device("meta"):
        model = cls._from_config(config, **kwargs)
    model.eval()
    return model
