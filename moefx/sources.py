"""Model sources: load the dense model a MODEL argument names, and rebuild it from a recipe.

A MODEL given to the CLI is one of:

* a Hugging Face model directory (``config.json`` + safetensors weights),
* a ``torch.export`` program (``.pt2``),
* a ``package.module:factory`` callable returning a model or ``(model, example_inputs)``,
* a ``torch.save``-d ``nn.Module`` (``.pt``/``.pth``) — loading it runs code from the file, so it is refused
  unless the caller opts in with ``trust_remote_code`` (``--trust-remote-code``).

:func:`load_source` loads one as a :class:`ModelSource`, whose :meth:`~ModelSource.to_dict` the recipe keeps;
:func:`rebuild_source` builds the dense model again from that record (``moefx.load``, ``moefx heal``).
transformers is optional (``moefx[hf]``): it is imported where a Hugging Face model is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import quiet_torch_export
from .checkpoint import TensorEntry
from .errors import ConfigError, ModelLoadError, UnsafeFileError, first_line
from .hf import build_without_weights
from .progress import progress_disabled

__all__ = [
    "ModelSource",
    "class_path",
    "hf_model_class",
    "load_dense_source",
    "load_hf_config",
    "load_source",
    "rebuild_hf_without_weights",
    "rebuild_source",
    "resolve_dtype",
]

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".ckpt"}


@dataclass
class ModelSource:
    """A loaded model and where it came from."""

    kind: str  # "hf" | "pt2" | "factory" | "pickle" | "module"
    spec: str
    model: nn.Module
    example_inputs: tuple[tuple, dict] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "class": class_path(self.model), **self.extra}


def class_path(obj: Any) -> str:
    """``module:qualname`` of ``obj``'s class, as the recipe records it."""
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_source(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> ModelSource:
    """Load a model from a CLI MODEL argument (see the module docstring)."""
    text = os.fspath(spec)
    path = Path(text)
    if path.exists():
        if path.is_dir():
            if (path / "recipe.json").exists():
                raise ModelLoadError(
                    f"{text}: is a moefx output directory (it has recipe.json); convert the original model, "
                    "or use `moefx inspect`/`moefx export` on this directory"
                )
            return _load_hf_dir(path)
        suffix = path.suffix.lower()
        if suffix == ".pt2":
            return _load_pt2(path)
        if suffix in _PICKLE_SUFFIXES:
            return _load_pickle(path, trust_remote_code)
        if suffix == ".safetensors":
            raise ModelLoadError(
                f"{text}: a bare safetensors file holds weights but no architecture; pass the Hugging Face "
                "model directory that contains it (with config.json)"
            )
        raise ModelLoadError(
            f"{text}: unknown model format {suffix or '(no extension)'!r}; pass a Hugging Face model directory, "
            "a .pt2 program, a .pt module (with --trust-remote-code) or package.module:factory"
        )
    if _FACTORY.match(text):
        return _load_factory(text)
    raise ModelLoadError(f"{text}: no such file or directory (nor a package.module:factory callable)")


def load_dense_source(source: dict[str, Any] | None, *, how: str, trust_remote_code: bool = False) -> nn.Module:
    """The dense model a conversion started from, loaded again from its recorded ``source`` (a recipe's
    ``source``); ``how`` says how to pass it instead when it was a Python object, with no source to reload."""
    spec = (source or {}).get("spec")
    if not spec:
        raise ConfigError("the dense model this was converted from is unknown (it was converted from a Python "
                          f"object); pass it: {how}")
    return load_source(spec, trust_remote_code=trust_remote_code).model


def load_hf_config(path: Path, *, parse: bool = True) -> tuple[dict[str, Any], Any]:
    """``config.json`` of a Hugging Face model directory, as a dict and (``parse``) as a transformers config."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(
            f"{path}: not a Hugging Face model directory (no config.json); pass a directory with config.json "
            "and safetensors weights"
        )
    try:
        config_dict = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: is not valid JSON ({exc}); fix or regenerate config.json") from None
    if not isinstance(config_dict, dict) or "model_type" not in config_dict:
        raise ModelLoadError(f"{config_file}: has no model_type; it is not a transformers config")
    try:
        from transformers import AutoConfig  # optional: needs moefx[hf]
    except ImportError:  # pragma: no cover
        raise ModelLoadError("loading a Hugging Face directory needs transformers: pip install 'moefx[hf]'") from None
    if not parse:
        return config_dict, None
    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{config_file}: transformers could not read it: {first_line(exc)}") from None
    return config_dict, hf_config


def _load_hf_dir(path: Path) -> ModelSource:
    config_dict, _ = load_hf_config(path, parse=False)
    import transformers  # optional: needs moefx[hf]; load_hf_config checked it is installed

    cls = hf_model_class(config_dict)
    if progress_disabled():
        transformers.utils.logging.disable_progress_bar()
    with _held_transformers_logs() as records:
        try:
            model = cls.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            detail = _hf_failure(exc, records)
            records.clear()  # the one line below says what went wrong; transformers' report would bury it
            raise ModelLoadError(f"{path}: transformers could not load the model: {detail}; check config.json "
                                 "and the weights") from None
    model.eval()
    return ModelSource("hf", str(path.resolve()), model, None, {"architecture": cls.__name__,
                                                                  "transformers": transformers.__version__})


@contextlib.contextmanager
def _held_transformers_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold back what transformers logs while loading; it is passed on afterwards unless the list was cleared
    (a failed load becomes one line; transformers' many-line load report would bury it)."""
    logger = logging.getLogger("transformers")
    records: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handlers, propagate = logger.handlers[:], logger.propagate
    hold = _Hold()
    logger.handlers, logger.propagate = [hold], False
    try:
        yield records
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        for record in records:
            logger.handle(record)


def _hf_failure(exc: BaseException, records: list) -> str:
    """transformers' error in one line; for shape mismatches (which it explains only in its load report) the
    first mismatching weight."""
    text = first_line(exc)
    if "report" not in text:
        return text
    for record in records:
        for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
            cells = [cell.strip() for cell in line.split("|")]
            if len(cells) >= 3 and cells[1] == "MISMATCH":
                return f"{cells[0]}: {cells[-1]} (config.json does not fit the weights)"
    if "ignore_mismatched_sizes" in text:  # the report was not logged (transformers' verbosity is error)
        return "weight shapes differ from those config.json describes (config.json does not fit the weights)"
    return re.sub(r"\s*For details look at the .*report!?", "", text)  # a report we do not show


def hf_model_class(config_dict: dict[str, Any]):
    """The transformers class a ``config.json`` names in ``architectures`` (the first one transformers has),
    else ``AutoModel``."""
    import transformers  # optional: needs moefx[hf]

    for name in config_dict.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _load_pt2(path: Path) -> ModelSource:
    try:
        with quiet_torch_export():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a valid torch.export program ({first_line(exc)}); "
                             "create one with torch.export.save") from None
    model = program.module()
    inputs = None
    example = getattr(program, "example_inputs", None)
    if example is not None:
        args, kwargs = example
        inputs = (tuple(args), dict(kwargs))
    return ModelSource("pt2", str(path.resolve()), model, inputs, {"sha256": _sha256(path)})


