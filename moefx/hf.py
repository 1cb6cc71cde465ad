"""Hugging Face specifics: recognise a transformers model and make example inputs from its config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["dummy_inputs", "is_hf_model"]


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def dummy_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for one forward pass of a transformers model, built from its config."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(model.parameters())).device
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
