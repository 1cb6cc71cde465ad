"""Calibration: run a model on sample inputs and record what each FFN sees, in bounded memory.

Calibration data comes from a text file (one example per line, tokenized with the model's own tokenizer when
moefx can find one), a ``.pt``/``.safetensors`` tensor file (a tensor whose rows are examples, or a dict of
such tensors named like the model's keyword inputs), or, from Python, a tensor, a dict of tensors, or any
iterable of batches (each a tensor, a tuple of positional inputs or a dict of keyword inputs).
:func:`calibration_batches` turns any of them into forward-pass batches, reading files lazily (line by line,
memory-mapped tensors), so the data may be larger than memory.

:func:`record_ffns` runs those batches through a model in which chosen FFNs are replaced by
:class:`DenseFFN` recorders: each computes its dense FFN exactly (the model behaves as the dense one) and
keeps a uniform sample of at most ``max_tokens`` of its inputs (a seeded bottom-k sample over every token
seen, so the result depends only on the data and the seed), plus streaming per-neuron statistics of its
hidden activations. Padding tokens are left out when the batch has an ``attention_mask``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .activations import ACTIVATIONS
from .capture import CapturedModule, set_mode
from .config import CALIB_TOKENS
from .errors import CalibrationError, first_line
from .inputs import max_positions, overlong_inputs
from .passes.ffn_rules import FFNMatch
from .progress import progress

__all__ = [
    "Batch",
    "DenseFFN",
    "LayerSample",
    "TokenSampler",
    "batch_tokens",
    "calibration_batches",
    "ffn_forward",
    "ffn_hidden",
    "fit_in_order",
    "real_tokens",
    "record_ffns",
    "run_calibration_batch",
    "swap_module",
]

#: One forward pass: positional inputs, keyword inputs, and the ``[batch, seq]`` mask of real tokens (or None).
Batch = tuple[tuple, dict, "torch.Tensor | None"]

log = logging.getLogger("moefx")

_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("moefx_token_mask", default=None)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")


# ---------------------------------------------------------------------------------------------------------
# Calibration inputs
# ---------------------------------------------------------------------------------------------------------


def calibration_batches(
    calib: Any,
    model: nn.Module,
    example: tuple[tuple, dict] | None,
    *,
    batch_size: int = 16,
    max_length: int = 128,
    tokenizer: Any = None,
    role: str = "calibration",
) -> Iterator[Batch]:
    """Forward-pass batches from calibration data ``calib`` (see the module docstring).

    ``example`` is the model's example inputs ``(args, kwargs)``: tensor data is checked against it (dtype
    kind and shape) and fed the same way (positionally or as ``input_ids``). Errors a user can fix raise
    :class:`~moefx.errors.CalibrationError` naming the data (as ``role`` data: ``"evaluation"`` for
    :mod:`moefx.evaluate`). Nothing is read until the batches are iterated.
    """
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise CalibrationError(f"{path}: no such {role} file; pass a .txt, .pt or .safetensors file")
        suffix = path.suffix.lower()
        if suffix in (".txt", ".text"):
            limit = max_positions(model)
            batches = _text_batches(path, model, example, batch_size, min(max_length, limit or max_length), tokenizer,
                                     role)
        elif suffix in (".pt", ".pth", ".safetensors"):
            data = _load_tensor_file(path)
            batches = _tensor_batches(data, str(path), model, example, batch_size)
        else:
            raise CalibrationError(f"{path}: unknown {role} format {suffix or '(none)'!r}; pass .txt (one "
                                   "example per line), .pt or .safetensors (a tensor of examples)")
    elif isinstance(calib, (torch.Tensor, dict)):
        batches = _tensor_batches(calib, f"the {role} data", model, example, batch_size)
    elif isinstance(calib, Iterable):
        batches = _iterable_batches(calib, model, example, role)
    else:
        raise CalibrationError(f"{role} data of type {type(calib).__name__} is not supported; pass a file "
                               "path, a tensor, a dict of tensors or an iterable of batches")
    start = _decoder_start(model)
    if start is None:
        return batches
    slot = _positional_slot(model, "decoder_input_ids")
    return _Sized((_with_decoder_inputs(batch, start, slot) for batch in batches), batches.size, batches.what)


def _decoder_start(model: nn.Module) -> int | None:
    """The decoder start token of an encoder-decoder model that takes ``decoder_input_ids``, else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    accepted = _keyword_inputs(model)
    if accepted is not None and "decoder_input_ids" not in accepted:
        return None
    for source, name in ((config, "decoder_start_token_id"), (getattr(model, "generation_config", None),
                                                              "decoder_start_token_id"), (config, "pad_token_id")):
        start = getattr(source, name, None)
        if isinstance(start, int):
            return start
    return None


