"""The bad-input corpus as a registry: one small builder per case, run from the CLI and the Python API.

A builder writes its input files into a fresh directory (``ws``), and returns what to run and what must come
of it::

    @case("zero-byte .pt2", "convert", "inspect", "export")
    def zero_byte_program(ws, command):
        path = ws.write("empty.pt2", b"")
        return expect(ws.read(command, path), ModelLoadError, "empty.pt2", "not a valid torch.export program")

``ws.read(command, MODEL)`` (or ``ws.convert(...)``, ``ws.export(...)``, ...) gives the CLI argv and the
equivalent Python API call; a flag case gives both spellings, e.g. ``ws.convert(FACTORY, "--top-k", "0",
top_k=0)`` (CLI flags, then the MoEConfig fields they set). ``expect`` adds the moefx exception type the API
must raise, what the one-line message must name (the input file or flag; a pair when the CLI and the API spell
it differently, e.g. ``("--top-k", "top_k")``), and further substrings. Every case is registered once
per command it applies to, as ``"COMMAND: name"`` in :data:`CASES`. ``tests/test_bad_inputs.py`` runs each
one both ways and checks: exit code (2), exactly one line on stderr, no traceback, the same message from the
API, and that nothing under the case directory or the shared assets changed (no partial output, no temporary
files left, an existing output byte-for-byte the same, no marker file from a pickle payload).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import moefx
from moefx.errors import (
    CalibrationError,
    ConfigError,
    ModelLoadError,
    MoefxError,
    NoFFNFoundError,
    OutputExistsError,
    UnsafeFileError,
)
from moefx.inputs import load_example_inputs
from moefx.saving import read_recipe
from moefx.sources import load_source

__all__ = ["CASES", "Assets", "Case", "Expect", "Invocation", "Workspace", "build_assets", "case", "expect"]

FACTORY = "toy_models:stack_of_mlps"


# ---------------------------------------------------------------------------------------------------------
# What a case runs and expects
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One operation, as ``moefx`` argv and as the equivalent Python API call."""

    cli: list[str] | None
    api: Callable[[], Any] | None


@dataclass(frozen=True)
class Expect:
    invocation: Invocation
    error: type[MoefxError]  # what the API raises (the CLI prints it)
    names: tuple[str, str]  # what the message names (the input or the flag), from the CLI and from the API
    says: tuple[str, ...] = ()  # further substrings of the message, both ways
    cli_says: tuple[str, ...] = ()
    api_says: tuple[str, ...] = ()
    exit_code: int = 2
    file_size_limit: int | None = None  # a full disk: writing a file past this many bytes fails


def expect(invocation: Invocation, error: type[MoefxError], names: str | tuple[str, str], *says: str,
           cli_says: Sequence[str] = (), api_says: Sequence[str] = (), exit_code: int = 2,
           file_size_limit: int | None = None) -> Expect:
    if isinstance(names, str):
        names = (names, names)
    return Expect(invocation, error, names, tuple(says), tuple(cli_says), tuple(api_says), exit_code,
                  file_size_limit)


@dataclass(frozen=True)
class Case:
    name: str
    command: str
    build: Callable[[Workspace, str], Expect]


#: ``"COMMAND: case name"`` -> case, in registration order.
CASES: dict[str, Case] = {}


def case(name: str, *commands: str):
    """Register ``build(ws, command) -> Expect`` as the case ``name`` of each of ``commands``."""

    def register(build: Callable[[Workspace, str], Expect]):
        for command in commands:
            key = f"{command}: {name}"
            if key in CASES:
                raise ValueError(f"duplicate bad-input case {key!r}")
            CASES[key] = Case(key, command, build)
        return build

    return register


# ---------------------------------------------------------------------------------------------------------
# Shared valid inputs (built once per test module) and the per-case directory
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    root: Path
    program: Path  # torch.export program of toy_models.stack_of_mlps
    pickled: Path  # the same module, torch.save-d
    hf_dir: Path  # a tiny BERT, save_pretrained
    converted: Path  # moefx output directory of toy_models:stack_of_mlps (2 experts)
    converted_hf: Path  # moefx output directory of the tiny BERT (2 experts)
    onnx: Path  # a small valid ONNX model


