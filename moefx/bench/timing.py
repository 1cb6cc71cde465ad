"""Latency measurement: warm-up, enough repetitions for a stable median, percentiles, peak memory.

Latencies of one call are taken one call at a time (``time.perf_counter``), after ``warmup`` calls, until
both ``min_reps`` calls and ``min_seconds`` of measurement have passed (and at most ``max_reps``).
:func:`interleaved` times several candidates round-robin in one process (still call by call), so that a
noisy shared machine slows them alike and their ratio stays meaningful.

Peak memory is the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` on Linux) over the resident set before the measured code ran.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Timing", "interleaved", "measure", "peak_memory"]


@dataclass
class Timing:
    """Per-call latencies in seconds."""

    samples: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        position = (len(ordered) - 1) * q / 100
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.p50 * 1e3, "p90_ms": self.p90 * 1e3, "p99_ms": self.p99 * 1e3,
                "reps": len(self.samples)}


def measure(fn: Callable[[], Any], *, warmup: int = 3, min_reps: int = 10, max_reps: int = 1000,
            min_seconds: float = 0.5) -> Timing:
    """Time ``fn()`` call by call (see the module docstring)."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    start = time.perf_counter()
    while len(timing.samples) < max_reps:
        t0 = time.perf_counter()
        fn()
        timing.samples.append(time.perf_counter() - t0)
        if len(timing.samples) >= min_reps and time.perf_counter() - start >= min_seconds:
            break
    return timing


def interleaved(candidates: dict[str, Callable[[], Any]], *, rounds: int = 5, min_seconds: float = 0.5,
                min_reps: int = 10, warmup: int = 2) -> dict[str, Timing]:
    """Per-call latencies of several candidates, measured round-robin.

    Each of ``rounds`` rounds runs every candidate for about ``min_seconds / rounds`` (at least
    ``min_reps / rounds`` calls), timing each call, so that a burst of load from another process lands on
    all candidates alike and their ratio stays meaningful.
    """
    per_call = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t0, 1e-7)
    calls = {name: max(-(-min_reps // rounds), int(min_seconds / rounds / t)) for name, t in per_call.items()}
    results = {name: Timing() for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples = results[name].samples
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
    return results


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, float | None]]:
    """``with peak_memory() as mem: ...`` sets ``mem["peak_mb"]``: peak resident-set growth inside the block
    (None where the platform cannot tell)."""
    result: dict[str, float | None] = {"peak_mb": None}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        resettable = True
    except OSError:
        resettable = False
    before = _status_kb("VmRSS")
    try:
        yield result
    finally:
        peak = _status_kb("VmHWM")
        if resettable and before is not None and peak is not None:
            result["peak_mb"] = max(peak - before, 0) / 1024
