"""Model sources and the converted-model directory: ``load_source``, ``save``, ``load``.

A MODEL given to the CLI is one of:

* a Hugging Face model directory (``config.json`` + safetensors weights),
* a ``torch.export`` program (``.pt2``),
* a ``package.module:factory`` callable returning a model or ``(model, example_inputs)``,
* a ``torch.save``-d ``nn.Module`` (``.pt``/``.pth``) — loading it runs code from the file, so it is refused
  unless the caller opts in with ``trust_remote_code`` (``--trust-remote-code``).

``save(model, out)`` writes ``out/`` atomically (a temporary directory renamed into place):
``model.safetensors`` (all weights), ``recipe.json`` (source, config, converted layers, versions),
``report.json`` + ``report.md``, the example inputs, and what the source needs to be rebuilt (``config.json``
for Hugging Face models, ``source.pt2`` for programs). ``load(out)`` rebuilds the dense model from the same
source, converts it again with the recipe's config (without initialising experts), and loads the weights:
memory-mapped, for Hugging Face sources (built on the meta device), from ``model.safetensors`` or from the
shards and ``model.safetensors.index.json`` a streamed conversion (:mod:`moefx.stream`) writes.
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
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .capture import quiet_torch_export
from .checkpoint import SINGLE_NAME, checkpoint_files, lazy_state_dict
from .config import MoEConfig
from .errors import ModelLoadError, MoefxError, OutputExistsError, UnsafeFileError

__all__ = [
    "RECIPE_VERSION",
    "ModelSource",
    "atomic_output_dir",
    "atomic_write_text",
    "check_safetensors",
    "load",
    "load_example_inputs",
    "load_source",
    "read_example_inputs",
    "read_json_file",
    "read_recipe",
    "rebuild_source",
    "save",
    "write_failure",
]

RECIPE_VERSION = 1
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
        return {"kind": self.kind, "spec": self.spec, "class": _class_path(self.model), **self.extra}


def _class_path(obj: Any) -> str:
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


def _load_hf_config(path: Path, *, parse: bool = True) -> tuple[dict[str, Any], Any]:
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
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover
        raise ModelLoadError("loading a Hugging Face directory needs transformers: pip install 'moefx[hf]'") from None
    if not parse:
        return config_dict, None
    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{config_file}: transformers could not read it: {_first_line(exc)}") from None
    return config_dict, hf_config


def _load_hf_dir(path: Path) -> ModelSource:
    config_dict, _ = _load_hf_config(path, parse=False)
    import transformers

    cls = _hf_class(config_dict)
    from .progress import progress_disabled

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
    text = _first_line(exc)
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


def _hf_class(config_dict: dict[str, Any]):
    import transformers

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
        raise ModelLoadError(f"{path}: not a valid torch.export program ({_first_line(exc)}); "
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
        raise ModelLoadError(f"{path}: could not be unpickled ({_first_line(exc)}); the model needs module "
                             f"{exc.name!r} importable here: install it, or, if it is your own code, run from the "
                             "directory that holds it or add that directory to PYTHONPATH") from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: could not be unpickled ({_first_line(exc)}); is it a complete torch.save "
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
        raise ModelLoadError(f"{spec}: cannot import {module_name} ({_first_line(exc)})") from None
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
        raise ModelLoadError(f"{spec}: the factory raised {type(exc).__name__}: {_first_line(exc)}") from None
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


def set_mode(module: nn.Module, training: bool) -> nn.Module:
    """``module.train(training)`` where the module can switch; a loaded ``torch.export`` program cannot (its
    train/eval mode is baked into its graph, and ``train``/``eval`` raise): it is left as it is."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
    return module


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Atomic output directories
# ---------------------------------------------------------------------------------------------------------


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if ``exc`` is the operating system refusing it (full disk, file-size limit,
    permissions), else None. safetensors reports such errors as ``SafetensorError("... I/O error: REASON (os
    error N)")``, not as OSError."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    match = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(exc).strip())
    if type(exc).__name__ == "SafetensorError" and match:
        return match.group(1)
    return None