def build_assets(root: Path) -> Assets:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from conftest import tiny_hf_model
    from toy_models import stack_of_mlps

    model, inputs = stack_of_mlps()
    program = root / "program.pt2"
    torch.export.save(torch.export.export(model, inputs), program)
    pickled = root / "model.pt"
    torch.save(model, pickled)
    hf_dir = root / "bert"
    tiny_hf_model("bert").save_pretrained(hf_dir)
    source = load_source(FACTORY)
    moe = moefx.convert(source.model, moefx.MoEConfig(num_experts=2, top_k=1), source.example_inputs[0],
                        inplace=True, source=source.to_dict())
    converted = moefx.save(moe, root / "converted")
    source = load_source(hf_dir)
    moe = moefx.convert(source.model, moefx.MoEConfig(num_experts=2, top_k=1), inplace=True,
                        source=source.to_dict())
    converted_hf = moefx.save(moe, root / "converted-bert")
    weight = numpy_helper.from_array(torch.randn(64, 64).numpy(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [weight])
    onnx_path = root / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), onnx_path)
    return Assets(root, program, pickled, hf_dir, Path(converted), Path(converted_hf), onnx_path)


class NotWritableDirUnavailable(Exception):
    """This machine offers no read-only directory to the user running the tests (the case is skipped)."""


@dataclass
class Workspace:
    """A fresh directory for one case (the CLI and API run with it as the working directory)."""

    root: Path
    assets: Assets
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def copy(self, src: Path, name: str) -> Path:
        dst = self.path(name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        return dst

    def truncated(self, src: Path, name: str, keep: float = 0.5) -> Path:
        data = src.read_bytes()
        return self.write(name, data[: int(len(data) * keep)])

    def existing(self, name: str, *, directory: bool = True) -> Path:
        """An output path that already exists (with content that must survive the failed run)."""
        path = self.path(name)
        if directory:
            self.write(f"{name}/precious.txt", "keep me")
        else:
            self.write(name, "keep me")
        return path

    def read_only_dir(self) -> Path:
        """A directory nobody can write to: chmod 555, or for root (whom permission bits do not bind) sysfs."""
        if os.geteuid() != 0:
            path = self.path("read-only")
            path.mkdir()
            path.chmod(0o555)
            self.cleanups.append(lambda: path.chmod(0o755))
            return path
        try:
            os.rmdir(tempfile.mkdtemp(dir="/sys"))
        except OSError:
            return Path("/sys")
        raise NotWritableDirUnavailable("no directory here is read-only for root")

    # -- invocations ---------------------------------------------------------------------------------------

    def convert(self, model: str | Path, *flags: str, out: Path | None = None, force: bool = False,
                trust: bool = False, calib: Path | None = None, heal: bool = False, heal_steps: int | None = None,
                inputs: Path | None = None, **config: Any) -> Invocation:
        """``moefx convert MODEL -o OUT FLAGS``; ``config`` are the MoEConfig fields ``flags`` set."""
        out = out or self.path("result")
        cli = ["convert", str(model), "-o", str(out), "--experts", "2", "--top-k", "1", *flags,  # flags override
               *(["--calib", str(calib)] if calib is not None else []), *(["--heal"] if heal else []),
               *(["--heal-steps", str(heal_steps)] if heal_steps is not None else []),
               *(["--inputs", str(inputs)] if inputs is not None else []),
               *(["--force"] if force else []),
               *(["--trust-remote-code"] if trust else [])]
        return Invocation(cli, lambda: api_convert(model, out, force=force, trust_remote_code=trust, calib=calib,
                                                   heal=heal, heal_steps=heal_steps, inputs=inputs, **config))

    def inspect(self, model: str | Path, *, trust: bool = False) -> Invocation:
        cli = ["inspect", str(model), *(["--trust-remote-code"] if trust else [])]
        return Invocation(cli, lambda: api_inspect(model, trust_remote_code=trust))

    def export(self, model: str | Path, *flags: str, out: Path | None = None, force: bool = False,
               trust: bool = False, **options: Any) -> Invocation:
        out = out or self.path("result.onnx")
        cli = ["export", str(model), "-o", str(out), *flags, *(["--force"] if force else []),
               *(["--trust-remote-code"] if trust else [])]
        return Invocation(cli, lambda: api_export(model, out, force=force, trust_remote_code=trust, **options))

    def bench(self, model: str | Path, *, json_out: Path | None = None, force: bool = False, **sizes: Any) -> Invocation:
        cli = ["bench", str(model), "--runtimes", "torch", "--no-ffn", "--min-seconds", "0.01"]
        cli += ["--batch", ",".join(map(str, sizes.get("batches", [1]))),
                "--seq", ",".join(map(str, sizes.get("seqs", [4])))]
        if json_out is not None:
            cli += ["--json", str(json_out)]
        if force:
            cli += ["--force"]
        return Invocation(cli, lambda: api_bench(model, json_out=json_out, **sizes))

    def partition(self, model: str | Path, *, out: Path | None = None, devices: int = 2,
                  calib: Path | None = None, force: bool = False, load_tolerance: float | None = None) -> Invocation:
        out = out or self.path("plan")
        cli = ["partition", str(model), "--devices", str(devices), "-o", str(out), "--no-png",
               *(["--calib", str(calib)] if calib is not None else []), *(["--force"] if force else []),
               *(["--load-tolerance", str(load_tolerance)] if load_tolerance is not None else [])]
        return Invocation(cli, lambda: api_partition(model, out, devices=devices, calib=calib, force=force,
                                                     load_tolerance=load_tolerance or 0.0))

    def read(self, command: str, model: str | Path, *, trust: bool = False) -> Invocation:
        """``command`` reading ``model`` with its other arguments valid."""
        if command in ("convert", "inspect", "export"):
            return getattr(self, command)(model, trust=trust)
        if trust:
            raise ValueError(f"{command} has no --trust-remote-code case")
        return getattr(self, command)(model)


# ---------------------------------------------------------------------------------------------------------
# The Python API equivalents of the commands (what the CLI does, through the public API)
# ---------------------------------------------------------------------------------------------------------


def api_convert(model, out, *, force=False, trust_remote_code=False, calib=None, heal=False, heal_steps=None,
                inputs=None, **config):
    config = moefx.MoEConfig(**{"num_experts": 2, "top_k": 1, **config})
    example = load_example_inputs(inputs) if inputs is not None else None
    source = load_source(model, trust_remote_code=trust_remote_code)
    args, kwargs = example or source.example_inputs or (None, None)
    moe = moefx.convert(source.model, config, args, example_kwargs=kwargs, inplace=True, source=source.to_dict(),
                        calib=calib, heal=heal, **({} if heal_steps is None else {"heal_steps": heal_steps}))
    return moefx.save(moe, out, force=force)


def _is_converted_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "recipe.json").exists()


