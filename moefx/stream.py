"""Streaming conversion: convert a safetensors checkpoint that is larger than memory, one layer at a time.

The dense-to-MoE rewrite is local to each FFN, so a conversion need not hold the model:

1. **Plan on the meta device** (:func:`plan_stream`). The model is built from ``config.json`` with every
   tensor on the meta device, captured and converted there (``moefx.convert(..., initialize=False)``: the
   sample pass, ``symbolic_trace``/``torch.export`` and the FFN rules all run on meta tensors; activations
   are named by evaluating the captured subgraph on small real probe values, which needs no weight). The
   checkpoint's headers give every source tensor's place; no weight is read. The plan says, for every
   tensor of the converted model's state dict, whether it is copied from a source tensor or made by an MoE
   layer, and which output shard it goes to.
2. **Stream** (:func:`run_stream`). Output shards are written one at a time, each tensor in the order the
   file holds it. A copied tensor is read with ``pread`` and written back (cast to the model's dtype where
   the checkpoint differs), never through a module. An MoE layer is built when its first tensor is due:
   the FFN's dense tensors are read, an :class:`~moefx.passes.ffn_rules.FFNMatch` is made of them and
   :func:`moefx.experts.build_moe_layer` builds the layer exactly as ``moefx.convert`` does (any
   ``MoEConfig.init``, the same seeds), so the output is byte for byte ``moefx.convert`` + ``moefx.save``.
   Its tensors are dropped as soon as they are written.
3. **Resume.** Work happens in ``.<out>.partial/`` next to ``out``. A shard is written to ``<name>.tmp``
   and renamed when complete; its sha256 goes to ``stream-state.json`` (written atomically). A rerun with
   the same source and config keeps finished shards whose checksum verifies and redoes the rest; the
   directory is renamed to ``out`` only when everything, recipe included, is written.

Hugging Face model directories (``config.json`` + ``model.safetensors`` or shards with an index) are
supported; the output directory is what :func:`moefx.save` writes (shards + index when larger than one shard)
and loads with :func:`moefx.load`, lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import find_ffns, non_finite_weights
from .calibrate import LayerSample, TokenSampler, calibration_batches, find_tokenizer, real_tokens
from .checkpoint import (
    INDEX_NAME,
    ShardWriter,
    TensorEntry,
    hf_key_resolver,
    read_checkpoint_entries,
    read_tensor,
    sha256_file,
    shard_names,
    write_index,
)
from .config import CALIB_TOKENS, MoEConfig
from .convert import convert
from .errors import CalibrationError, ConfigError, ModelLoadError, MoefxError, OutputExistsError
from .experts import build_moe_layer, layer_generator
from .files import move_into_place
from .heal import check_rows, heal_layer
from .hf import build_without_weights, dummy_inputs
from .layerwise import LayerwiseRunner
from .progress import progress
from .saving import write_metadata_files
from .sources import hf_model_class, load_hf_config, resolve_dtype
from .split import check_partition, partition_used, split_sizes
from .version import __version__

__all__ = ["DEFAULT_SHARD_SIZE", "StreamPlan", "StreamResult", "parse_size", "plan_stream", "run_stream",
           "stream_convert"]

log = logging.getLogger("moefx")

#: Hugging Face's usual shard size.
DEFAULT_SHARD_SIZE = 5 * 1000**3
_STATE = "stream-state.json"
_MATCH_FIELDS = ("up_weight", "up_bias", "gate_up_weight", "gate_up_bias", "down_weight", "down_bias")


class StreamError(MoefxError):
    """The model cannot be converted by streaming (the message says why and what to do instead)."""


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    s = text.strip().upper()
    number = s.rstrip("KMGTIB")
    try:
        value = float(number) * units[s[len(number):]]
    except (ValueError, KeyError):
        raise MoefxError(f"shard size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise MoefxError(f"shard size {text!r} must be positive")
    return int(value)


# ---------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _View:
    """How a match tensor is read: a source tensor, optionally as a strided view (Conv1D's transpose, the
    halves of a fused gate/up projection)."""

    key: str
    dtype: torch.dtype  # the dense model's dtype for this tensor
    shape: tuple[int, ...]  # the dense parameter's shape
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None  # (size, stride, storage offset)


@dataclass
class LayerPlan:
    """One FFN that becomes an MoE layer: where its dense tensors are and what the layer writes."""

    ffn: Any  # moefx.analysis.FoundFFN, with meta tensors in its match
    index: int  # the layer index moefx.convert gives build_moe_layer (seeds)
    prefix: str  # the MoE layer's qualified name in the converted model
    fields: dict[str, _View | None]
    outputs: list[str] = field(default_factory=list)


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str | None = None  # a checkpoint key to copy, or
    layer: str | None = None  # the prefix of the MoE layer that makes it

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class StreamPlan:
    """Everything a streamed conversion does, decided before any weight is read."""

    source_dir: Path
    config: MoEConfig
    model: nn.Module  # the converted model on the meta device (with ``moefx_info``)
    entries: dict[str, TensorEntry]  # the source checkpoint's tensors
    tensors: dict[str, OutputTensor]  # output tensors in state-dict order (shared names dropped)
    layers: dict[str, LayerPlan]
    shards: list[list[str]]  # output tensor names per shard (state-dict order)
    shard_files: list[str]
    metadata: dict[str, str] | None  # shared (tied) names dropped -> the name kept, as save_model records
    fingerprint: str

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shard_of(self, name: str) -> int:
        return self._shard_index[name]

    def __post_init__(self) -> None:
        self._shard_index = {name: i for i, names in enumerate(self.shards) for name in names}


def plan_stream(source_dir: str | os.PathLike, config: MoEConfig | None = None, *,
                max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> StreamPlan:
    """Plan the streamed conversion of the Hugging Face model directory ``source_dir`` without reading a
    weight (see the module docstring). Raises :class:`~moefx.errors.MoefxError` for bad input."""
    config = config or MoEConfig()
    max_shard_size = parse_size(max_shard_size)
    directory = Path(source_dir)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: streaming converts a Hugging Face model directory (config.json + "
                             "safetensors weights); no such directory")
    config_dict, hf_config = load_hf_config(directory)
    entries, files = read_checkpoint_entries(directory)
    cls = hf_model_class(config_dict)
    import transformers  # optional: needs moefx[hf]; load_hf_config checked it is installed

    dtype = resolve_dtype(hf_config, entries)
    try:
        dense = build_without_weights(cls, hf_config, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"{directory}: transformers could not build {cls.__name__} from config.json on the "
                             f"meta device ({type(exc).__name__}: {exc}); convert without --stream") from None
    cpu_inputs = dummy_inputs(dense, device="cpu")
    meta_inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in cpu_inputs.items()}

    # Dense names of every parameter and buffer object (tied weights are one object with several names).
    names_of: dict[int, list[str]] = {}
    for name, t in [*dense.named_parameters(remove_duplicate=False), *dense.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(t), []).append(name)
    objects = {id(t): t for t in [*dense.parameters(), *dense.buffers()]}
    resolve = hf_key_resolver(dense, entries)

    def checkpoint_key(t: torch.Tensor) -> str | None:
        return next((key for name in names_of.get(id(t), []) if (key := resolve(name)) is not None), None)

    analysis = find_ffns(dense, ((), meta_inputs), config)
    index_of = {f.name: i for i, f in enumerate(analysis.ffns)}
    layer_fields: dict[str, dict[str, _View | None]] = {}
    for ffn in analysis.ffns:
        if not ffn.selected:
            continue
        fields: dict[str, _View | None] = {}
        for fname in _MATCH_FIELDS:
            t = getattr(ffn.match, fname)
            if t is None:
                fields[fname] = None
                continue
            base = t if id(t) in objects else t._base
            key = checkpoint_key(base) if base is not None and id(base) in objects else None
            if key is None:
                raise StreamError(f"{ffn.name or '(root)'}: its {fname.replace('_', ' ')} is not a parameter stored "
                                  "in the checkpoint, so it cannot be streamed; convert without --stream")
            view = None if t is base else (tuple(t.size()), tuple(t.stride()), t.storage_offset())
            fields[fname] = _View(key, base.dtype, tuple(base.shape), view)
        layer_fields[ffn.name] = fields

    source = {"kind": "hf", "spec": str(directory.resolve()), "class": f"{cls.__module__}:{cls.__qualname__}",
              "architecture": cls.__name__, "transformers": transformers.__version__}
    model = convert(dense, config, example_kwargs=meta_inputs, inplace=True, verify=False, initialize=False,
                    source=source)
    info = model.moefx_info
    info.inputs = ((), cpu_inputs)

    layers: dict[str, LayerPlan] = {}
    for d in info.layers:
        ffn = next(f for f in analysis.ffns if f.name == d["name"])
        layers[d["moe"]] = LayerPlan(ffn, index_of[ffn.name], d["moe"], layer_fields[ffn.name])

    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    # As safetensors.torch.save_model: one name per shared tensor, the others recorded in the metadata.
    metadata: dict[str, str] = {}
    dropped: set[str] = set()
    for names in sorted(sorted(g) for g in groups.values() if len(g) > 1):
        for other in names[1:]:
            metadata[other] = names[0]
            dropped.add(other)
    tensors: dict[str, OutputTensor] = {}
    for name, t in state.items():
        if name in dropped:
            continue
        out = OutputTensor(name, t.dtype, tuple(t.shape))
        layer = next((p for p in layers if name.startswith(p + ".")), None)
        if layer is not None:
            out.layer = layer
            layers[layer].outputs.append(name)
        else:
            key = checkpoint_key(t)
            if key is None:
                raise StreamError(f"{directory}: the checkpoint has no tensor for {name}, which the model built "
                                  "from config.json has; is the checkpoint complete? (or convert without --stream)")
            entry = entries[key]
            if entry.shape != out.shape:
                raise ModelLoadError(f"{entry.file}: {key} has shape {list(entry.shape)}, but the model built from "
                                     f"config.json expects {list(out.shape)}; config.json and the weights disagree")
            out.source = key
        tensors[name] = out

    # Shards: in state-dict order, an MoE layer's tensors together, a new shard when the next unit overflows.
    units: list[list[str]] = []
    seen_layers: set[str] = set()
    for name, t in tensors.items():
        if t.layer is None:
            units.append([name])
        elif t.layer not in seen_layers:
            seen_layers.add(t.layer)
            units.append(list(layers[t.layer].outputs))
    shards: list[list[str]] = []
    size = 0
    for unit in units:
        unit_size = sum(tensors[n].nbytes for n in unit)
        if not shards or (size + unit_size > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_size
    shard_files = shard_names(len(shards))

    fingerprint = hashlib.sha256(json.dumps({
        "moefx": __version__,
        "torch": torch.__version__,
        "config": config.to_dict(),
        "source": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "shards": [[(n, str(tensors[n].dtype), tensors[n].shape) for n in names] for names in shards],
    }, sort_keys=True, default=str).encode()).hexdigest()
    return StreamPlan(directory, config, model, entries, tensors, layers, shards, shard_files, metadata or None,
                      fingerprint)


# ---------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    out: Path
    seconds: float
    bytes_read: int
    bytes_written: int
    shards_written: int
    shards_kept: int  # finished shards of an earlier, interrupted run that verified and were kept


class _Reader:
    """Reads source tensors with pread, keeping one descriptor per file; counts bytes."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def read(self, entry: TensorEntry) -> torch.Tensor:
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        self.bytes_read += entry.nbytes
        return read_tensor(entry, fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Producer:
    """Makes output tensors on demand: copies, or an MoE layer's tensors (built once, dropped once written)."""

    def __init__(self, plan: StreamPlan, reader: _Reader, calibration: dict[str, LayerSample] | None = None) -> None:
        self.plan = plan
        self.reader = reader
        self.calibration = calibration or {}
        self._moe_names = {d["name"]: d["moe"] for d in plan.model.moefx_info.layers}
        self.cache: dict[str, torch.Tensor] = {}
        self.warnings: list[str] = []
        self.heal: tuple[int, dict[str, LayerSample], bool] | None = None  # steps, inputs, refit the router
        self.healing: dict[str, dict[str, Any]] = {}  # by dense FFN name: the per-layer healing report

    def __call__(self, name: str) -> torch.Tensor:
        out = self.plan.tensors[name]
        if out.layer is None:
            t = self.reader.read(self.plan.entries[out.source])
            return t.to(out.dtype) if t.dtype != out.dtype else t
        if name not in self.cache:
            self._build(self.plan.layers[out.layer])
        return self.cache.pop(name)

    def _dense(self, view: _View | None) -> torch.Tensor | None:
        if view is None:
            return None
        t = self.reader.read(self.plan.entries[view.key])
        if tuple(t.shape) != view.shape:
            raise ModelLoadError(f"{self.plan.source_dir}: {view.key} has shape {list(t.shape)}, the model built "
                                 f"from config.json expects {list(view.shape)}; config.json and the weights disagree")
        t = t.to(view.dtype) if t.dtype != view.dtype else t
        if view.view is not None:
            size, stride, offset = view.view
            t = torch.as_strided(t, size, stride, offset)
        return t

    def _build(self, layer: LayerPlan) -> None:
        # One read per stored tensor, even when two fields view it (the halves of a fused gate/up projection).
        loaded: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor | None] = {}
        for fname, view in layer.fields.items():
            if view is None:
                values[fname] = None
                continue
            if view.key not in loaded:
                loaded[view.key] = self._dense(dataclasses.replace(view, view=None))
            t = loaded[view.key]
            if view.view is not None:
                size, stride, offset = view.view
                t = torch.as_strided(t, size, stride, offset)
            values[fname] = t
        match = dataclasses.replace(layer.ffn.match, **values)
        # A float32 sum is finite when every value is (barring overflow): a cheap screen before the full check.
        if not all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in loaded.values()):
            self.warnings.extend(non_finite_weights([dataclasses.replace(layer.ffn, match=match)]))
        sample = self.calibration.get(layer.ffn.name)
        moe = build_moe_layer(match, self.plan.config, layer.index, layer.ffn.name,
                              calib_inputs=None if sample is None else sample.inputs)
        if self.heal is not None:
            steps, inputs, refit_router = self.heal
            entry = heal_layer(moe, match, inputs[layer.ffn.name].inputs, steps, refit_router)
            self.healing[layer.ffn.name] = {"layer": self._moe_names[layer.ffn.name], **entry}
        written = set(self.plan.tensors)
        for key, value in moe.state_dict().items():
            name = f"{layer.prefix}.{key}"
            if name in written:
                self.cache[name] = value.detach()


