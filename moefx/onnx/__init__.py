"""ONNX export of converted models: each MoE layer one fused ``com.microsoft.MoE`` node, or standard ONNX ops.

``export_onnx(model, example_inputs, "model.onnx")`` writes the file and returns an :class:`ExportReport`
(per MoE layer: fused or not and why, node counts, approximations; file size; ONNX Runtime parity).
Translations of the dispatch ops live in :data:`TRANSLATIONS`; a router with its own dispatch op registers
one with :func:`register_translation`.

Importing this package imports onnx, onnxscript and torch.onnx; ``import moefx`` does not import it.
"""

from __future__ import annotations

from .export import OnnxExportError, export_onnx
from .report import ExportReport, LayerExport
from .translations import TRANSLATIONS, ExportOptions, Lowering, register_translation

__all__ = [
    "TRANSLATIONS",
    "ExportOptions",
    "ExportReport",
    "LayerExport",
    "Lowering",
    "OnnxExportError",
    "export_onnx",
    "register_translation",
]