def api_inspect(model, *, trust_remote_code=False):
    if _is_converted_dir(model):
        return read_recipe(model)
    source = load_source(model, trust_remote_code=trust_remote_code)
    args, kwargs = source.example_inputs or (None, None)
    return moefx.analyze(source.model, args, example_kwargs=kwargs)


def api_export(model, out, *, force=False, trust_remote_code=False, **options):
    if _is_converted_dir(model):
        converted, inputs = moefx.load(model, trust_remote_code=trust_remote_code), None
    else:
        source = load_source(model, trust_remote_code=trust_remote_code)
        converted, inputs = source.model, source.example_inputs
    args, kwargs = inputs or (None, None)
    return moefx.export_onnx(converted, args, out, example_kwargs=kwargs, force=force, **options)


def api_bench(model, *, json_out=None, batches=(1,), seqs=(4,)):
    from moefx.bench import run_bench

    report = run_bench(model, batches=batches, seqs=seqs, runtimes=["torch"], ffn=False, min_seconds=0.01)
    if json_out is not None:
        report.write_json(json_out)
    return report


def api_partition(model, out, *, devices=2, calib=None, force=False, load_tolerance=0.0):
    from moefx.placement.planner import model_fingerprint, plan_placement
    from moefx.placement.shards import write_partition
    from moefx.placement.stats import calibration_batches, record_stats

    converted = moefx.load(model)
    stats = record_stats(converted, calibration_batches(converted, calib))
    plan = plan_placement(stats, devices, fingerprint=model_fingerprint(converted), load_tolerance=load_tolerance)
    return write_partition(converted, plan, out, stats=stats, picture=False, force=force)


# ---------------------------------------------------------------------------------------------------------
# Model files: zero-byte, truncated, another format under the right extension, pickles
# ---------------------------------------------------------------------------------------------------------

READS_MODEL = ("convert", "inspect", "export")  # commands whose MODEL may be a file
READS_CONVERTED = ("inspect", "export", "bench", "partition")  # commands that read a moefx output directory


@case("no such file", *READS_MODEL, "bench", "partition")
def missing_file(ws, command):
    path = ws.path("does/not/exist.pt2")
    return expect(ws.read(command, path), ModelLoadError if command != "partition" else MoefxError,
                  "does/not/exist.pt2", "no such file")


@case("zero-byte .pt2", *READS_MODEL)
def zero_byte_program(ws, command):
    path = ws.write("empty.pt2", b"")
    return expect(ws.read(command, path), ModelLoadError, "empty.pt2", "not a valid torch.export program")


@case("truncated .pt2", *READS_MODEL)
def truncated_program(ws, command):
    path = ws.truncated(ws.assets.program, "cut.pt2")
    return expect(ws.read(command, path), ModelLoadError, "cut.pt2", "not a valid torch.export program")