def _write_failed(out: Path, reason: str) -> MoefxError:
    return MoefxError(f"{out}: writing failed ({reason}); nothing was changed (free some space or choose another "
                      "output path)")


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A new temporary directory beside ``out`` (on its file system, so that a rename publishes what is built
    there), removed on exit with whatever is still in it. A write the operating system refused inside the
    block (a full disk) becomes a :class:`MoefxError` naming ``out`` that says nothing was changed."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise MoefxError(f"{out}: cannot write to {parent} ({exc.strerror}); choose a writable output path") from None
    try:
        yield tmp
    except BaseException as exc:
        reason = write_failure(exc)
        if reason is not None:
            raise _write_failed(out, reason) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out`` in one rename.

    On any error the temporary directory is removed and an existing ``out`` is left untouched; a write the
    operating system refused (a full disk) becomes a :class:`MoefxError` that says so.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory; choose another output path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise MoefxError(f"{out}: the parent directory {parent} does not exist; create it first")
    with staging_dir(out) as tmp:
        yield tmp
        mask = _umask()
        for item in [tmp, *tmp.rglob("*")]:
            _default_mode(item, directory=item.is_dir(), mask=mask)
        _move_into_place(tmp, out)


def _umask() -> int:
    """The process umask (reading it means setting it: done once per output, not once per file)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path | str, *, directory: bool, mask: int | None = None) -> None:
    """Give a staged directory or file the permissions ``mkdir``/``open`` would have (``mask``, default the
    process umask, applied): ``mkdtemp`` and ``mkstemp`` (and safetensors' writer) make them private to the
    user."""
    mask = _umask() if mask is None else mask
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``, replacing an existing ``out`` (moved aside first)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent if str(out.parent) else "."))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)  # put the existing output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def atomic_write_text(path: str | os.PathLike, text: str, *, what: str = "the file") -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a failed write (a full disk, an
    unwritable directory) leaves no partial file and an existing ``path`` untouched."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MoefxError(f"{path}: the directory {parent} for {what} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=parent)
    except OSError as exc:
        raise MoefxError(f"{path}: cannot write {what} to {parent} ({exc.strerror}); choose a writable output "
                         "path") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _default_mode(tmp, directory=False)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_failed(path, exc.strerror or str(exc)) from None


def check_safetensors(path: Path, error: type[MoefxError] = ModelLoadError, fix: str = "") -> None:
    """Raise ``error`` naming ``path`` if it is missing or not a complete safetensors file (header and data)."""
    if not path.is_file():
        raise error(f"{path}: missing" + (f"; {fix}" if fix else ""))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:
        raise error(f"{path}: truncated or corrupt ({_first_line(exc)})" + (f"; {fix}" if fix else "")) from None


# ---------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------


def _info(model: nn.Module):
    info = getattr(model, "moefx_info", None)
    if info is None:
        raise MoefxError("the model was not converted by moefx.convert (it has no moefx_info); convert it first")
    return info


def _source_dict(model: nn.Module, info) -> dict[str, Any]:
    if info.source:
        return dict(info.source)
    from .hf import is_hf_model

    if is_hf_model(model):
        return {"kind": "hf", "spec": None, "class": _class_path(model), "architecture": type(model).__name__}
    return {"kind": "module", "spec": None, "class": _class_path(model)}


def _write_inputs(inputs: tuple[tuple, dict] | None, tmp: Path) -> dict[str, Any] | None:
    if inputs is None:
        return None
    from safetensors.torch import save_file

    leaves, spec = pytree.tree_flatten(inputs)
    tensors, constants = {}, {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"leaf_{i}"] = leaf.detach().cpu().contiguous()
        elif isinstance(leaf, (type(None), bool, int, float, str)):
            constants[str(i)] = leaf
        else:
            return None  # not representable; load() then captures without inputs
    save_file(tensors, str(tmp / "example_inputs.safetensors"))
    return {"file": "example_inputs.safetensors", "treespec": pytree.treespec_dumps(spec), "constants": constants,
            "num_leaves": len(leaves)}


def load_example_inputs(path: str | os.PathLike) -> tuple[tuple, dict]:
    """Example inputs from a file, as ``(args, kwargs)``: a ``.pt`` file (read with ``weights_only``) holding a
    tensor (one positional input), a tuple or list (positional inputs) or a dict with string keys (keyword
    inputs); or a ``.safetensors`` file, whose tensors are keyword inputs by name."""
    path = Path(path)
    if not path.is_file():
        raise MoefxError(f"{path}: no such inputs file; pass a .pt or .safetensors file of example inputs")
    fix = ("save a tensor, a tuple of inputs or a dict of named inputs with torch.save (.pt), or named tensors "
           "with safetensors")
    if path.suffix == ".safetensors":
        check_safetensors(path, MoefxError, fix)
        from safetensors.torch import load_file

        return (), dict(load_file(str(path)))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise MoefxError(f"{path}: not readable as example inputs (not a torch.save file, or it holds more than "
                         f"tensors and plain values); {fix}") from None
    if isinstance(data, torch.Tensor):
        return (data,), {}
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    if isinstance(data, dict) and all(isinstance(k, str) for k in data):
        return (), dict(data)
    raise MoefxError(f"{path}: holds a {type(data).__name__}, not example inputs; {fix}")


def read_example_inputs(out: Path, meta: dict[str, Any] | None) -> tuple[tuple, dict] | None:
    """The example inputs saved in ``out`` (``meta`` is the recipe's ``example_inputs`` entry)."""
    if not meta:
        return None
    from safetensors.torch import load_file

    path = out / meta["file"]
    check_safetensors(path, fix="convert the model again")
    tensors = load_file(str(path))
    leaves = []
    for i in range(meta["num_leaves"]):
        leaves.append(tensors[f"leaf_{i}"] if f"leaf_{i}" in tensors else meta["constants"].get(str(i)))
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(meta["treespec"]))


def save(model: nn.Module, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a converted model to the directory ``out`` (see the module docstring). Returns ``out``."""
    from safetensors.torch import save_model

    info = _info(model)
    out = Path(out)
    source = _source_dict(model, info)
    if source.get("extracted_task") is not None:
        raise MoefxError(
            "a model made by moefx.extract_task cannot be rebuilt from its recipe; save the full task model "
            "with moefx.save and extract again after loading, or export the extracted model with export_onnx"
        )
    with atomic_output_dir(out, force=force) as tmp, _own_storages(model):
        save_model(model, str(tmp / SINGLE_NAME))
        write_metadata_files(model, info, source, tmp, [SINGLE_NAME])
    return out


@contextlib.contextmanager
def _own_storages(model: nn.Module):
    """Give tensors that are views into a larger storage (a lazily loaded, memory-mapped checkpoint) their own
    copy while inside, ties kept: safetensors decides which names of a shared storage to keep by which one
    covers it, and a view into a whole mapped file covers nothing."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is None or t.untyped_storage().nbytes() == t.numel() * t.element_size():
                    continue
                if id(t) not in copies:
                    data = t.detach().clone()
                    copies[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                swapped.append((table, key, t))
                table[key] = copies[id(t)]
    try:
        yield
    finally:
        for table, key, t in swapped:
            table[key] = t


def write_metadata_files(model: nn.Module, info, source: dict[str, Any], tmp: Path, weight_files: list[str]) -> None:
    """Everything of an output directory but the weights: recipe.json, the report, the example inputs and
    what the source needs to be rebuilt. ``weight_files`` are the weight files already in ``tmp``."""
    from . import __version__
    from .report import render_report_markdown

    extra_files = []
    if source["kind"] == "hf":
        model.config.to_json_file(str(tmp / "config.json"))
        extra_files.append("config.json")
    if source["kind"] == "pt2" and source.get("spec"):
        shutil.copyfile(source["spec"], tmp / "source.pt2")
        extra_files.append("source.pt2")
    recipe = {
        "format": "moefx-recipe",
        "version": RECIPE_VERSION,
        "moefx": __version__,
        "torch": torch.__version__.split("+")[0],
        "source": source,
        "config": info.config.to_dict(),
        "layers": [{k: d[k] for k in ("name", "moe", "rule", "activation", "gated", "in_features",
                                        "hidden_features", "out_features", "experts", "expert_size", "capture")}
                   for d in info.layers],
        "example_inputs": _write_inputs(info.inputs, tmp),
        "files": [*weight_files, *extra_files],
    }
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    report = info.report()
    (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (tmp / "report.md").write_text(render_report_markdown(report))


def read_json_file(path: Path, error: type[MoefxError], missing: str, fix: str = "") -> Any:
    """Parse the JSON file ``path``; a missing or malformed file raises ``error`` (``missing``, or the parse
    error followed by ``fix``)."""
    if not path.exists():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: is not valid JSON ({exc})" + (f"; {fix}" if fix else "")) from None


def read_recipe(out: str | os.PathLike) -> dict[str, Any]:
    out = Path(out)
    if not out.exists():
        raise ModelLoadError(f"{out}: no such file or directory; pass the output directory of moefx convert")
    path = out / "recipe.json"
    recipe = read_json_file(path, ModelLoadError,
                            f"{out}: not a moefx output directory (no recipe.json); create one with moefx convert")
    if recipe.get("format") != "moefx-recipe" or recipe.get("version") != RECIPE_VERSION:
        raise ModelLoadError(f"{path}: not a moefx recipe of version {RECIPE_VERSION}")
    return recipe


def load(out: str | os.PathLike, *, model: nn.Module | None = None, trust_remote_code: bool = False,
         lazy: bool = True) -> nn.Module:
    """Rebuild a converted model saved with :func:`save` or a streamed conversion.

    The weights are one ``model.safetensors`` or Hugging Face shards with ``model.safetensors.index.json``.
    With ``lazy`` (the default) a model converted from a Hugging Face directory is built without weights
    (parameters on the meta device) and its tensors are memory-mapped from the files: loading reads almost
    nothing, and pages are read when a weight is first used. Other sources, and ``model=``, copy the weights
    into the rebuilt model.

    Args:
        out: the directory ``save`` wrote.
        model: the dense model to convert again, for models given to ``convert`` as plain ``nn.Module``
            objects that moefx cannot rebuild itself; its weights are replaced by the saved ones.
        trust_remote_code: allow rebuilding from a pickled ``.pt`` source.
        lazy: memory-map the weights where the source allows it (see above).
    """
    from .convert import convert

    out = Path(out)
    recipe = read_recipe(out)
    has_index = (out / "model.safetensors.index.json").exists()
    for weights in checkpoint_files(out) if has_index else [out / SINGLE_NAME]:  # before the (slow) rebuild
        check_safetensors(weights, fix="convert the model again")
    config = MoEConfig.from_dict(recipe["config"])
    inputs = read_example_inputs(out, recipe.get("example_inputs"))
    state, _ = lazy_state_dict(out)
    lazy = lazy and model is None and recipe["source"].get("kind") == "hf"
    buffers: dict[str, torch.Tensor] = {}
    if lazy:
        dense, buffers = _rebuild_hf_without_weights(out, recipe["source"])
        run_inputs = pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, inputs)
    else:
        dense = model if model is not None else rebuild_source(out, recipe["source"], trust_remote_code)
        run_inputs = inputs
    converted = convert(dense, config, *(() if run_inputs is None else (run_inputs[0],)),
                        example_kwargs=None if run_inputs is None else run_inputs[1],
                        inplace=True, verify=False, initialize=False)
    converted.moefx_info.inputs = inputs
    got = [d["moe"] for d in converted.moefx_info.layers]
    want = [d["moe"] for d in recipe["layers"]]
    if got != want:
        raise ModelLoadError(
            f"{out}: the rebuilt model's MoE layers ({len(got)}) differ from the recipe's ({len(want)}); "
            "was the source model changed since the conversion?"
        )
    _load_weights(converted, state, out, assign=lazy)
    if lazy:
        _materialize_buffers(converted, buffers, out)
    converted.moefx_info.source = dict(recipe["source"])
    set_mode(converted, False)
    return converted


def _weights_name(out: Path) -> str:
    from .checkpoint import INDEX_NAME

    return f"{out}/{INDEX_NAME if (out / INDEX_NAME).exists() else SINGLE_NAME}"


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], out: Path, *, assign: bool) -> None:
    """Load ``state`` into ``model``; names saved once for a shared (tied) tensor fill all of its names.

    ``assign``: the model's tensors become the given (memory-mapped) ones; else they are copied in.
    """
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)
    to_load: dict[str, torch.Tensor] = {}
    missing = []
    for names in groups.values():
        present = [n for n in names if n in state]
        if not present:
            missing.extend(names)
            continue
        for n in names:
            to_load[n] = state[present[0]]
    unexpected = [k for k in state if k not in expected]
    where = _weights_name(out)
    if missing or unexpected:
        raise ModelLoadError(f"{where} does not fit the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(to_load, strict=True, assign=assign)
    except Exception as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), _first_line(exc))
        raise ModelLoadError(f"{where} does not fit the rebuilt model ({detail}); "
                             "was it converted from another model?") from None
    if assign:  # one Parameter object per shared group again (assignment gave each name its own)
        for names in groups.values():
            if len(names) > 1:
                first = _get_tensor(model, names[0])
                for n in names[1:]:
                    _set_tensor(model, n, first)