def _partial_dir(out: Path) -> Path:
    parent = out.parent if str(out.parent) else Path(".")
    return parent / f".{out.name}.partial"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _prepare_work_dir(plan: StreamPlan, work: Path) -> dict[str, Any]:
    """The resume state in ``work``: finished shards whose checksum verifies; a fresh state otherwise."""
    state_path = work / _STATE
    if work.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            state = None
        if state is not None and state.get("fingerprint") == plan.fingerprint:
            for tmp in work.glob("*.tmp"):
                tmp.unlink()
            kept = {}
            for name, digest in state.get("done", {}).items():
                path = work / name
                if path.exists() and sha256_file(path) == digest:
                    kept[name] = digest
                else:
                    log.warning("moefx: %s of the interrupted conversion is damaged; writing it again", name)
                    path.unlink(missing_ok=True)
            state["done"] = kept
            if kept:
                log.info("moefx: resuming an interrupted conversion: %d of %d shards already done",
                         len(kept), len(plan.shard_files))
            _write_json_atomic(state_path, state)
            return state
        log.warning("moefx: %s holds an interrupted conversion of another model or config; starting over", work)
        shutil.rmtree(work)
    work.mkdir()
    state = {"fingerprint": plan.fingerprint, "done": {}, "warnings": []}
    _write_json_atomic(state_path, state)
    return state