@case("ONNX file named .pt2", *READS_MODEL)
def onnx_as_program(ws, command):
    path = ws.copy(ws.assets.onnx, "model.pt2")
    return expect(ws.read(command, path), ModelLoadError, "model.pt2", "not a valid torch.export program")


@case("pickle that would run code, without --trust-remote-code", *READS_MODEL)
def evil_pickle(ws, command):
    marker = ws.path("pwned")  # the payload would create it; the snapshot check proves it was not
    path = ws.write("evil.pt", pickle.dumps(_TouchOnLoad(str(marker))))
    return expect(ws.read(command, path), UnsafeFileError, "evil.pt", "executes code", "--trust-remote-code")


class _TouchOnLoad:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@case("zero-byte .pt (trusted)", *READS_MODEL)
def zero_byte_pickle(ws, command):
    path = ws.write("empty.pt", b"")
    return expect(ws.read(command, path, trust=True), ModelLoadError, "empty.pt", "could not be unpickled")


@case("truncated .pt (trusted)", *READS_MODEL)
def truncated_pickle(ws, command):
    path = ws.truncated(ws.assets.pickled, "cut.pt")
    return expect(ws.read(command, path, trust=True), ModelLoadError, "cut.pt", "could not be unpickled")


@case("safetensors file named .pt (trusted)", "convert", "inspect")
def safetensors_as_pickle(ws, command):
    path = ws.copy(ws.assets.converted / "model.safetensors", "weights.pt")
    return expect(ws.read(command, path, trust=True), ModelLoadError, "weights.pt", "could not be unpickled")


@case("pickled state dict (trusted)", "convert", "inspect")
def pickled_state_dict(ws, command):
    path = ws.path("state.pt")
    torch.save({"w": torch.zeros(2)}, path)
    return expect(ws.read(command, path, trust=True), ModelLoadError, "state.pt", "holds a state dict")


@case("bare .safetensors", "convert", "inspect", "export")
def bare_safetensors(ws, command):
    path = ws.copy(ws.assets.converted / "model.safetensors", "model.safetensors")
    return expect(ws.read(command, path), ModelLoadError, "model.safetensors", "no architecture")


@case("zero-byte .safetensors", "convert", "inspect")
def zero_byte_safetensors(ws, command):
    path = ws.write("model.safetensors", b"")
    return expect(ws.read(command, path), ModelLoadError, "model.safetensors", "no architecture")


@case(".onnx file as MODEL", *READS_MODEL)
def onnx_as_model(ws, command):
    path = ws.copy(ws.assets.onnx, "model.onnx")
    return expect(ws.read(command, path), ModelLoadError, "model.onnx", "unknown model format '.onnx'")


@case("unknown factory", "convert", "inspect", "export")
def unknown_factory(ws, command):
    return expect(ws.read(command, "toy_models:does_not_exist"), ModelLoadError, "toy_models:does_not_exist",
                  "has no attribute")


@case("factory that raises", "convert", "inspect")
def raising_factory(ws, command):
    return expect(ws.read(command, "toy_models:raising_factory"), ModelLoadError, "toy_models:raising_factory",
                  "RuntimeError: the checkpoint server is down")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------------------


def _hf_copy(ws, *, without: str | None = None) -> Path:
    path = ws.copy(ws.assets.hf_dir, "hf")
    if without:
        (path / without).unlink()
    return path


@case("HF directory without config.json", "convert", "inspect")
def hf_no_config(ws, command):
    path = _hf_copy(ws, without="config.json")
    return expect(ws.read(command, path), ModelLoadError, "hf", "no config.json")


@case("HF directory with corrupt config.json", "convert", "inspect")
def hf_corrupt_config(ws, command):
    path = _hf_copy(ws)
    ws.truncated(path / "config.json", "hf/config.json")
    return expect(ws.read(command, path), ModelLoadError, "hf/config.json", "not valid JSON")


@case("HF directory with zero-byte config.json", "convert", "inspect")
def hf_empty_config(ws, command):
    path = _hf_copy(ws)
    ws.write("hf/config.json", b"")
    return expect(ws.read(command, path), ModelLoadError, "hf/config.json", "not valid JSON")


@case("HF config.json without model_type", "convert", "inspect")
def hf_config_without_model_type(ws, command):
    path = _hf_copy(ws)
    ws.write("hf/config.json", json.dumps({"hidden_size": 32}))
    return expect(ws.read(command, path), ModelLoadError, "hf/config.json", "no model_type")


@case("HF config.json with unknown model_type", "convert", "inspect")
def hf_unknown_model_type(ws, command):
    path = _hf_copy(ws)
    ws.write("hf/config.json", json.dumps({"model_type": "no-such-architecture"}))
    return expect(ws.read(command, path), ModelLoadError, "hf", "could not load")