def _positional_slot(model: nn.Module, name: str) -> int | None:
    """The position of ``forward``'s parameter ``name`` among its positional parameters, else None."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


def _with_decoder_inputs(batch: Batch, start: int, slot: int | None) -> Batch:
    """An encoder-decoder batch without decoder inputs gets the input ids shifted right behind the decoder
    start token (teacher forcing on the input itself, as T5 and BART train), so the decoder FFNs run too.
    ``slot``: where ``decoder_input_ids`` sits among the positional inputs (a batch that long has them)."""
    args, kwargs, mask = batch
    given_positionally = len(args) > 1 if slot is None else len(args) > slot
    if "decoder_input_ids" in kwargs or "decoder_inputs_embeds" in kwargs or given_positionally:
        return batch
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
        return batch
    shifted = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
    return args, {**kwargs, "decoder_input_ids": shifted}, mask


def run_calibration_batch(model: nn.Module, args: tuple, kwargs: dict, what: str, index: int) -> Any:
    """``model(*args, **kwargs)``; a failure is one :class:`CalibrationError` naming the data and the batch."""
    try:
        return model(*args, **kwargs)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"{what}: batch {index} failed in the model ({first_line(exc)})"
                               f"{_failure_hint(model, args, kwargs)}") from None


def _failure_hint(model: nn.Module, args: tuple, kwargs: dict) -> str:
    overlong = overlong_inputs(model, args, kwargs)
    if overlong is not None:
        length, limit = overlong
        return f"; its sequences have {length} tokens, above the model's {limit} positions: truncate them to {limit}"
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in kwargs:
        return "; an encoder-decoder model also needs decoder inputs: give a dict with 'decoder_input_ids'"
    return "; check that the data fits the model's inputs"


def _load_tensor_file(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        try:
            # Memory-mapped: rows are read as batches are cut from them.
            with safe_open(str(path), framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
        except Exception as exc:
            raise CalibrationError(f"{path}: truncated or corrupt safetensors file ({first_line(exc)}); save "
                                   "the calibration tensors again (safetensors.torch.save_file)") from None
    try:
        # weights_only: a calibration file holds tensors, so a pickle that would run code is refused unrun.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise CalibrationError(f"{path}: not a tensor file loadable with weights_only=True "
                               f"({_unpickling_reason(exc)}); save a plain tensor (torch.save(tensor, path)) "
                               "or use .safetensors") from None
    if isinstance(obj, torch.Tensor) or (isinstance(obj, dict) and obj and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        return obj
    raise CalibrationError(f"{path}: holds a {type(obj).__name__}, not a tensor of examples or a dict of them; "
                           "save torch.save(input_ids, path) or a dict like {'input_ids': ...}")


def _tensor_batches(data: torch.Tensor | dict[str, torch.Tensor], what: str, model: nn.Module,
                    example: tuple[tuple, dict] | None, batch_size: int) -> Iterator[Batch]:
    if isinstance(data, dict) and len(data) == 1 and _main_input(example)[0] in ("0", *data):
        data = next(iter(data.values()))  # one tensor: the examples of the model's main input
    if isinstance(data, torch.Tensor):
        name, reference = _main_input(example)
        _check_like(data, reference, what, name, model)
        rows = data.shape[0]

        def cut(start: int) -> tuple[tuple, dict]:
            chunk = data[start:start + batch_size]
            return ((), {name: chunk}) if name != "0" else ((chunk,), {})
    else:
        if not data:
            raise CalibrationError(f"{what}: holds no tensors")
        accepted = _keyword_inputs(model)
        unknown = [k for k in data if accepted is not None and k not in accepted]
        if unknown:
            raise CalibrationError(f"{what}: the model's forward takes no input named {unknown[0]!r}; name the "
                                   f"tensors after its inputs ({', '.join(sorted(accepted)[:6])})")
        rows = {t.shape[0] if t.dim() else -1 for t in data.values()}
        if len(rows) != 1 or -1 in rows:
            raise CalibrationError(f"{what}: its tensors have different numbers of rows ({sorted(rows)}); give "
                                   "every input one row per example")
        rows = rows.pop()
        kwargs_example = example[1] if example is not None else {}
        for key, tensor in data.items():
            _check_like(tensor, kwargs_example.get(key), what, key, model)

        def cut(start: int) -> tuple[tuple, dict]:
            return (), {k: v[start:start + batch_size] for k, v in data.items()}
    if rows == 0:
        raise CalibrationError(f"{what}: holds no examples (0 rows)")

    def generate() -> Iterator[Batch]:
        for start in range(0, rows, batch_size):
            args, kwargs = cut(start)
            mask = kwargs.get("attention_mask")
            yield args, kwargs, mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    return _Sized(generate(), -(-rows // batch_size), what)


def _main_input(example: tuple[tuple, dict] | None) -> tuple[str, torch.Tensor | None]:
    """How a bare tensor of examples is fed: ``("0", ref)`` positionally, ``("input_ids", ref)`` by keyword."""
    if example is None:
        return "0", None
    args, kwargs = example
    if args and isinstance(args[0], torch.Tensor):
        return "0", args[0]
    if "input_ids" in kwargs:
        return "input_ids", kwargs["input_ids"]
    tensors = [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return tensors[0] if tensors else ("0", None)


def _check_like(data: torch.Tensor, reference: torch.Tensor | None, what: str, name: str, model: nn.Module) -> None:
    """Refuse data whose dtype kind or shape cannot be what the model's input ``name`` takes."""
    label = "positional input" if name == "0" else f"input {name!r}"
    if data.dim() == 0:
        raise CalibrationError(f"{what}: is a scalar; give one row per example")
    if reference is None:
        return
    if data.is_floating_point() != reference.is_floating_point() or data.dtype == torch.bool != (reference.dtype == torch.bool):
        raise CalibrationError(
            f"{what}: has dtype {str(data.dtype).removeprefix('torch.')} but the model's {label} is "
            f"{str(reference.dtype).removeprefix('torch.')}"
            + ("; pass integer token ids" if not reference.is_floating_point() else "; pass floating-point values")
        )
    if data.dim() != reference.dim():
        raise CalibrationError(
            f"{what}: has shape {list(data.shape)} but the model's {label} has {reference.dim()} dimensions "
            f"(example {list(reference.shape)}); give one row per example along the first dimension"
        )
    fixed = reference.shape[2:] if not reference.is_floating_point() else reference.shape[1:]
    if (reference.is_floating_point() and data.shape[-1] != reference.shape[-1]) or (
            not reference.is_floating_point() and data.shape[2:] != fixed):
        raise CalibrationError(f"{what}: has shape {list(data.shape)}, which does not fit the model's {label} "
                               f"(example {list(reference.shape)})")
    if not data.is_floating_point() and data.numel():
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        low, high = int(data.min()), int(data.max())
        if low < 0 or (vocab and name in ("0", "input_ids") and high >= vocab):
            raise CalibrationError(f"{what}: holds token ids from {low} to {high}, outside the model's "
                                   f"vocabulary [0, {vocab}); tokenize with the model's tokenizer")


