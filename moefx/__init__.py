"""moefx: convert the dense FFNs of any PyTorch Transformer into Mixture-of-Experts layers."""

from __future__ import annotations

from typing import Any

from . import (
    ops,  # registers the moefx:: custom ops
    tasks,
)
from .config import MoEConfig
from .convert import Analysis, analyze, aux_loss, convert, moe_layers
from .errors import MoefxError
from .heal import heal
from .io import load, save
from .layers import ExpertBank, MoELayer, routing_stats
from .routers import check_router_causality
from .tasks import extract_task, modality, task_ids

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ExpertBank",
    "MoEConfig",
    "MoELayer",
    "MoefxError",
    "__version__",
    "analyze",
    "aux_loss",
    "check_router_causality",
    "convert",
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
    # ONNX support is imported on first use, so ``import moefx`` does not load onnx/onnxruntime.
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'moefx' has no attribute {name!r}")