@case("HF config.json that does not fit the weights", "convert", "inspect")
def hf_config_mismatch(ws, command):
    path = _hf_copy(ws)
    config = json.loads((path / "config.json").read_text())
    ws.write("hf/config.json", json.dumps({**config, "intermediate_size": 48}))
    return expect(ws.read(command, path), ModelLoadError, "hf", "could not load",
                  "config.json does not fit the weights", cli_says=["size mismatch"])


@case("HF directory with truncated weights", "convert", "inspect")
def hf_truncated_weights(ws, command):
    path = _hf_copy(ws)
    ws.truncated(path / "model.safetensors", "hf/model.safetensors")
    return expect(ws.read(command, path), ModelLoadError, "hf", "could not load")


@case("HF directory with zero-byte weights", "convert", "inspect")
def hf_empty_weights(ws, command):
    path = _hf_copy(ws)
    ws.write("hf/model.safetensors", b"")
    return expect(ws.read(command, path), ModelLoadError, "hf", "could not load")


# ---------------------------------------------------------------------------------------------------------
# moefx output directories (what inspect, export, bench and partition read)
# ---------------------------------------------------------------------------------------------------------


def _converted_copy(ws) -> Path:
    return ws.copy(ws.assets.converted, "out")


@case("output directory with corrupt recipe.json", *READS_CONVERTED)
def corrupt_recipe(ws, command):
    path = _converted_copy(ws)
    ws.truncated(path / "recipe.json", "out/recipe.json")
    return expect(ws.read(command, path), ModelLoadError, "out/recipe.json", "not valid JSON")


@case("output directory with a recipe of another format", *READS_CONVERTED)
def foreign_recipe(ws, command):
    path = _converted_copy(ws)
    ws.write("out/recipe.json", json.dumps({"format": "something-else"}))
    return expect(ws.read(command, path), ModelLoadError, "out/recipe.json", "not a moefx recipe")


@case("output directory of a HF model with corrupt config.json", "export", "bench", "partition")
def converted_hf_corrupt_config(ws, command):
    path = ws.copy(ws.assets.converted_hf, "out")
    ws.truncated(path / "config.json", "out/config.json")
    return expect(ws.read(command, path), ModelLoadError, "out/config.json", "could not read it")


@case("output directory of a HF model without config.json", "export", "bench", "partition")
def converted_hf_missing_config(ws, command):
    path = ws.copy(ws.assets.converted_hf, "out")
    (path / "config.json").unlink()
    return expect(ws.read(command, path), ModelLoadError, "out/config.json", "could not read it")


@case("output directory with truncated model.safetensors", "export", "bench", "partition")
def converted_truncated_weights(ws, command):
    path = _converted_copy(ws)
    ws.truncated(path / "model.safetensors", "out/model.safetensors")
    return expect(ws.read(command, path), ModelLoadError, "out/model.safetensors", "truncated or corrupt")


@case("output directory with zero-byte model.safetensors", "export", "bench", "partition")
def converted_empty_weights(ws, command):
    path = _converted_copy(ws)
    ws.write("out/model.safetensors", b"")
    return expect(ws.read(command, path), ModelLoadError, "out/model.safetensors", "truncated or corrupt")


@case("output directory without model.safetensors", "export", "bench", "partition")
def converted_missing_weights(ws, command):
    path = _converted_copy(ws)
    (path / "model.safetensors").unlink()
    return expect(ws.read(command, path), ModelLoadError, "out/model.safetensors", "missing")


@case("output directory with truncated example inputs", "export", "bench", "partition")
def converted_truncated_inputs(ws, command):
    path = _converted_copy(ws)
    ws.truncated(path / "example_inputs.safetensors", "out/example_inputs.safetensors")
    return expect(ws.read(command, path), ModelLoadError, "out/example_inputs.safetensors", "truncated or corrupt")


# ---------------------------------------------------------------------------------------------------------
# ONNX files (what bench reads)
# ---------------------------------------------------------------------------------------------------------


@case("zero-byte .onnx", "bench")
def zero_byte_onnx(ws, command):
    path = ws.write("empty.onnx", b"")
    return expect(ws.bench(path), ModelLoadError, "empty.onnx", "not a readable ONNX model")


@case("truncated .onnx", "bench")
def truncated_onnx(ws, command):
    path = ws.truncated(ws.assets.onnx, "cut.onnx")
    return expect(ws.bench(path), ModelLoadError, "cut.onnx", "not a readable ONNX model")


