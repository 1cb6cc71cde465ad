"""moefx: convert the dense FFNs of any PyTorch Transformer into Mixture-of-Experts layers."""

from __future__ import annotations

from typing import Any

from . import (
    ops,  # registers the moefx:: custom ops
    tasks,
)
from .analysis import Analysis, analyze
from .config import MoEConfig
from .convert import convert
from .errors import MoefxError
from .heal import heal
from .layers import ExpertBank, MoELayer, aux_loss, moe_layers, routing_stats
from .routers import check_router_causality
from .saving import load, save
from .tasks import extract_task, modality, task_ids
from .version import __version__

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
    # ONNX support is imported on first use: onnx and onnxruntime are optional (moefx[onnx]), and
    # ``import moefx`` does not load them.
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'moefx' has no attribute {name!r}")
