"""A benchmark's results: the terminal tables, the JSON file and the latency plot."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MoefxError
from ..files import atomic_write_text
from ..report import format_table

__all__ = ["BenchReport", "Measurement", "Speedup", "machine_info"]


@dataclass
class Measurement:
    """One model in one runtime at one input size."""

    model: str  # "dense", "moe", "ffn-dense", "ffn-moe", or the ONNX file's name
    runtime: str  # "torch", "ort", "ort-fused", "ort-unfused", "ort-gather"
    threads: int
    batch: int
    seq: int
    tokens: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    reps: int
    peak_mb: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.p50_ms / 1e3) if self.p50_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s}


@dataclass
class Speedup:
    """Dense time over MoE time (realised) against dense FLOPs over MoE active FLOPs (ideal)."""

    scope: str  # "ffn" (one FFN layer alone) or "model"
    runtime: str  # the MoE side's runtime; the dense side runs in torch ("torch") or ORT (the others)
    threads: int
    batch: int
    seq: int
    realised: float
    ideal: float

    @property
    def efficiency(self) -> float:
        return self.realised / self.ideal if self.ideal else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "efficiency": self.efficiency}


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cpu": _cpu_name()}
    try:
        import onnxruntime  # optional: needs moefx[onnx]

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class BenchReport:
    source: str
    machine: dict[str, Any] = field(default_factory=machine_info)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> ModelCost.to_dict()
    measurements: list[Measurement] = field(default_factory=list)
    speedups: list[Speedup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "moefx-bench", "version": 1, "source": self.source, "machine": self.machine,
                "costs": self.costs, "measurements": [m.to_dict() for m in self.measurements],
                "speedups": [s.to_dict() for s in self.speedups], "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (a failed write leaves an existing file untouched)."""
        atomic_write_text(path, self.to_json(), what="the JSON report")

    def render(self) -> str:
        lines = [f"moefx bench: {self.source}",
                 f"machine: {self.machine.get('cpu')} ({self.machine.get('cpus')} CPUs), torch "
                 f"{self.machine.get('torch')}, onnxruntime {self.machine.get('onnxruntime', '-')}", ""]
        if self.costs:
            rows = [[name, _count(c["params"]), _count(c["active_params_per_token"]), _count(c["flops_per_token"]),
                     "-" if c.get("ffn_flops_per_token") is None else _count(c["ffn_flops_per_token"]),
                     "-" if c.get("ffn_fraction") is None else f"{100 * c['ffn_fraction']:.0f}%"]
                    for name, c in self.costs.items()]
            lines += [format_table(["model", "params", "active params/token", "FLOPs/token", "FFN FLOPs/token",
                                    "FFN share"], rows), ""]
        if self.measurements:
            rows = [[m.model, m.runtime, m.threads, m.batch, m.seq, f"{m.p50_ms:.3f}", f"{m.p90_ms:.3f}",
                     f"{m.p99_ms:.3f}", _count(m.tokens_per_s), "-" if m.peak_mb is None else f"{m.peak_mb:.1f}"]
                    for m in self.measurements]
            lines += [format_table(["model", "runtime", "threads", "batch", "seq", "p50 ms", "p90 ms", "p99 ms",
                                    "tokens/s", "peak MB"], rows), ""]
        if self.speedups:
            rows = [[s.scope, s.runtime, s.threads, s.batch, s.seq, f"{s.realised:.2f}x", f"{s.ideal:.2f}x",
                     f"{100 * s.efficiency:.0f}%"] for s in self.speedups]
            lines += ["speed-up of the MoE over the dense model (dense p50 / MoE p50) against the ideal from "
                      "active FLOPs:",
                      format_table(["scope", "runtime", "threads", "batch", "seq", "realised", "ideal",
                                    "of ideal"], rows), ""]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def plot(self, path: str | Path) -> None:
        """Latency (p50) against batch size, one line per model and runtime, one panel per sequence length."""
        try:
            import matplotlib  # optional: needs moefx[plot]
        except ImportError:
            raise MoefxError("--plot needs matplotlib: pip install matplotlib (or leave out --plot)") from None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        whole = [m for m in self.measurements if not m.model.startswith("ffn-")] or self.measurements
        seqs = sorted({m.seq for m in whole})
        if not seqs:
            raise MoefxError("nothing was measured, so there is nothing to plot")
        fig, axes = plt.subplots(1, len(seqs), figsize=(5 * len(seqs), 4), squeeze=False)
        for ax, seq in zip(axes[0], seqs):
            series: dict[str, list[tuple[int, float]]] = {}
            for m in whole:
                if m.seq == seq:
                    series.setdefault(f"{m.model} / {m.runtime} / {m.threads}t", []).append((m.batch, m.p50_ms))
            for label, points in sorted(series.items()):
                points.sort()
                ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("latency p50 (ms)")
            ax.set_title(f"seq {seq}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"moefx bench: {Path(self.source).name}")
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=100)
        except OSError as exc:
            raise MoefxError(f"{path}: cannot write the plot ({exc.strerror})") from None
        finally:
            plt.close(fig)


def _count(value: float) -> str:
    value = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
