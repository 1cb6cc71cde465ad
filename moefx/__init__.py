"""moefx: convert the dense FFNs of any PyTorch Transformer into Mixture-of-Experts layers.

The package is in layers: a module imports only from the layers below it, and never another module's
``_private`` names (``lint-imports`` checks the contract in pyproject.toml and
``scripts/check_private_imports.py`` the names, both in ``.ci/run``). From the top:

* ``run`` -- the torchrun entry point: run a partition expert-parallel
* ``cli`` -- the ``moefx`` command
* ``bench`` -- benchmarks: torch vs ONNX Runtime vs the dense model
* ``onnx``, ``placement`` -- ONNX export with fused MoE ops; expert placement, shards, torch.distributed
* ``stream`` -- streamed conversion of a checkpoint larger than memory
* ``saving``, ``layerwise``, ``zoo`` -- save/load/recipe; layer-by-layer calibration; demo models
* ``convert`` -- the conversion pipeline
* ``heal`` -- fit each MoE layer to its dense FFN
* ``distill`` -- end-to-end healing: distil the dense model into the converted one
* ``evaluate`` -- the converted model against the dense one on the user's data (``moefx eval``)
* ``analysis`` -- find the FFNs and near-misses (``analyze``, ``find_ffns``)
* ``calibrate``, ``tasks``, ``sources`` -- calibration data; task routing on a model; load a MODEL
* ``capture`` -- sample pass, symbolic_trace / torch.export, ``CapturedModule``
* ``experts`` -- build an MoE layer for an FFN (upcycle, random; split and lora below it)
* ``split``, ``lora`` -- neuron-partition experts; routed LoRA adapters
* ``layers`` -- ``MoELayer``, ``ExpertBank``, ``moe_layers``, ``aux_loss``, ``routing_stats``
* ``routers`` -- the routers
* ``ops``, ``passes`` -- the ``moefx::`` custom ops; graph passes and FFN rules (the top-level ``passes/``)
* ``inputs`` -- example inputs
* ``config``, ``context``, ``hf``, ``checkpoint``, ``files`` -- MoEConfig; the task/modality context;
  transformers specifics; safetensors files; atomic writes
* ``errors``, ``activations``, ``progress``, ``report``, ``version`` -- the bottom, no moefx imports

Modules on one line do not import each other. This module gathers the public API from them.
"""

from __future__ import annotations

from typing import Any

from . import (
    ops,  # registers the moefx:: custom ops
    tasks,
)
from .analysis import Analysis, analyze
from .config import MoEConfig
from .convert import convert
from .distill import distill
from .errors import MoefxError
from .evaluate import Evaluation, evaluate
from .heal import heal
from .layers import ExpertBank, MoELayer, aux_loss, moe_layers, routing_stats
from .routers import check_router_causality
from .saving import load, save
from .tasks import extract_task, modality, task_ids
from .version import __version__

__all__ = [
    "Analysis",
    "Evaluation",
    "ExpertBank",
    "MoEConfig",
    "MoELayer",
    "MoefxError",
    "__version__",
    "analyze",
    "aux_loss",
    "check_router_causality",
    "convert",
    "distill",
    "evaluate",
    "export_onnx",
    "extract_task",
    "heal",
    "load",
    "modality",
    "moe_layers",
    "ops",
    "routing_stats",
    "save",
    "task_ids",
    "tasks",
]


def __getattr__(name: str) -> Any:
    # ONNX support is imported on first use: onnx and onnxruntime are optional (moefx[onnx]), and
    # ``import moefx`` does not load them.
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'moefx' has no attribute {name!r}")