@case(".pt2 program named .onnx", "bench")
def program_as_onnx(ws, command):
    path = ws.copy(ws.assets.program, "model.onnx")
    return expect(ws.bench(path), ModelLoadError, "model.onnx", "not a readable ONNX model")


# ---------------------------------------------------------------------------------------------------------
# Models moefx cannot convert
# ---------------------------------------------------------------------------------------------------------


@case("model without an FFN", "convert")
def no_ffn(ws, command):
    return expect(ws.convert("toy_models:no_ffn"), NoFFNFoundError, "NoFFN", "no FFN moefx can convert")


@case("FFN whose hidden activation is reused", "convert")
def reused_hidden(ws, command):
    return expect(ws.convert("toy_models:reused_hidden"), NoFFNFoundError, "blocks.0.ffn", "not pure")


@case("FFN that no tracer can capture", "convert")
def untraceable(ws, command):
    # moefx.convert raises NoFFNFoundError here (CaptureError would fit; see moefx/convert.py _no_ffn_message)
    return expect(ws.convert("toy_models:untraceable"), NoFFNFoundError, "blocks.0.ffn",
                  "no tracer could capture DataDependentFFN")


@case("model without MoE layers", "export")
def export_dense_model(ws, command):
    return expect(ws.export(ws.assets.program), MoefxError, ("program.pt2", "GraphModule"), "has no MoE layers",
                  "convert it first")


# ---------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------


@case("--experts 0", "convert")
def zero_experts(ws, command):
    return expect(ws.convert(FACTORY, "--experts", "0", num_experts=0), ConfigError,
                  ("--experts", "num_experts"), "must be at least 1")


@case("--top-k 0", "convert")
def zero_top_k(ws, command):
    return expect(ws.convert(FACTORY, "--top-k", "0", top_k=0), ConfigError, ("--top-k", "top_k"),
                  "must be at least 1")


@case("--top-k larger than --experts", "convert")
def top_k_above_experts(ws, command):
    return expect(ws.convert(FACTORY, "--experts", "2", "--top-k", "3", num_experts=2, top_k=3), ConfigError,
                  ("--top-k 3 is larger than --experts 2", "top_k=3 is larger than num_experts=2"))


@case("negative --capacity-factor", "convert")
def negative_capacity(ws, command):
    return expect(ws.convert(FACTORY, "--capacity-factor", "-1", capacity_factor=-1.0), ConfigError,
                  ("--capacity-factor", "capacity_factor"), "must be a positive finite number", "dropless")


@case("unknown --router", "convert")
def unknown_router(ws, command):
    return expect(ws.convert(FACTORY, "--router", "nope", router="nope"), ConfigError, "'nope'", "choose one of")


@case("--opset below 18", "export")
def old_opset(ws, command):
    return expect(ws.export(ws.assets.converted, "--opset", "5", opset=5), MoefxError, "opset 5", "18 or above")


@case("--batch 0", "bench")
def zero_batch(ws, command):
    return expect(ws.bench(ws.assets.converted, batches=[0]), ConfigError, ("--batch", "batch"),
                  "not a positive integer")


@case("negative --load-tolerance", "partition")
def negative_load_tolerance(ws, command):
    return expect(ws.partition(ws.assets.converted, load_tolerance=-0.5), MoefxError, "--load-tolerance",
                  "finite number >= 0", "got -0.5")


@case("--devices 0", "partition")
def zero_devices(ws, command):
    return expect(ws.partition(ws.assets.converted, devices=0), MoefxError, "--devices", "at least 1")


# ---------------------------------------------------------------------------------------------------------
# Calibration files of partition (read with weights_only: a pickle payload must never run)
# ---------------------------------------------------------------------------------------------------------


@case("calibration .pt that would run code", "partition")
def evil_calibration(ws, command):
    marker = ws.path("pwned")
    path = ws.write("calib.pt", pickle.dumps(_TouchOnLoad(str(marker))))
    return expect(ws.partition(ws.assets.converted, calib=path), MoefxError, "calib.pt", "weights_only")


@case("truncated calibration .safetensors", "partition")
def truncated_calibration(ws, command):
    from safetensors.torch import save_file

    full = ws.path("full.safetensors")
    save_file({"input_ids": torch.randn(64, 5, 16)}, str(full))
    path = ws.truncated(full, "calib.safetensors")
    return expect(ws.partition(ws.assets.converted, calib=path), MoefxError, "calib.safetensors",
                  "truncated or corrupt")


@case("zero-byte calibration .pt", "partition")
def empty_calibration(ws, command):
    path = ws.write("calib.pt", b"")
    return expect(ws.partition(ws.assets.converted, calib=path), MoefxError, "calib.pt", "weights_only")


