"""The runtimes a benchmark runs a model in: torch eager and ONNX Runtime (CPU), and the inputs it feeds them.

Each runner is a zero-argument callable that runs one forward pass on fixed inputs; threads are set where the
runner is built (``torch.set_num_threads``; ORT ``intra_op_num_threads``, one inter-op thread, sequential
execution). ONNX Runtime sessions come from files written by :func:`moefx.onnx.export_onnx` (converted
models) or :func:`export_dense_onnx` (their dense sources), both through ``torch.onnx.export(dynamo=True)``
with dynamic batch and sequence axes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture import FlatCall, set_mode
from ..errors import MoefxError
from ..hf import is_hf_model
from ..inputs import default_inputs

__all__ = [
    "export_dense_onnx",
    "onnx_feed",
    "ort_runner",
    "synthesize_inputs",
    "torch_runner",
    "torch_threads",
]

_ID_NAMES = ("input_ids", "decoder_input_ids")


# -- inputs ----------------------------------------------------------------------------------------------


def synthesize_inputs(model: nn.Module, example: tuple[tuple, dict] | None, batch: int, seq: int,
                      *, seed: int = 0) -> tuple[tuple, dict]:
    """Inputs shaped like ``example`` with batch size ``batch`` and sequence length ``seq``.

    Token ids are random ids below the vocabulary size, attention masks ones, ``[B, S, H]`` float inputs
    Gaussian; image-like inputs keep their spatial size. Hugging Face models run with ``use_cache=False``.
    """
    if example is None:
        example = default_inputs(model)
        if example is None:
            raise MoefxError(
                f"{type(model).__name__}: no example inputs to shape the benchmark inputs after; convert again "
                "with example inputs (moefx convert --inputs FILE) so that the output directory records them"
            )
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)

    def make(path: str, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        name = path.split("/")[-1]
        if t.is_floating_point():
            shape = [batch, seq, *t.shape[2:]] if t.dim() == 3 else [batch, *t.shape[1:]]
            return torch.randn(shape, generator=gen, dtype=t.dtype)
        shape = [batch, seq, *t.shape[2:]] if t.dim() >= 2 else [batch]
        if "mask" in name:
            return torch.ones(shape, dtype=t.dtype)
        if name == "position_ids":
            return torch.arange(seq).expand(batch, seq).to(t.dtype)
        if name == "token_type_ids":
            return torch.zeros(shape, dtype=t.dtype)
        high = vocab if name in _ID_NAMES and vocab else max(int(t.max()) + 1, 2)
        return torch.randint(0, int(high), shape, generator=gen, dtype=t.dtype)

    leaves, spec = pytree.tree_flatten_with_path(example)
    made = [make("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf)
            for path, leaf in leaves]
    args, kwargs = pytree.tree_unflatten(made, spec)
    kwargs = dict(kwargs)
    if is_hf_model(model) and "use_cache" not in kwargs:
        with contextlib.suppress(TypeError, ValueError):
            if "use_cache" in inspect.signature(model.forward).parameters:
                kwargs["use_cache"] = False
    return tuple(args), kwargs


def tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


# -- torch -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_runner(model: nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    """One eager forward under ``torch.inference_mode`` (threads: set by the caller, see torch_threads)."""

    def run() -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)

    return run


# -- ONNX Runtime ----------------------------------------------------------------------------------------


def ort_runner(path: str | Path, feed: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    """One ``session.run`` of the ONNX file on ``feed`` with ``threads`` intra-op threads."""
    session = ort_session(path, threads)
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}

    def run() -> Any:
        return session.run(None, feed)

    return run


def ort_session(path: str | Path, threads: int):
    import onnxruntime as ort  # optional: needs moefx[onnx]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoefxError(f"{path}: ONNX Runtime cannot load it ({first})") from None


def onnx_feed(path_or_session: Any, args: tuple = (), kwargs: dict | None = None,
              input_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The ORT feed for torch inputs: by name where the graph kept the names, else in order."""
    session = path_or_session if hasattr(path_or_session, "get_inputs") else ort_session(path_or_session, 1)
    tensors = tensor_leaves(args, kwargs or {})
    graph_inputs = [i.name for i in session.get_inputs()]
    names = input_names or graph_inputs
    by_name = dict(zip(names, tensors))
    if not set(graph_inputs) <= set(by_name):
        by_name = dict(zip(graph_inputs, tensors))
    return {name: by_name[name].detach().cpu().numpy() for name in graph_inputs}


def synthesize_onnx_feed(session: Any, batch: int, seq: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for an ONNX file's graph: symbolic axis 0 is the batch, axis 1 the sequence."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in session.get_inputs():
        shape = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            else:
                shape.append(batch if axis == 0 else seq if axis == 1 else 1)
        kind = value.type
        if "float" in kind:
            dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(kind, np.float32)
            feed[value.name] = rng.standard_normal(shape).astype(dtype)
        elif "int" in kind or "bool" in kind:
            dtype = np.int32 if kind == "tensor(int32)" else np.bool_ if kind == "tensor(bool)" else np.int64
            if "mask" in value.name or dtype is np.bool_:
                feed[value.name] = np.ones(shape, dtype=dtype)
            elif value.name == "position_ids":
                feed[value.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
            else:  # token ids: small ids are valid in any vocabulary
                feed[value.name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            raise MoefxError(f"input {value.name!r} has type {kind}, which moefx bench cannot synthesise")
    return feed


def export_dense_onnx(model: nn.Module, args: tuple, kwargs: dict, path: str | Path) -> list[str]:
    """Export a (dense) model with ``torch.onnx.export(dynamo=True)``, batch and sequence axes dynamic (the first
    two of every tensor input), as moefx's own export does.

    Returns the graph's input names (one per tensor input, in order).
    """
    from ..onnx.export import export_dims  # optional: needs moefx[onnx]

    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
    names = _leaf_names(model, args, kwargs)
    dims = export_dims(tensors)
    shim = set_mode(FlatCall(model, leaves, spec), False)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir",
                                            "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(shim, tensors, dynamo=True, dynamic_shapes=(dims,), input_names=names,
                                        verbose=False)
        program.save(str(path))
    except Exception as exc:
        raise MoefxError(f"torch.onnx.export failed on the dense {type(model).__name__}: "
                         f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return names


def _leaf_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = []
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path[1:]]
        if path[0].idx == 0 and parts and parts[0].isdigit() and int(parts[0]) < len(params):
            parts[0] = params[int(parts[0])]
        names.append("_".join(parts) or "input")
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
