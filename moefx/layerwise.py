"""Layer-by-layer forward passes over a checkpoint larger than memory, for calibration statistics.

:class:`LayerwiseRunner` runs calibration batches through a Hugging Face model one decoder layer at a time:

1. the model is built from ``config.json`` with its parameters on the meta device (buffers real), and the
   FFNs are found as ``moefx.convert`` finds them (on meta tensors);
2. the tensors outside the decoder stack (embeddings, final norm, head) are read from the checkpoint and
   every batch is run up to the first decoder layer, where a hook keeps that layer's inputs (hidden states,
   attention mask, rotary embeddings) and stops the forward;
3. for each decoder layer in turn: its tensors are read, every batch's hidden states go through it while
   hooks on the FFN's projections hand ``on_ffn`` the FFN's input and hidden activation, the outputs become
   the next layer's inputs, and the layer's tensors are released (back to meta) before the next one.

Only one decoder layer's weights and the batches' hidden states are in memory at a time. The statistics
themselves are the caller's (``moefx.calibrate``): ``on_ffn`` receives :class:`FFNActivations` per FFN and
batch, ``on_layer_end`` is called once a layer has seen every batch (the place to reduce statistics to what
the expert builder needs and free the rest).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import find_ffns, join_name
from .checkpoint import TensorEntry, hf_key_resolver, read_checkpoint_entries, read_tensor
from .errors import ModelLoadError, MoefxError
from .hf import build_without_weights, dummy_inputs
from .sources import hf_model_class, load_hf_config, resolve_dtype

__all__ = ["FFNActivations", "LayerwiseRunner"]


@dataclass
class FFNActivations:
    """What one FFN saw on one calibration batch."""

    name: str  # the FFN's qualified name (the ``name`` of a recipe layer)
    layer_index: int  # its position among all FFNs of the model: the index ``build_moe_layer`` gets
    batch: int  # which calibration batch
    inputs: torch.Tensor  # [tokens, in_features]: what the FFN reads
    hidden: torch.Tensor  # [tokens, hidden_features]: what its down projection reads (act(gate) * up if gated)


class _Stop(Exception):
    pass


class LayerwiseRunner:
    """Runs batches through the model in ``source_dir`` one decoder layer at a time (module docstring).

    Args:
        source_dir: a Hugging Face model directory (config.json + safetensors, one file or shards).
        dtype: the dtype to compute in (default: the model's, as ``from_pretrained`` gives it).
    """

    def __init__(self, source_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        self.source_dir = Path(source_dir)
        config_dict, hf_config = load_hf_config(self.source_dir)
        self.entries, _ = read_checkpoint_entries(self.source_dir)
        cls = hf_model_class(config_dict)
        self.dtype = dtype or resolve_dtype(hf_config, self.entries)
        self.model = build_without_weights(cls, hf_config, dtype=self.dtype, real_buffers=True)
        self._resolve = hf_key_resolver(self.model, self.entries)
        # Find the FFNs on an all-meta twin (the sample pass needs meta inputs and meta buffers).
        twin = build_without_weights(cls, hf_config, dtype=self.dtype)
        inputs = {k: v.to("meta") for k, v in dummy_inputs(twin, device="cpu").items()}
        analysis = find_ffns(twin, ((), inputs), None)
        self.ffns: list[tuple[str, int, str, str]] = []  # (name, layer index, up projection, down projection)
        for i, ffn in enumerate(analysis.ffns):
            modules = [join_name(ffn.container, m) for m in ffn.match.modules]
            self.ffns.append((ffn.name, i, modules[0], modules[-1]))
        self.stack_name, self.blocks = self._decoder_stack()

    def _decoder_stack(self) -> tuple[str, dict[int, list[tuple[str, int, str, str]]]]:
        """The ModuleList of decoder layers that holds every FFN, and the FFNs of each of its layers."""
        stacks: dict[str, dict[int, list]] = {}
        for ffn in self.ffns:
            parts = ffn[0].split(".")
            for i, part in enumerate(parts):
                parent = ".".join(parts[:i])
                if part.isdigit() and isinstance(self.model.get_submodule(parent), nn.ModuleList):
                    stacks.setdefault(parent, {}).setdefault(int(part), []).append(ffn)
                    break
        if len(stacks) != 1 or sum(len(v) for v in next(iter(stacks.values())).values()) != len(self.ffns):
            raise MoefxError(
                f"{self.source_dir}: layer-by-layer calibration needs every FFN inside one stack of decoder layers "
                f"(an nn.ModuleList); found {len(stacks)} stacks for {len(self.ffns)} FFNs"
            )
        return next(iter(stacks.items()))

    # -- loading and releasing weights -------------------------------------------------------------------
    def _key(self, name: str) -> TensorEntry:
        key = self._resolve(name)
        if key is None:
            raise ModelLoadError(f"{self.source_dir}: the checkpoint has no tensor for {name}")
        return self.entries[key]

    def _load(self, module: nn.Module, prefix: str, skip: str | None = None) -> int:
        """Read the parameters of ``module`` (dense names under ``prefix``) from the checkpoint; returns bytes."""
        done: dict[int, nn.Parameter] = {}
        total = 0
        for mod_name, sub in module.named_modules(remove_duplicate=False):
            full_mod = f"{prefix}.{mod_name}".strip(".") if mod_name else prefix
            if skip is not None and (full_mod == skip or full_mod.startswith(skip + ".")):
                continue
            for key, param in list(sub._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in done:
                    value = read_tensor(self._key(f"{full_mod}.{key}" if full_mod else key))
                    total += value.numel() * value.element_size()
                    done[id(param)] = nn.Parameter(value.to(param.dtype), requires_grad=False)
                sub._parameters[key] = done[id(param)]
        for sub in module.modules():  # a tied parameter loaded under one name fills its other names
            for key, param in list(sub._parameters.items()):
                if param is not None and param.is_meta and id(param) in done:
                    sub._parameters[key] = done[id(param)]
        return total

    @staticmethod
    def _release(module: nn.Module) -> None:
        for sub in module.modules():
            for key, param in list(sub._parameters.items()):
                if param is not None and not param.is_meta:
                    sub._parameters[key] = nn.Parameter(param.to("meta"), requires_grad=False)

    # -- the run -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, batches: Iterable[dict[str, Any] | torch.Tensor], on_ffn: Callable[[FFNActivations], None],
            on_layer_end: Callable[[int, list[str]], None] | None = None) -> list[torch.Tensor]:
        """Run ``batches`` (``input_ids`` tensors or keyword dicts) through every decoder layer; returns the
        last layer's hidden states per batch. ``on_layer_end(stack_index, ffn_names)`` follows each layer."""
        stack: nn.ModuleList = self.model.get_submodule(self.stack_name)
        self._load(self.model, "", skip=self.stack_name)
        captured: list[tuple[tuple, dict]] = []

        def stop(module, args, kwargs):
            captured.append((args, kwargs))
            raise _Stop

        handle = stack[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for batch in batches:
                kwargs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
                kwargs.setdefault("use_cache", False)
                with contextlib.suppress(_Stop):
                    self.model(**kwargs)
        finally:
            handle.remove()
        self._release(self.model)
        states = [(args[0] if args else kwargs.pop("hidden_states")) for args, kwargs in captured]
        calls = [(args[1:], kwargs) for args, kwargs in captured]
        for index, layer in enumerate(stack):
            ffns = self.blocks.get(index, [])
            self._load(layer, f"{self.stack_name}.{index}")
            seen: dict[str, dict[str, torch.Tensor]] = {}
            handles = []
            for name, _, up, down in ffns:
                slot = seen.setdefault(name, {})
                handles.append(self.model.get_submodule(up).register_forward_pre_hook(
                    lambda m, a, slot=slot: slot.__setitem__("inputs", a[0])))
                handles.append(self.model.get_submodule(down).register_forward_pre_hook(
                    lambda m, a, slot=slot: slot.__setitem__("hidden", a[0])))
            try:
                for b, (hidden, (args, kwargs)) in enumerate(zip(states, calls)):
                    out = layer(hidden, *args, **kwargs)
                    states[b] = out[0] if isinstance(out, (tuple, list)) else out
                    for name, layer_index, _, _ in ffns:
                        slot = seen[name]
                        on_ffn(FFNActivations(name, layer_index, b, slot["inputs"].reshape(-1, slot["inputs"].shape[-1]),
                                              slot["hidden"].reshape(-1, slot["hidden"].shape[-1])))
                        slot.clear()
            finally:
                for h in handles:
                    h.remove()
                self._release(layer)
            if on_layer_end is not None:
                on_layer_end(index, [f[0] for f in ffns])
        return states