def _get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner)
    (module._parameters if leaf in module._parameters else module._buffers)[leaf] = value


def _rebuild_hf_without_weights(out: Path, source: dict[str, Any]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The dense model with meta parameters and meta buffers, and the real buffers by name (a rotary
    embedding's ``inv_freq``: not saved, computed by the model's constructor)."""
    from transformers import AutoConfig

    from .hf import build_without_weights

    try:
        config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{out / 'config.json'}: transformers could not read it ({_first_line(exc)}); "
                             "restore it from the source model or convert the model again") from None
    cls = _hf_class({"architectures": [source.get("architecture")]})
    dense = build_without_weights(cls, config, real_buffers=True)
    buffers = {}
    for mod_name, module in dense.named_modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                buffers[f"{mod_name}.{key}" if mod_name else key] = buf
                module._buffers[key] = buf.to("meta")  # the sample pass runs on the meta device
    return dense, buffers


def _materialize_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], out: Path) -> None:
    """Give the buffers that are not saved (still meta) their real values; sync recapture sources."""
    from .capture import CapturedModule

    for mod_name, module in model.named_modules(remove_duplicate=False):
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                full = f"{mod_name}.{key}" if mod_name else key
                if full not in buffers:
                    raise ModelLoadError(f"{out}: buffer {full} is neither saved nor rebuilt; load with lazy=False")
                module._buffers[key] = buffers[full]
    for module in model.modules():
        if isinstance(module, CapturedModule):
            # The original module a CapturedModule recaptures from shares its children's objects only until a
            # child was copied; give it the loaded tensors by name.
            source = module._source
            for sub_name, sub in source.named_modules():
                for store in (sub._parameters, sub._buffers):
                    for key, t in list(store.items()):
                        if t is None or not t.is_meta or getattr(t, "_moefx_ghost", False):
                            continue
                        with contextlib.suppress(AttributeError, KeyError):
                            store[key] = _get_tensor(module, f"{sub_name}.{key}" if sub_name else key)
            module._bound.clear()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{out}: {left[0]} could not be loaded lazily; load with lazy=False")


def rebuild_source(out: Path, source: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    """The dense model a recipe's ``source`` describes (weights as built, not the saved ones)."""
    kind = source.get("kind")
    if kind == "hf":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(out), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{out / 'config.json'}: transformers could not read it ({_first_line(exc)}); "
                                 "restore it from the source model or convert the model again") from None
        cls = _hf_class({"architectures": [source.get("architecture")]})
        return cls._from_config(config)
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
