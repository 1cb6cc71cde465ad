"""Runtime benchmarks: a converted model against its dense source, in torch eager and ONNX Runtime.

``run_bench("out/", batches=[1, 8], seqs=[128], threads=[1, 2])`` returns a :class:`BenchReport` (latency
p50/p90/p99, tokens per second, peak memory, parameters, active parameters and FLOPs per token, realised
against ideal speed-up per FFN and per model) that renders as tables, JSON and a latency plot; ``moefx bench``
is its command line. :func:`count_torch` and :func:`count_onnx` count parameters and FLOPs from what a model
executes. Importing this package does not import onnx, onnxruntime or matplotlib.
"""

from __future__ import annotations

from .counting import ModelCost, count_onnx, count_torch, expert_flops
from .report import BenchReport, Measurement, Speedup, machine_info
from .suite import RUNTIMES, run_bench
from .timing import Timing, interleaved, measure, peak_memory

__all__ = [
    "RUNTIMES",
    "BenchReport",
    "Measurement",
    "ModelCost",
    "Speedup",
    "Timing",
    "count_onnx",
    "count_torch",
    "expert_flops",
    "interleaved",
    "machine_info",
    "measure",
    "peak_memory",
    "run_bench",
]