@case("calibration ids outside the vocabulary", "partition")
def partition_ids_out_of_vocabulary(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.randint(200, 300, (4, 6)), path)  # the tiny BERT's vocabulary is 96
    return expect(ws.partition(ws.assets.converted_hf, calib=path), MoefxError, "calib.pt", "outside the model's "
                  "vocabulary [0, 96)")


@case("float calibration data for a model of token ids", "partition")
def partition_float_ids(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.rand(4, 6), path)
    return expect(ws.partition(ws.assets.converted_hf, calib=path), MoefxError, "calib.pt", "has dtype float32",
                  "pass integer token ids")


@case("calibration sequences longer than the model's positions", "partition")
def partition_sequences_too_long(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.randint(0, 96, (2, 600)), path)  # BERT: 512 learned positions
    return expect(ws.partition(ws.assets.converted_hf, calib=path), MoefxError, "calib.pt", "batch 0 failed",
                  "600 tokens, above the model's 512 positions")


@case("calibration tensor of another rank than the model's input", "partition")
def partition_calibration_wrong_rank(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.randn(4, 5, 16, 2), path)  # the toy model takes [batch, seq, 16]
    return expect(ws.partition(ws.assets.converted, calib=path), MoefxError, "calib.pt", "has shape [4, 5, 16, 2]")


# ---------------------------------------------------------------------------------------------------------
# Outputs: existing, unwritable, full disk
# ---------------------------------------------------------------------------------------------------------


@case("existing output without --force", "convert", "export", "partition")
def existing_output(ws, command):
    if command == "export":
        out = ws.existing("result.onnx", directory=False)
        return expect(ws.export(ws.assets.converted, out=out), OutputExistsError, "result.onnx", "--force")
    out = ws.existing("result")
    run = ws.convert(FACTORY, out=out) if command == "convert" else ws.partition(ws.assets.converted, out=out)
    return expect(run, OutputExistsError, "result", "already exists", "--force")


@case("failed conversion over an existing output with --force", "convert")
def failed_conversion_keeps_output(ws, command):
    out = ws.existing("result")
    return expect(ws.convert("toy_models:no_ffn", out=out, force=True), NoFFNFoundError, "NoFFN",
                  "no FFN moefx can convert")


@case("output in a read-only directory", "convert", "export", "partition", "bench")
def read_only_output(ws, command):
    parent = ws.read_only_dir()
    if command == "convert":
        run, out = ws.convert(FACTORY, out=parent / "out"), parent / "out"
    elif command == "export":
        run, out = ws.export(ws.assets.converted, out=parent / "m.onnx"), parent / "m.onnx"
    elif command == "partition":
        run, out = ws.partition(ws.assets.converted, out=parent / "plan"), parent / "plan"
    else:
        run, out = ws.bench(ws.assets.converted, json_out=parent / "b.json"), parent / "b.json"
    return expect(run, MoefxError, out.name, str(parent), "writable")


@case("output directory does not exist", "convert", "export", "partition", "bench")
def missing_output_parent(ws, command):
    parent = ws.path("no/such/dir")
    if command == "convert":
        run = ws.convert(FACTORY, out=parent / "out")
    elif command == "export":
        run = ws.export(ws.assets.converted, out=parent / "m.onnx")
    elif command == "partition":
        run = ws.partition(ws.assets.converted, out=parent / "plan")
    else:
        run = ws.bench(ws.assets.converted, json_out=parent / "b.json")
    return expect(run, MoefxError, "no/such/dir", "does not exist")


#: Small enough that every command's main output file overflows it.
_FULL_DISK = 4096


@case("disk full while writing (over an existing output, with --force)", "convert", "export", "partition",
      "bench")
def disk_full(ws, command):
    if command == "convert":
        out = ws.existing("result")
        run = ws.convert(FACTORY, "--experts", "8", out=out, force=True, num_experts=8)
    elif command == "export":
        out = ws.existing("result.onnx", directory=False)
        run = ws.export(ws.assets.converted, out=out, force=True)
    elif command == "partition":
        out = ws.existing("result")
        run = ws.partition(ws.assets.converted, out=out, force=True)
    else:
        out = ws.existing("bench.json", directory=False)
        run = ws.bench(ws.assets.converted, json_out=out, force=True)
    limit = 256 if command == "bench" else _FULL_DISK  # the JSON report of one measurement is about 2 KB
    return expect(run, MoefxError, out.name, "File too large", "nothing was changed", file_size_limit=limit)


# ---------------------------------------------------------------------------------------------------------
# init='split' and calibration data of convert (the toy model takes float inputs [batch, seq, 16])
# ---------------------------------------------------------------------------------------------------------


