"""moefx: convert the dense FFNs of any PyTorch Transformer into Mixture-of-Experts layers."""

from __future__ import annotations

from . import ops  # registers the moefx:: custom ops
from .config import MoEConfig
from .convert import Analysis, analyze, aux_loss, convert, moe_layers
from .errors import MoefxError
from .io import load, save
from .layers import ExpertBank, MoELayer

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
    "convert",
    "load",
    "moe_layers",
    "ops",
    "save",
]