def _load_pickle(path: Path, trust_remote_code: bool) -> ModelSource:
    if not trust_remote_code:
        raise UnsafeFileError(
            f"{path}: loading a pickled model executes code stored in the file; if you trust it, pass "
            "--trust-remote-code (trust_remote_code=True), or save the model with torch.export as a .pt2"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:  # the pickle names classes by module: that module must be importable
        raise ModelLoadError(f"{path}: could not be unpickled ({first_line(exc)}); the model needs module "
                             f"{exc.name!r} importable here: install it, or, if it is your own code, run from the "
                             "directory that holds it or add that directory to PYTHONPATH") from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: could not be unpickled ({first_line(exc)}); is it a complete torch.save "
                             "file? save the model again, or as a .pt2 with torch.export.save") from None
    if isinstance(obj, dict):
        raise ModelLoadError(
            f"{path}: holds a state dict, not a model; pass a package.module:factory that builds the model "
            "and loads these weights"
        )
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a torch.nn.Module")
    obj.eval()
    return ModelSource("pickle", str(path.resolve()), obj, None, {"sha256": _sha256(path)})


def _load_factory(spec: str) -> ModelSource:
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"{spec}: cannot import {module_name} ({first_line(exc)})") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelLoadError(f"{spec}: {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelLoadError(f"{spec}: {attr} is not callable")
    try:
        result = factory()
    except Exception as exc:
        raise ModelLoadError(f"{spec}: the factory raised {type(exc).__name__}: {first_line(exc)}") from None
    inputs = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result
        if isinstance(example, dict):
            inputs = ((), example)
        elif isinstance(example, (tuple, list)):
            inputs = (tuple(example), {})
        else:
            inputs = ((example,), {})
    if not isinstance(result, nn.Module):
        raise ModelLoadError(f"{spec}: the factory returned a {type(result).__name__}, not a torch.nn.Module")
    result.eval()
    return ModelSource("factory", spec, result, inputs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _saved_hf_config(out: Path) -> Any:
    """The transformers config saved in a moefx output directory."""
    from transformers import AutoConfig  # optional: needs moefx[hf]

    try:
        return AutoConfig.from_pretrained(str(out), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{out / 'config.json'}: transformers could not read it ({first_line(exc)}); "
                             "restore it from the source model or convert the model again") from None


def rebuild_source(out: Path, source: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    """The dense model a recipe's ``source`` describes (weights as built, not the saved ones)."""
    kind = source.get("kind")
    if kind == "hf":
        cls = hf_model_class({"architectures": [source.get("architecture")]})
        return cls._from_config(_saved_hf_config(out))
    if kind == "pt2":
        return _load_pt2(out / "source.pt2").model
    if kind == "factory":
        return _load_factory(source["spec"]).model
    if kind == "pickle":
        path = Path(source["spec"])
        if not path.exists():
            raise ModelLoadError(f"{out}: the source {path} no longer exists; pass model= with the dense model")
        if _sha256(path) != source.get("sha256"):
            raise ModelLoadError(f"{out}: the source {path} changed since the conversion (sha256 differs)")
        return _load_pickle(path, trust_remote_code).model
    if kind == "module":
        module_name, _, qualname = source["class"].partition(":")
        try:
            cls: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            params = inspect.signature(cls).parameters.values()
            required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except Exception:
            required = ["?"]
        if not required:
            return cls()
        raise ModelLoadError(
            f"{out}: the model was converted from a {source['class']} object that moefx cannot rebuild; "
            "pass the dense model: moefx.load(out, model=MyModel(...))"
        )
    raise ModelLoadError(f"{out}: unknown source kind {kind!r} in recipe.json")


def rebuild_hf_without_weights(out: Path, source: dict[str, Any]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The dense model with meta parameters and meta buffers, and the real buffers by name (a rotary
    embedding's ``inv_freq``: not saved, computed by the model's constructor)."""
    cls = hf_model_class({"architectures": [source.get("architecture")]})
    dense = build_without_weights(cls, _saved_hf_config(out), real_buffers=True)
    buffers = {}
    for mod_name, module in dense.named_modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                buffers[f"{mod_name}.{key}" if mod_name else key] = buf
                module._buffers[key] = buf.to("meta")  # the sample pass runs on the meta device
    return dense, buffers


def resolve_dtype(hf_config: Any, entries: dict[str, TensorEntry]) -> torch.dtype:
    """The dtype ``from_pretrained`` gives the model: the config's, else the checkpoint's first float dtype."""
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for entry in entries.values():
        if entry.dtype.is_floating_point:
            return entry.dtype
    return torch.float32