@case("--init split with an inter size not divisible by the expert count", "convert")
def split_not_divisible(ws, command):
    return expect(ws.convert(FACTORY, "--init", "split", "--experts", "5", init="split", num_experts=5),
                  ConfigError, ("--experts", "num_experts"), "not divisible by 5")


@case("--partition coactivation without --calib", "convert")
def coactivation_without_calibration(ws, command):
    return expect(ws.convert(FACTORY, "--init", "split", "--partition", "coactivation", init="split",
                             partition="coactivation"), ConfigError, ("--partition", "partition="), "--calib")


@case("--inputs the model does not accept", "convert")
def inputs_not_accepted(ws, command):
    path = ws.path("inputs.pt")
    torch.save((torch.randn(2, 5, 16), torch.randn(3)), path)  # one positional input too many
    return expect(ws.convert(FACTORY, inputs=path), MoefxError, ("--inputs", "example_inputs="),
                  "failed on its example inputs", "TypeError")


@case("--inputs longer than the model's positions", "convert")
def inputs_too_long(ws, command):
    path = ws.path("inputs.pt")
    torch.save({"input_ids": torch.randint(0, 96, (1, 700))}, path)  # the tiny BERT has 512 positions
    return expect(ws.convert(ws.assets.hf_dir, inputs=path), MoefxError, ("--inputs", "example_inputs="),
                  "their 700 tokens exceed the model's 512 positions")


@case("--inputs that are not example inputs", "convert")
def inputs_not_inputs(ws, command):
    path = ws.write("inputs.pt", b"not a torch.save file")
    return expect(ws.convert(FACTORY, inputs=path), MoefxError, "inputs.pt", "not readable as example inputs")


@case("--inputs missing", "convert")
def inputs_missing(ws, command):
    return expect(ws.convert(FACTORY, inputs=ws.path("absent.pt")), MoefxError, "absent.pt", "no such inputs file")


@case("--heal without --calib", "convert")
def heal_without_calibration(ws, command):
    return expect(ws.convert(FACTORY, "--init", "split", init="split", heal=True), ConfigError,
                  ("--heal", "heal=True"), "--calib")


@case("a negative --heal-steps", "convert")
def heal_steps_negative(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.randn(8, 5, 16), path)
    return expect(ws.convert(FACTORY, "--init", "split", init="split", calib=path, heal=True, heal_steps=-1),
                  ConfigError, ("--heal-steps", "heal_steps"), ">= 0")


@case("calibration data of the wrong dtype", "convert")
def calibration_wrong_dtype(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.randint(0, 10, (8, 5, 16)), path)
    return expect(ws.convert(FACTORY, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.pt", "dtype int64", "floating-point")


@case("calibration data of the wrong shape", "convert")
def calibration_wrong_shape(ws, command):
    from safetensors.torch import save_file

    path = ws.path("calib.safetensors")
    save_file({"x": torch.randn(8, 5, 15)}, str(path))
    return expect(ws.convert(FACTORY, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.safetensors", "shape [8, 5, 15]")


@case("calibration text for a model that takes floats", "convert")
def calibration_text_for_floats(ws, command):
    path = ws.write("calib.txt", "a sentence\nanother one\n")
    return expect(ws.convert(FACTORY, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.txt", "floating point")


@case("empty calibration text", "convert")
def calibration_empty_text(ws, command):
    path = ws.write("calib.txt", "\n\n")
    return expect(ws.convert(ws.assets.hf_dir, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.txt", "no non-empty lines")


@case("calibration text that is not UTF-8", "convert")
def calibration_not_utf8(ws, command):
    path = ws.write("calib.txt", b"\xff\xfe\x00bad")
    return expect(ws.convert(ws.assets.hf_dir, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.txt", "UTF-8")


@case("calibration token ids outside the vocabulary", "convert")
def calibration_out_of_vocabulary(ws, command):
    path = ws.path("calib.pt")
    torch.save(torch.full((4, 6), 10_000), path)
    return expect(ws.convert(ws.assets.hf_dir, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.pt", "outside the model's vocabulary")


@case("calibration .pt that would run code (convert)", "convert")
def evil_calibration_convert(ws, command):
    marker = ws.path("pwned")
    path = ws.write("calib.pt", pickle.dumps(_TouchOnLoad(str(marker))))
    return expect(ws.convert(FACTORY, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.pt", "weights_only")


@case("calibration file with an unknown extension", "convert")
def calibration_unknown_format(ws, command):
    path = ws.write("calib.csv", "1,2,3\n")
    return expect(ws.convert(FACTORY, "--init", "split", init="split", calib=path), CalibrationError,
                  "calib.csv", "unknown calibration format")