def _keyword_inputs(model: nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def find_tokenizer(model: nn.Module | str | os.PathLike) -> Any:
    """The Hugging Face tokenizer of a model directory, or of a model's (``config._name_or_path``), when the
    directory has one; else None."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
    else:
        path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not Path(path).is_dir() or not any((Path(path) / f).exists() for f in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer  # optional: needs moefx[hf]

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a broken or partial tokenizer: fall back to hashed words
        return None


def _text_batches(path: Path, model: nn.Module, example: tuple[tuple, dict] | None, batch_size: int,
                  max_length: int, tokenizer: Any, role: str = "calibration") -> Iterator[Batch]:
    name, reference = _main_input(example)
    if reference is not None and reference.is_floating_point():
        raise CalibrationError(f"{path}: a text {role} file needs a model that takes token ids, but its "
                               "input is floating point; pass a tensor file of inputs instead")
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    positional = example is not None and name == "0"  # token ids as the first positional input
    if tokenizer is None and not vocab:
        raise CalibrationError(f"{path}: text {role} needs the model's tokenizer (or config.vocab_size); "
                               "pass a tensor file of token ids instead")
    accepted = _keyword_inputs(model)
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: is not UTF-8 text; pass one example per line, or a .pt/.safetensors "
                               "tensor file") from None
    if first is None:
        raise CalibrationError(f"{path}: has no non-empty lines; put one example per line")

    def lines() -> Iterator[list[str]]:
        chunk: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    chunk.append(line.strip())
                    if len(chunk) == batch_size:
                        yield chunk
                        chunk = []
        if chunk:
            yield chunk

    def generate() -> Iterator[Batch]:
        if tokenizer is None:
            log.info("moefx: %s: the model has no tokenizer here; each word is hashed into its vocabulary (the "
                     "statistics are of that hashing, not of real tokens)", path)
        for chunk in lines():
            if tokenizer is not None:
                encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                kwargs = {k: v for k, v in encoded.items() if accepted is None or k in accepted}
                mask = encoded.get("attention_mask")
            else:  # no tokenizer (a randomly initialised model): words hashed into the vocabulary
                ids = [[zlib.crc32(w.encode()) % vocab for w in line.split()][:max_length] for line in chunk]
                width = max(len(r) for r in ids)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
                input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
                kwargs = {"input_ids": input_ids}
                if accepted is None or "attention_mask" in accepted:
                    kwargs["attention_mask"] = mask
            if positional:
                yield (kwargs.pop("input_ids"),), kwargs, None if mask is None else mask.bool()
            else:
                yield (), kwargs, None if mask is None else mask.bool()

    return _Sized(generate(), None, str(path))


def _iterable_batches(calib: Iterable, model: nn.Module, example: tuple[tuple, dict] | None,
                      role: str = "calibration") -> Iterator[Batch]:
    def generate() -> Iterator[Batch]:
        for i, item in enumerate(calib):
            if isinstance(item, torch.Tensor):
                name, reference = _main_input(example)
                _check_like(item, reference, f"{role} batch {i}", name, model)
                args, kwargs = ((item,), {}) if name == "0" else ((), {name: item})
            elif isinstance(item, dict):
                args, kwargs = (), dict(item)
            elif isinstance(item, (tuple, list)):
                args, kwargs = tuple(item), {}
            else:
                raise CalibrationError(f"{role} batch {i} is a {type(item).__name__}; give a tensor, a tuple "
                                       "of positional inputs or a dict of keyword inputs")
            mask = kwargs.get("attention_mask")
            yield args, kwargs, mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    return _Sized(generate(), len(calib) if hasattr(calib, "__len__") else None, f"the {role} data")


class _Sized:
    """An iterator of batches that knows how many it will yield (for the progress bar) and what they are from."""

    def __init__(self, it: Iterator[Batch], size: int | None, what: str) -> None:
        self._it, self.size, self.what = it, size, what

    def __iter__(self) -> Iterator[Batch]:
        return self._it

    def __next__(self) -> Batch:
        return next(self._it)


# ---------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LayerSample:
    """What one FFN saw during calibration.

    ``inputs [n, H]`` is a uniform sample (float32) of at most ``max_tokens`` of its ``tokens`` input rows;
    ``abs_mean [I]`` and ``active_rate [I]`` are, over every token, each hidden neuron's mean absolute
    activation and the fraction of tokens on which it is positive.
    """

    tokens: int = 0
    inputs: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    active_rate: torch.Tensor | None = None
    _keys: torch.Tensor | None = field(default=None, repr=False)


class TokenSampler:
    """Keeps a :class:`LayerSample` of the rows it is given: a seeded bottom-k sample of at most
    ``max_tokens`` input rows (every row draws a key; the smallest keys so far are kept, in arrival order)
    and running per-neuron statistics of the hidden activations.

    Rows are buffered and cut down to the sample only when twice ``max_tokens`` are held (and when the sample
    is read), so that adding a batch costs its own size, not the size of the sample so far.
    """

    def __init__(self, max_tokens: int, generator: torch.Generator) -> None:
        self.max_tokens = max_tokens
        self.generator = generator
        self._sample = LayerSample()
        self._abs_sum: torch.Tensor | None = None
        self._positive: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._held = 0

    @property
    def sample(self) -> LayerSample:
        self._compact()
        return self._sample

    @torch.no_grad()
    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """Rows ``x [N, H]`` and their hidden activations ``h [N, I]``."""
        x = x.float().cpu()
        h = h.float()
        s = self._sample
        s.tokens += x.shape[0]
        abs_sum, positive = h.abs().sum(0).cpu(), (h > 0).sum(0).cpu()
        self._abs_sum = abs_sum if self._abs_sum is None else self._abs_sum + abs_sum
        self._positive = positive if self._positive is None else self._positive + positive
        s.abs_mean = self._abs_sum / max(s.tokens, 1)
        s.active_rate = self._positive.float() / max(s.tokens, 1)
        self._rows.append(x)
        self._keys.append(torch.rand(x.shape[0], generator=self.generator))
        self._held += x.shape[0]
        if self._held > 2 * self.max_tokens:
            self._compact()

    def _compact(self) -> None:
        s = self._sample
        if not self._rows:
            return
        rows = ([s.inputs] if s.inputs is not None else []) + self._rows
        keys = ([s._keys] if s._keys is not None else []) + self._keys
        x, k = (torch.cat(rows), torch.cat(keys)) if len(rows) > 1 else (rows[0], keys[0])
        if k.shape[0] > self.max_tokens:
            keep = torch.topk(k, self.max_tokens, largest=False).indices.sort().values
            k, x = k[keep], x[keep]
        s._keys, s.inputs = k, x
        self._rows, self._keys = [], []
        self._held = x.shape[0]


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x [..., D]`` that are real tokens under a ``[batch, seq]`` mask (all rows without one)."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    elif mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
        x = x[mask.reshape(-1).to(x.device)]
    return x.reshape(-1, x.shape[-1])


class DenseFFN(nn.Module):
    """The dense FFN of a match, computed exactly, sampling its inputs into a :class:`TokenSampler`."""

    def __init__(self, match: FFNMatch, max_tokens: int, generator: torch.Generator) -> None:
        super().__init__()
        self.match = match
        self.sampler = TokenSampler(max_tokens, generator)

    @property
    def sample(self) -> LayerSample:
        return self.sampler.sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ffn_hidden(self.match, x)
        mask = _TOKEN_MASK.get()
        self.sampler.add(real_tokens(x, mask), real_tokens(h, mask))
        return F.linear(h, self.match.down_weight, self.match.down_bias)


def batch_tokens(batch: Batch) -> int:
    """How many real tokens a batch holds: its mask's ones; without a mask, the rows of its first tensor input
    (every element of integer token ids; every vector along the last dimension of a float input)."""
    args, kwargs, mask = batch
    if mask is not None:
        return int(mask.sum())
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.numel() if not t.is_floating_point() else t.numel() // max(t.shape[-1], 1)
    return 1


def ffn_hidden(match: FFNMatch, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN's hidden activations (what its down projection reads) on ``x [..., H]``."""
    h = ACTIVATIONS[match.activation](F.linear(x, match.up_weight, match.up_bias))
    if match.gated:
        h = h * F.linear(x, match.gate_up_weight, match.gate_up_bias)
    return h


def ffn_forward(match: FFNMatch, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN of ``match`` on ``x [..., H]``, exactly."""
    return F.linear(ffn_hidden(match, x.to(match.up_weight.dtype)), match.down_weight, match.down_bias)


def swap_module(model: nn.Module, qualname: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``qualname`` in ``model`` and return what was there (captured graphs re-bind to it)."""
    parent_name, _, leaf = qualname.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = parent.get_submodule(leaf)
    setattr(parent, leaf, new)
    for module in model.modules():
        if isinstance(module, CapturedModule):
            module.rebind()
    return old


@torch.no_grad()
def record_ffns(
    model: nn.Module,
    targets: dict[str, tuple[FFNMatch, torch.Generator]],
    batches: Iterable[Batch],
    *,
    max_tokens: int = CALIB_TOKENS,
    desc: str = "calibrating",
) -> dict[str, LayerSample]:
    """Run ``batches`` through ``model`` with the module at each qualified name in ``targets`` replaced by a
    :class:`DenseFFN` recorder of its match (and put back afterwards); returns each one's sample."""
    recorders = {name: DenseFFN(match, max_tokens, gen) for name, (match, gen) in targets.items()}
    originals = {name: swap_module(model, name, rec) for name, rec in recorders.items()}
    was_training = model.training
    set_mode(model, False)
    batch_count = 0
    try:
        with progress(total=getattr(batches, "size", None), desc=desc, unit="batch") as bar:
            for args, kwargs, mask in batches:
                token = _TOKEN_MASK.set(mask)
                try:
                    run_calibration_batch(model, args, kwargs, getattr(batches, "what", "the calibration data"),
                                          batch_count)
                finally:
                    _TOKEN_MASK.reset(token)
                batch_count += 1
                bar.update(1)
    finally:
        for name, module in originals.items():
            swap_module(model, name, module)
        set_mode(model, was_training)
    if batch_count == 0:
        raise CalibrationError("the calibration data holds no batches; give at least one example")
    return {name: rec.sample for name, rec in recorders.items()}


# ---------------------------------------------------------------------------------------------------------
# Fitting layers in order, on the converted model's own inputs
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fit_in_order(model: nn.Module, names: list[str], batches: list[Batch], fit: Callable[[str, torch.Tensor], None],
                 *, what: str = "the calibration data") -> list[str]:
    """Fit the modules at ``names`` one after another, each on the inputs it gets from the modules already
    fitted before it, and return the names fitted (in that order).

    Every batch runs as its own forward pass, all of them at once but one at a time (a pass holds a lock
    while it computes and gives it up while it waits): a pass that reaches one of the modules leaves the
    module's input rows there (real tokens only) and waits. Once every pass still running waits, the module
    that comes first in ``names`` among those waited at is fitted, ``fit(name, rows of every pass)``, and the
    passes waiting there go on through the fitted module. So module N is fitted on what the converted model,
    not the dense one, feeds it, whatever the model's structure: errors of the layers before it are seen, and
    not compounded. A module that no batch reaches is not fitted.
    """
    cond = threading.Condition()
    rows: dict[str, dict[int, torch.Tensor]] = {name: {} for name in names}
    fitted: list[str] = []
    waiting: dict[int, str] = {}  # pass -> the module it waits at
    failures: list[BaseException] = []
    running = [len(batches)]
    fitting = [False]  # a fit may run the module itself (to judge it): those calls pass straight through
    order = {name: i for i, name in enumerate(names)}
    local = threading.local()

    def fit_waited() -> None:  # with cond held
        while running[0] and len(waiting) == running[0] and not failures:
            name = min(set(waiting.values()), key=order.__getitem__)
            x = torch.cat([rows[name][i] for i in sorted(rows[name])])
            rows[name].clear()
            fitting[0] = True
            try:
                fit(name, x)
            except BaseException as exc:  # re-raised in the caller's thread
                failures.append(exc)
            finally:
                fitting[0] = False
            fitted.append(name)
            for i in [i for i, n in waiting.items() if n == name]:
                del waiting[i]
            cond.notify_all()

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            index = getattr(local, "index", None)
            if index is None or fitting[0] or name in fitted:  # not a pass's own call, or fitted already
                return
            rows[name][index] = real_tokens(args[0], local.mask).float()
            waiting[index] = name
            fit_waited()
            while name not in fitted and not failures:
                cond.wait()
            if failures:
                raise _Aborted
        return hook

    def work(index: int, batch: Batch) -> None:
        args, kwargs, mask = batch
        with cond, torch.no_grad():
            local.index, local.mask = index, mask
            token = _TOKEN_MASK.set(mask)
            try:
                run_calibration_batch(model, args, kwargs, what, index)
            except _Aborted:
                pass
            except BaseException as exc:  # re-raised in the caller's thread
                failures.append(exc)
            finally:
                _TOKEN_MASK.reset(token)
                running[0] -= 1
                waiting.pop(index, None)
                fit_waited()
                cond.notify_all()

    handles = [model.get_submodule(name).register_forward_pre_hook(pre_hook(name)) for name in names]
    was_training = model.training
    set_mode(model, False)
    threads = [threading.Thread(target=work, args=(i, b), name=f"moefx-calib-{i}", daemon=True)
               for i, b in enumerate(batches)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in handles:
            h.remove()
        set_mode(model, was_training)
    if failures:
        raise failures[0]
    return fitted


class _Aborted(BaseException):
    """Raised inside the passes still waiting when a fit or another pass failed (a BaseException, so that
    neither the model's own ``except Exception`` nor run_calibration_batch's wrapping catches it)."""


def _unpickling_reason(exc: Exception) -> str:
    """The point of torch's (many-line) weights_only refusal, without its advice to load with weights_only=False."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1]
        return next((line.strip() for line in rest.splitlines() if line.strip()), "refused")[:200]
    return first_line(exc)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None):
    """Mark the real tokens (``[batch, seq]`` bool) of the forward passes inside, for the recorders."""
    token = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)
