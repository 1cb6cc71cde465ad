"""The converted-model directory: ``save``, ``load`` and the recipe.

``save(model, out)`` writes ``out/`` atomically (a temporary directory renamed into place):
``model.safetensors`` (all weights), ``recipe.json`` (source, config, converted layers, versions),
``report.json`` + ``report.md``, the example inputs, and what the source needs to be rebuilt (``config.json``
for Hugging Face models, ``source.pt2`` for programs). ``load(out)`` rebuilds the dense model from the same
source (:func:`moefx.sources.rebuild_source`), converts it again with the recipe's config (without
initialising experts), and loads the weights: memory-mapped, for Hugging Face sources (built on the meta
device), from ``model.safetensors`` or from the shards and ``model.safetensors.index.json`` a streamed
conversion (:mod:`moefx.stream`) writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .capture import CapturedModule, set_mode
from .checkpoint import INDEX_NAME, SINGLE_NAME, check_safetensors, checkpoint_files, lazy_state_dict
from .config import MoEConfig
from .convert import convert
from .errors import ModelLoadError, MoefxError, first_line
from .files import atomic_output_dir, read_json_file
from .hf import is_hf_model
from .report import render_report_markdown
from .sources import class_path, rebuild_hf_without_weights, rebuild_source
from .version import __version__

__all__ = [
    "RECIPE_VERSION",
    "load",
    "read_example_inputs",
    "read_recipe",
    "save",
    "write_metadata_files",
]

RECIPE_VERSION = 1


def _info(model: nn.Module):
    info = getattr(model, "moefx_info", None)
    if info is None:
        raise MoefxError("the model was not converted by moefx.convert (it has no moefx_info); convert it first")
    return info


def _source_dict(model: nn.Module, info) -> dict[str, Any]:
    if info.source:
        return dict(info.source)
    if is_hf_model(model):
        return {"kind": "hf", "spec": None, "class": class_path(model), "architecture": type(model).__name__}
    return {"kind": "module", "spec": None, "class": class_path(model)}


def _write_inputs(inputs: tuple[tuple, dict] | None, tmp: Path) -> dict[str, Any] | None:
    if inputs is None:
        return None
    leaves, spec = pytree.tree_flatten(inputs)
    tensors, constants = {}, {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"leaf_{i}"] = leaf.detach().cpu().contiguous()
        elif isinstance(leaf, (type(None), bool, int, float, str)):
            constants[str(i)] = leaf
        else:
            return None  # not representable; load() then captures without inputs
    safetensors.torch.save_file(tensors, str(tmp / "example_inputs.safetensors"))
    return {"file": "example_inputs.safetensors", "treespec": pytree.treespec_dumps(spec), "constants": constants,
            "num_leaves": len(leaves)}


def read_example_inputs(out: Path, meta: dict[str, Any] | None) -> tuple[tuple, dict] | None:
    """The example inputs saved in ``out`` (``meta`` is the recipe's ``example_inputs`` entry)."""
    if not meta:
        return None
    path = out / meta["file"]
    check_safetensors(path, fix="convert the model again")
    tensors = safetensors.torch.load_file(str(path))
    leaves = []
    for i in range(meta["num_leaves"]):
        leaves.append(tensors[f"leaf_{i}"] if f"leaf_{i}" in tensors else meta["constants"].get(str(i)))
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(meta["treespec"]))


def save(model: nn.Module, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a converted model to the directory ``out`` (see the module docstring). Returns ``out``."""
    info = _info(model)
    out = Path(out)
    source = _source_dict(model, info)
    if source.get("extracted_task") is not None:
        raise MoefxError(
            "a model made by moefx.extract_task cannot be rebuilt from its recipe; save the full task model "
            "with moefx.save and extract again after loading, or export the extracted model with export_onnx"
        )
    with atomic_output_dir(out, force=force) as tmp, _own_storages(model):
        # Looked up at call time (not imported by name): a test stands in a full disk for it.
        safetensors.torch.save_model(model, str(tmp / SINGLE_NAME))
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
        dense, buffers = rebuild_hf_without_weights(out, recipe["source"])
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
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), first_line(exc))
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


def _materialize_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], out: Path) -> None:
    """Give the buffers that are not saved (still meta) their real values; sync recapture sources."""
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
            source = module.captured_from
            for sub_name, sub in source.named_modules():
                for store in (sub._parameters, sub._buffers):
                    for key, t in list(store.items()):
                        if t is None or not t.is_meta or getattr(t, "_moefx_ghost", False):
                            continue
                        with contextlib.suppress(AttributeError, KeyError):
                            store[key] = _get_tensor(module, f"{sub_name}.{key}" if sub_name else key)
            module.rebind()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{out}: {left[0]} could not be loaded lazily; load with lazy=False")

