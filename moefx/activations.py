"""The FFN activations moefx knows, by name, and how an unnamed activation subgraph is identified.

A captured graph spells an activation in many ways (``nn.GELU()``, ``F.gelu``, ``aten.gelu``, GPT-2's
``0.5 * x * (1 + tanh(...))`` chain, ``x * sigmoid(1.702 * x)``). moefx does not enumerate spellings: it
extracts the elementwise subgraph between the up and down projections and evaluates it on probe values,
naming it after the canonical activation it equals (to float tolerance). Gated FFNs are identified the same
way with two inputs: ``f(gate, up) == act(gate) * up``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["ACTIVATIONS", "apply_activation", "identify_activation", "identify_gated_activation"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


#: Canonical activations by name. The names are the ones recipes, reports and the ONNX exporter use.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
    "relu2": _relu2,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def apply_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[name](x)


def _probe_values(n: int = 4096, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A mix of unit-scale values (where GELU variants differ most) and a wide range.
    return torch.cat([torch.randn(n, generator=g, dtype=torch.float64) * 3.0, torch.linspace(-8, 8, 257, dtype=torch.float64)])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Probes run in float32 (graphs may cast); exact and tanh GELU differ by ~4e-4, far above this tolerance.
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=2e-6))


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Name of the canonical activation that ``fn`` computes elementwise, or None."""
    with _eager():
        x = _probe_values().float()
        try:
            with torch.no_grad():
                y = fn(x)
        except Exception:
            return None
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            return None
        for name, act in ACTIVATIONS.items():
            if _close(y, act(x)):
                return name
        return None


def identify_gated_activation(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[str, bool] | None:
    """For ``fn(a, b)``: ``(name, a_is_gate)`` when ``fn(a, b) == act(gate) * up`` for a canonical act."""
    with _eager():
        a = _probe_values(seed=1).float()
        b = _probe_values(seed=2).float()
        try:
            with torch.no_grad():
                y = fn(a, b)
        except Exception:
            return None
        if not isinstance(y, torch.Tensor) or y.shape != a.shape:
            return None
        for name, act in ACTIVATIONS.items():
            if _close(y, act(a) * b):
                return name, True
            if _close(y, act(b) * a):
                return name, False
        return None


@contextlib.contextmanager
def _eager():
    """Evaluate the probes on real tensors even inside a trace (a model recaptured while ``torch.export`` runs
    its parent): fake-tensor and proxy modes would turn them into fake values that ``allclose`` cannot read."""
    with _disable_current_modes():
        yield