def calibrate_stream(plan: StreamPlan, calib: Any, *, calib_tokens: int = CALIB_TOKENS,
                     tokenizer: Any = None, for_healing: bool = False) -> dict[str, LayerSample]:
    """Calibration statistics for ``plan``'s FFNs in bounded memory: the calibration batches go through the
    model one decoder layer at a time (:class:`~moefx.layerwise.LayerwiseRunner`), and each FFN keeps the same
    seeded sample of its inputs ``moefx.convert(..., calib=...)`` keeps, so the streamed conversion equals the
    in-memory one. ``for_healing``: the sample healing takes for a layer that is not a calibrated split (split
    layers heal on the sample they were built from)."""
    runner = LayerwiseRunner(plan.source_dir)
    if tokenizer is None:
        tokenizer = find_tokenizer(plan.source_dir)
    example = ((), {"input_ids": torch.zeros(1, 1, dtype=torch.long)})
    feeds, masks = [], []
    for args, kwargs, mask in calibration_batches(calib, runner.model, example, tokenizer=tokenizer):
        feeds.append({"input_ids": args[0], **kwargs} if args else kwargs)
        masks.append(mask)
    if not feeds:
        raise CalibrationError("the calibration data holds no batches; give at least one example")
    stream = 4 if for_healing else 3  # the generator streams of moefx.heal.heal_layers and of split
    samplers = {layer.ffn.name: TokenSampler(calib_tokens, layer_generator(plan.config, layer.index, stream=stream))
                for layer in plan.layers.values()}

    def on_ffn(a) -> None:
        sampler = samplers.get(a.name)
        if sampler is not None:
            mask = masks[a.batch]
            sampler.add(real_tokens(a.inputs, mask), real_tokens(a.hidden, mask))

    runner.run(feeds, on_ffn)
    return {name: sampler.sample for name, sampler in samplers.items()}


