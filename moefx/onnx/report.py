"""The ONNX export report: per MoE layer fused or not and why, op counts, file size, approximations, parity."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..report import format_table, human_bytes
from .translations import Lowering

__all__ = ["ExportReport", "LayerExport"]


@dataclass
class LayerExport:
    """How one MoE layer ended up in the ONNX graph."""

    name: str  # the MoE layer's qualified name in the model
    op: str  # the dispatch op it called, e.g. "moefx::topk_moe"
    lowering: Lowering | None  # None: the layer is not on the exported forward path
    nodes: dict[str, int] = field(default_factory=dict)  # ONNX nodes of its dispatch, by op

    @property
    def fused(self) -> bool:
        return self.lowering is not None and self.lowering.fused

    @property
    def status(self) -> str:
        if self.lowering is None:
            return "absent"
        return "fused" if self.lowering.fused else "unfused"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "status": self.status, "nodes": dict(self.nodes),
                **(self.lowering.to_dict() if self.lowering is not None else
                   {"fused": False, "reason": "not called on the exported forward path"})}


@dataclass
class ExportReport:
    """What :func:`moefx.onnx.export_onnx` wrote, and how each MoE layer was translated."""

    path: str
    data_path: str | None  # external weights file, when the model is written with external data
    file_bytes: int  # the .onnx file plus its external data
    opset: int
    options: dict[str, bool]
    layers: list[LayerExport]
    op_counts: dict[str, int]  # every node of the main graph, "domain::op" ("op" for the ONNX domain)
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    verification: dict[str, Any] | None = None  # ONNX Runtime vs torch on the example inputs
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fused_layers(self) -> list[LayerExport]:
        return [layer for layer in self.layers if layer.fused]

    @property
    def unfused_layers(self) -> list[LayerExport]:
        return [layer for layer in self.layers if not layer.fused]

    @property
    def approximations(self) -> list[str]:
        """Every approximation the exported graph makes, once each."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            if layer.lowering is not None:
                seen.update(dict.fromkeys(layer.lowering.approximations))
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "data_path": self.data_path,
            "file_bytes": self.file_bytes,
            "opset": self.opset,
            "options": dict(self.options),
            "summary": {"moe_layers": len(self.layers), "fused": len(self.fused_layers),
                        "unfused": len(self.unfused_layers), "nodes": sum(self.op_counts.values())},
            "layers": [layer.to_dict() for layer in self.layers],
            "approximations": self.approximations,
            "op_counts": dict(self.op_counts),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "verification": self.verification,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def render(self) -> str:
        """The report as terminal text: a summary line, one table row per MoE layer, then the details."""
        size = human_bytes(self.file_bytes)
        where = self.path + (f" (+ external data {self.data_path})" if self.data_path else "")
        head = (f"wrote {where}: {size}, opset {self.opset}, {sum(self.op_counts.values())} nodes; "
                f"{len(self.fused_layers)} of {len(self.layers)} MoE layer(s) fused ({self.seconds:.1f}s)")
        rows = [[layer.name or "(root)", layer.op, layer.status, _counts_text(layer.nodes),
                 layer.lowering.reason if layer.lowering is not None else "not on the exported forward path"]
                for layer in self.layers]
        out = [head, format_table(["moe layer", "dispatch", "export", "onnx nodes", "why"], rows)]
        if self.approximations:
            out.append("approximations:")
            out += [f"  - {text}" for text in self.approximations]
        top = Counter(self.op_counts).most_common(8)
        out.append("ops: " + ", ".join(f"{name} {count}" for name, count in top)
                   + (", ..." if len(self.op_counts) > len(top) else ""))
        v = self.verification
        if v and v.get("compared"):
            out.append(f"check with ONNX Runtime on the example inputs: max abs error {v['max_abs_error']:.2e} "
                       f"(outputs up to {v['max_abs_reference']:.2e})")
        elif v:
            out.append(f"not checked with ONNX Runtime: {v.get('reason', 'no comparable outputs')}")
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)


def _counts_text(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    # The dispatch node itself (com.microsoft::MoE, a moefx:: function call) first, then the most frequent.
    ranked = sorted(counts.items(), key=lambda kv: ("::" not in kv[0], -kv[1]))
    return ", ".join(f"{count} {name}" for name, count in ranked[:3]) + (
        ", ..." if len(counts) > 3 else "")