def run_stream(plan: StreamPlan, out: str | os.PathLike, *, force: bool = False,
               crash_after_shards: int | None = None, calibration: dict[str, LayerSample] | None = None,
               heal_steps: int | None = None, heal_inputs: dict[str, LayerSample] | None = None) -> StreamResult:
    """Carry out ``plan``, writing the converted model to the directory ``out`` (see the module docstring).

    ``calibration``: the FFNs' calibration samples (:func:`calibrate_stream`), for ``init='split'``.
    ``heal_steps``: heal each MoE layer right after it is built, as ``moefx.convert(..., heal=True)`` does
    (:mod:`moefx.heal`), on ``heal_inputs`` (``calibrate_stream(..., for_healing=True)``; a calibrated split
    heals on ``calibration``), one layer in memory at a time.
    ``crash_after_shards`` raises ``KeyboardInterrupt`` after that many shards were written in this run
    (for tests of resume; a real interruption is the same).
    """
    start = time.perf_counter()
    calibrated_split = calibration is not None and plan.config.init == "split"
    check_partition(plan.config, calibrated=calibration is not None)
    if heal_steps is not None:
        if heal_steps < 0:
            raise ConfigError(f"heal steps must be >= 0, got {heal_steps}")
        heal_inputs = calibration if calibrated_split else heal_inputs
        if heal_inputs is None:
            raise ConfigError("healing fits the MoE layers to the dense FFNs on calibration data; pass heal_inputs= "
                              "(--calib FILE)")
        for name, sample in heal_inputs.items():
            check_rows(name, sample.inputs)
    samples = dict(calibration or {})
    if heal_steps is not None and heal_inputs is not calibration:  # (a calibrated split heals on its calibration)
        samples.update({f"heal:{k}": v for k, v in heal_inputs.items()})
    if samples or heal_steps is not None:
        digest = hashlib.sha256(plan.fingerprint.encode())
        digest.update(f"heal_steps={heal_steps}".encode())
        for name in sorted(samples):
            digest.update(name.encode() + samples[name].inputs.numpy().tobytes())
        plan = dataclasses.replace(plan, fingerprint=digest.hexdigest())  # other data: start over
    _record_split_layers(plan, calibration)
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force (force=True) to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MoefxError(f"{out}: cannot write to {parent} (not a writable directory); choose a writable output path")
    work = _partial_dir(out)
    state = _prepare_work_dir(plan, work)
    reader = _Reader()
    producer = _Producer(plan, reader, calibration)
    if heal_steps is not None:
        producer.heal = (heal_steps, heal_inputs, not calibrated_split)
    done = state["done"]
    todo = [i for i, f in enumerate(plan.shard_files) if f not in done]
    total = sum(plan.tensors[n].nbytes for i in todo for n in plan.shards[i])
    written = shards_written = 0
    try:
        with progress(total=total, desc="streaming", unit="B", unit_scale=True) as bar:
            for i in todo:
                file = plan.shard_files[i]
                names = plan.shards[i]
                metadata = {k: v for k, v in (plan.metadata or {}).items() if v in names} or None
                writer = ShardWriter(work / file, {n: (plan.tensors[n].dtype, plan.tensors[n].shape) for n in names},
                                     metadata)
                try:
                    for name in list(writer.order):
                        bar.set_postfix_str(f"{file} {name}", refresh=False)
                        tensor = producer(name)
                        writer.write(name, tensor)
                        bar.update(plan.tensors[name].nbytes)
                        del tensor
                    digest = writer.commit()
                except BaseException:
                    writer.abort()
                    raise
                written += writer.bytes_written
                shards_written += 1
                done[file] = digest
                state["warnings"] = list(dict.fromkeys([*state.get("warnings", []), *producer.warnings]))
                state["healing"] = {**state.get("healing", {}), **producer.healing}
                _write_json_atomic(work / _STATE, state)
                if crash_after_shards is not None and shards_written >= crash_after_shards:
                    raise KeyboardInterrupt(f"simulated crash after {shards_written} shards")
    except MoefxError:
        # Bad input (a config the experts cannot be built with, a damaged checkpoint): the shards would not
        # be reused with a corrected input, so leave nothing behind.
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        reader.close()
    for warning in producer.warnings:
        log.warning("moefx: warning: %s", warning)
    weight_files = list(plan.shard_files)
    if len(plan.shard_files) > 1:
        weight_map = {n: plan.shard_files[i] for i, names in enumerate(plan.shards) for n in names}
        write_index(work / INDEX_NAME, weight_map, plan.total_bytes)
        weight_files.append(INDEX_NAME)
    info = plan.model.moefx_info
    info.warnings = list(dict.fromkeys([*info.warnings, *state.get("warnings", [])]))
    if heal_steps is not None:
        healing = state.get("healing", {})
        info.healing = [healing[d["name"]] for d in info.layers if d["name"] in healing]
    info.seconds = time.perf_counter() - start
    (work / _STATE).unlink()
    write_metadata_files(plan.model, info, info.source, work, weight_files)
    move_into_place(work, out)
    return StreamResult(out, time.perf_counter() - start, reader.bytes_read, written, shards_written,
                        len(plan.shard_files) - len(todo))


def _record_split_layers(plan: StreamPlan, calibration: dict[str, LayerSample] | None) -> None:
    """The recipe's per-layer split fields, as ``moefx.convert`` records them (known without building)."""
    config = plan.config
    if config.init != "split":
        return
    by_name = {layer.ffn.name: layer for layer in plan.layers.values()}
    for d in plan.model.moefx_info.layers:
        layer = by_name.get(d["name"])
        if layer is None:
            continue
        d["partition"] = partition_used(config, calibrated=calibration is not None)
        d["shared_size"] = split_sizes(layer.ffn.match, config)[1]
        if calibration is not None:
            d["calibration_tokens"] = calibration[d["name"]].tokens


def stream_convert(source_dir: str | os.PathLike, out: str | os.PathLike, config: MoEConfig | None = None, *,
                   max_shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False) -> StreamResult:
    """Plan and run a streamed conversion of ``source_dir`` into ``out`` (resuming an interrupted one)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force (force=True) to replace it")
    plan = plan_stream(source_dir, config, max_shard_size=max_shard_size)
    return run_stream(plan, out, force=force)
