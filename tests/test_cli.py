"""The moefx command: the happy path on every MODEL form, and bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moefx
from moefx.cli import main

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``moefx`` entry point in a subprocess (the real CLI, exit codes and streams)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS), MOEFX_QUIET="1")
    return subprocess.run([sys.executable, "-m", "moefx.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from conftest import tiny_hf_model

    path = tmp_path_factory.mktemp("hf") / "bert"
    tiny_hf_model("bert").save_pretrained(path)
    return path


@pytest.mark.slow
def test_convert_then_inspect_hf_directory(hf_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", str(hf_dir), "--experts", "4", "--top-k", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "converted 2 FFN(s)" in result.stdout and "exact" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"recipe.json", "model.safetensors", "report.json", "report.md"}
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["config"]["num_experts"] == 4 and len(recipe["layers"]) == 2
    result = run_cli("inspect", str(out))
    assert result.returncode == 0 and "encoder.layer.0.moe" in result.stdout
    loaded = moefx.load(out)
    assert len(moefx.moe_layers(loaded)) == 2


def test_inspect_reports_ffns_and_near_misses(capsys):
    assert main(["inspect", "toy_models:reused_hidden", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ffns"] == []
    assert any("not pure" in m["reason"] for m in data["near_misses"])
    assert main(["inspect", "toy_models:stack_of_mlps", "--every", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 FFN(s) found, 1 selected" in out


def test_convert_factory_and_pt2_sources(tmp_path, capsys):
    assert main(["convert", "toy_models:stack_of_mlps", "-o", str(tmp_path / "a"), "--experts", "2",
                 "--top-k", "1", "--init", "random"]) == 0
    model, inputs = __import__("toy_models").stack_of_mlps()
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, inputs), program)
    assert main(["convert", str(program), "-o", str(tmp_path / "b"), "--experts", "2"]) == 0
    loaded = moefx.load(tmp_path / "b")
    assert len(moefx.moe_layers(loaded)) == 3
    torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_a_model_converted_from_a_program_exports_partitions_and_benches(tmp_path, capsys):
    """A loaded torch.export program cannot switch train/eval (its mode is in its graph): the later commands
    leave its mode alone instead of failing; shapes it was not exported for are one clear error."""
    model, inputs = __import__("toy_models").stack_of_mlps()
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, inputs), program)  # fixed shapes
    out = tmp_path / "moe"
    assert main(["convert", str(program), "-o", str(out), "--experts", "2"]) == 0
    batch, seq = inputs[0].shape[:2]
    assert main(["export", str(out), "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["partition", str(out), "--devices", "2", "-o", str(tmp_path / "plan"), "--no-png"]) == 0
    assert main(["bench", str(out), "--batch", str(batch), "--seq", str(seq), "--runtimes", "torch",
                 "--min-seconds", "0.05", "--no-ffn"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--batch", str(batch + 1), "--seq", str(seq), "--runtimes", "torch"]) == 2
    err = capsys.readouterr().err
    assert f"does not run on batch {batch + 1}" in err and len(err.strip().splitlines()) == 1


def test_pickle_is_refused_without_opt_in_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    result = run_cli("convert", str(evil), "-o", str(tmp_path / "out"))
    assert_clean_error(result, "evil.pt", "--trust-remote-code")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pickle_with_opt_in(tmp_path, capsys):
    model, _ = __import__("toy_models").stack_of_mlps()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    # a plain module traces without example inputs
    assert main(["convert", str(path), "--trust-remote-code", "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "recipe.json").exists()


@pytest.mark.parametrize("form", ["tensor", "dict", "safetensors"])
def test_a_pickled_module_converts_with_example_inputs_from_a_file(tmp_path, form):
    """`convert model.pt --inputs FILE`: the conversion is checked on those inputs and records them, so that
    bench (which shapes its inputs after them) runs on the output; a .pt tensor is a positional input, a dict
    or a .safetensors file's tensors are keyword inputs."""
    from safetensors.torch import save_file

    model, _ = __import__("toy_models").stack_of_mlps()
    torch.save(model, tmp_path / "model.pt")
    x = torch.randn(3, 7, 16)
    inputs = tmp_path / ("inputs.safetensors" if form == "safetensors" else "inputs.pt")
    if form == "safetensors":
        save_file({"x": x}, inputs)
    else:
        torch.save(x if form == "tensor" else {"x": x}, inputs)
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "model.pt"), "--trust-remote-code", "--inputs", str(inputs),
                 "-o", str(out), "--quiet"]) == 0
    args, kwargs = moefx.load(out, trust_remote_code=True).moefx_info.inputs
    assert torch.equal(args[0] if form == "tensor" else kwargs["x"], x)
    assert json.loads((out / "report.json").read_text())["verification"]["compared"]
    assert main(["bench", str(out), "--trust-remote-code", "--runtimes", "torch", "--no-ffn", "--batch", "1",
                 "--seq", "4", "--min-seconds", "0.01", "--quiet"]) == 0


BAD_CASES = {
    "missing file": (["convert", "does/not/exist.pt2"], ["does/not/exist.pt2", "no such file"]),
    "wrong format": (["convert", "{tmp}/notes.pt2"], ["notes.pt2", "not a valid torch.export program"]),
    "unknown extension": (["convert", "{tmp}/notes.txt"], ["notes.txt", "unknown model format"]),
    "no config.json": (["convert", "{tmp}"], ["config.json"]),
    "no FFN": (["convert", "toy_models:no_ffn", "-o", "{tmp}/o"], ["no FFN moefx can convert"]),
    "untraceable": (["convert", "toy_models:untraceable", "-o", "{tmp}/o"],
                    ["blocks.0.ffn", "no tracer could capture DataDependentFFN"]),
    "top-k > experts": (["convert", "toy_models:stack_of_mlps", "--experts", "2", "--top-k", "3"],
                        ["--top-k 3 is larger than --experts 2"]),
    "zero experts": (["convert", "toy_models:stack_of_mlps", "--experts", "0"], ["--experts must be at least 1"]),
    "negative capacity": (["convert", "toy_models:stack_of_mlps", "--capacity-factor", "-1"],
                          ["--capacity-factor must be a positive finite number"]),
    "infinite capacity": (["convert", "toy_models:stack_of_mlps", "--capacity-factor", "inf"],
                          ["--capacity-factor must be a positive finite number", "dropless"]),
    "opset too new": (["export", "toy_models:stack_of_mlps", "-o", "{tmp}/m.onnx", "--opset", "26"],
                      ["opset 26 is newer than 25"]),
    "unknown router": (["convert", "toy_models:stack_of_mlps", "--router", "nope"], ["'nope'", "choose one of", "topk"]),
    "not an int": (["convert", "toy_models:stack_of_mlps", "--experts", "many"], ["invalid int value"]),
    "bad factory": (["convert", "toy_models:does_not_exist"], ["has no attribute"]),
    "calibration nothing uses": (["convert", "toy_models:stack_of_mlps", "--calib", "{tmp}/c.pt", "-o", "{tmp}/o"],
                                 ["--calib only applies with --init split or --heal"]),
    "lora rank zero": (["convert", "toy_models:stack_of_mlps", "--init", "lora", "--lora-rank", "0", "-o", "{tmp}/o"],
                       ["--lora-rank must be at least 1"]),
    "lora rank without lora": (["convert", "toy_models:stack_of_mlps", "--lora-rank", "4", "-o", "{tmp}/o"],
                               ["--lora-rank only applies with --init lora (init is 'upcycle')"]),
    "noise without upcycle": (["convert", "toy_models:stack_of_mlps", "--init", "random", "--init-noise", "0.1",
                               "-o", "{tmp}/o"], ["--init-noise only applies with --init upcycle"]),
    "heal steps without heal": (["convert", "toy_models:stack_of_mlps", "--heal-steps", "5", "-o", "{tmp}/o"],
                                ["--heal-steps only applies with --heal"]),
    "calib tokens without calib": (["convert", "toy_models:stack_of_mlps", "--calib-tokens", "5", "-o", "{tmp}/o"],
                                   ["--calib-tokens only applies with --calib FILE"]),
    "shard size without stream": (["convert", "toy_models:stack_of_mlps", "--max-shard-size", "1MB",
                                   "-o", "{tmp}/o"], ["--max-shard-size only applies with --stream"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_clear_line(case, tmp_path):
    (tmp_path / "notes.pt2").write_text("not a program")
    (tmp_path / "notes.txt").write_text("hello")
    args, needles = BAD_CASES[case]
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert_clean_error(result, *needles)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith("-moe") or ".tmp-" in p.name]


def test_existing_output_needs_force_and_is_left_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["convert", "toy_models:stack_of_mlps", "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["convert", "toy_models:stack_of_mlps", "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "recipe.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_an_output_that_is_or_holds_the_input_is_refused_even_with_force(hf_dir, tmp_path, capsys):
    """``--force`` replaces OUT; when OUT is the model (or its directory holds it), that would delete the input."""
    import shutil

    sandbox = tmp_path / "sandbox"
    model = sandbox / "model"
    shutil.copytree(hf_dir, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (sandbox, model):
        assert main(["convert", str(model), "-o", str(out), "--force"]) == 2
        assert "the input" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before
    converted = tmp_path / "moe"
    assert main(["convert", str(model), "-o", str(converted)]) == 0
    capsys.readouterr()
    for command in (["partition", str(converted), "--devices", "2", "-o", str(converted)],
                    ["heal", str(converted), "--calib", str(tmp_path / "c.txt"), "-o", str(tmp_path)],
                    ["export", str(converted), "-o", str(converted)]):
        assert main([*command, "--force"]) == 2, command
        assert "the input" in capsys.readouterr().err
    assert (converted / "recipe.json").exists()


def test_export_never_writes_over_the_model_or_an_existing_report(tmp_path, capsys):
    """Every file ``moefx export`` could write (FILE.onnx, its report) is checked before the export runs: not
    inside the model directory (with --force that replaced its weights or its recipe), not the same file as
    another output, and not an existing file without --force."""
    out = tmp_path / "out"
    assert main(["convert", "toy_models:stack_of_mlps", "-o", str(out)]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    report, onnx_file = tmp_path / "r.json", tmp_path / "m.onnx"
    report.write_text("keep")
    capsys.readouterr()
    for extra, message in (
        (["-o", str(out / "model.safetensors"), "--force"], "inside the model directory"),
        (["-o", str(out / "new.onnx")], "inside the model directory"),
        (["-o", str(onnx_file), "--json", str(out / "recipe.json"), "--force"], "inside the model"),
        (["-o", str(onnx_file), "--json", str(report)], "already exists; pass --force"),
        (["-o", str(onnx_file), "--json", str(onnx_file), "--force"], "name the same file"),
        (["-o", str(onnx_file), "--json", f"{onnx_file}.data", "--force"], "name the same file"),
        (["-o", str(onnx_file), "--inputs", str(report), "--json", str(report), "--force"], "name the same file"),
    ):
        assert main(["export", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert report.read_text() == "keep" and not onnx_file.exists()
    assert main(["export", str(out), "-o", str(onnx_file), "--json", str(report), "--force"]) == 0
    assert json.loads(report.read_text())["path"] == str(onnx_file)


def test_export_onnx_refuses_a_report_path_that_is_the_model_file(tmp_path):
    from moefx.onnx import export_onnx

    model, inputs = __import__("toy_models").stack_of_mlps()
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=2), inputs)
    path = tmp_path / "m.onnx"
    with pytest.raises(moefx.MoefxError, match="where the ONNX model goes"):
        export_onnx(moe, inputs, path, report_path=path)
    (tmp_path / "r.json").write_text("keep")
    with pytest.raises(moefx.MoefxError, match="already exists"):
        export_onnx(moe, inputs, path, report_path=tmp_path / "r.json")
    assert not path.exists() and (tmp_path / "r.json").read_text() == "keep"


def test_export_takes_example_inputs_when_none_were_recorded(tmp_path, capsys):
    model, inputs = __import__("toy_models").stack_of_mlps()
    moe = moefx.convert(model, moefx.MoEConfig(num_experts=2), inputs)
    moe.moefx_info.inputs = None  # as for a model converted without example inputs
    torch.save(moe, tmp_path / "moe.pt")
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "moe.pt"), "--trust-remote-code", "-o", str(onnx_file)]) == 2
    assert "pass --inputs FILE" in capsys.readouterr().err and not onnx_file.exists()
    torch.save(inputs, tmp_path / "inputs.pt")
    assert main(["export", str(tmp_path / "moe.pt"), "--trust-remote-code", "-o", str(onnx_file), "--inputs",
                 str(tmp_path / "inputs.pt"), "-q"]) == 0
    assert onnx_file.exists()


def test_config_errors_speak_in_flags_on_the_cli(capsys):
    assert main(["convert", "toy_models:stack_of_mlps", "--router", "task"]) == 2
    assert "--router task needs --num-tasks, the number of task ids it learns a route for (e.g. --num-tasks 4)" \
        in capsys.readouterr().err
    assert main(["convert", "toy_models:stack_of_mlps", "--expert-size", "8"]) == 2
    assert "--init upcycle copies the dense FFN, so --expert-size must be unset or 32 (got 8); use --init random" \
        in capsys.readouterr().err
    from moefx.cli.convert import _in_flag_terms

    assert _in_flag_terms("leave capacity_factor=None (got 1.5)") == "leave --capacity-factor unset (got 1.5)"
    for untouched in ("/data/router/top_k.pt: no such file", "config.top_k is wrong", "layers='model.layers.[0' is "
                      "not a valid regex", "every token of a task takes its route"):  # paths, names, plain words
        assert _in_flag_terms(untouched) == untouched


def test_a_pickle_whose_module_cannot_be_imported_points_to_pythonpath(tmp_path):
    model, _ = __import__("toy_models").stack_of_mlps()
    torch.save(model, tmp_path / "m.pt")
    env = dict(os.environ, MOEFX_QUIET="1", PYTHONPATH="")  # toy_models is not importable from here
    result = subprocess.run([sys.executable, "-m", "moefx", "convert", str(tmp_path / "m.pt"), "--trust-remote-code",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2 and "module 'toy_models'" in result.stderr and "PYTHONPATH" in result.stderr


def test_failed_conversion_leaves_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["convert", "toy_models:no_ffn", "-o", str(out), "--force"]) == 2
    assert (out / "keep.txt").read_text() == "precious"


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and moefx.__version__ in result.stdout
    result = run_cli("convert", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--capacity-factor" in result.stdout


def test_nan_weights_warn_convert_and_report(tmp_path, capsys):
    assert main(["convert", "toy_models:nan_weights", "-o", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "blocks.1.ffn: non-finite weights in up (1 values)" in captured.out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["warnings"] and "blocks.1.ffn" in report["warnings"][0]


def test_corrupt_hf_config_and_truncated_weights(tmp_path, hf_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert_clean_error(run_cli("convert", str(broken)), "config.json", "not valid JSON")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((hf_dir / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:100])
    assert_clean_error(run_cli("convert", str(truncated), "-o", str(tmp_path / "o")), "truncated",
                       "could not load")
    assert not (tmp_path / "o").exists()


def test_zero_byte_and_truncated_programs(tmp_path):
    (tmp_path / "empty.pt2").write_bytes(b"")
    assert_clean_error(run_cli("convert", str(tmp_path / "empty.pt2")), "empty.pt2", "not a valid")
    model, inputs = __import__("toy_models").stack_of_mlps()
    torch.export.save(torch.export.export(model, inputs), tmp_path / "full.pt2")
    (tmp_path / "cut.pt2").write_bytes((tmp_path / "full.pt2").read_bytes()[:2000])
    assert_clean_error(run_cli("convert", str(tmp_path / "cut.pt2")), "cut.pt2", "not a valid")


def test_unwritable_output_and_disk_full(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a file, not a directory")
    assert main(["convert", "toy_models:stack_of_mlps", "-o", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "file/out" in err and "choose a writable output path" in err

    import errno

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    assert main(["convert", "toy_models:stack_of_mlps", "-o", str(tmp_path / "out")]) == 2
    assert "(No space left on device); nothing was changed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- first run: help, progress, streams, determinism --------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "inspect", "export", "partition", "bench"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: moefx {command}" in out and "examples:" in out and f"moefx {command} " in out.split("examples:")[1]
    assert "--quiet" in out and "--debug" in out


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_go_to_stderr_and_quiet_turns_them_off(quiet, tmp_path, capsys, monkeypatch):
    import moefx.progress

    monkeypatch.setitem(moefx.progress._state, "quiet", None)  # main() sets it; restore it afterwards
    monkeypatch.delenv("MOEFX_QUIET", raising=False)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["convert", "toy_models:stack_of_mlps", "--experts", "2", "-o", str(tmp_path / "out")]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    out = capsys.readouterr().out
    assert "saved to" in out and "capturing" not in out and "building experts" not in out
    bars = terminal.getvalue()
    if quiet:
        assert bars == ""
    else:
        assert "capturing" in bars and "building experts" in bars


def test_results_on_stdout_and_nothing_on_stderr_with_quiet(tmp_path):
    result = run_cli("convert", "toy_models:stack_of_mlps", "--experts", "2", "-o", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "converted 3 FFN(s)" in result.stdout and "saved to" in result.stdout


def test_non_finite_weights_warn_convert_and_report_from_the_cli(tmp_path):
    result = run_cli("convert", "toy_models:non_finite_weights", "--experts", "2", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "Traceback" not in result.stderr
    assert "blocks.0.ffn: non-finite weights in up (1 values)" in warnings[0]
    assert "blocks.2.ffn: non-finite weights in down (1 values)" in warnings[1]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [w.split(":")[0] for w in report["warnings"]] == ["blocks.0.ffn", "blocks.2.ffn"]
    assert "## Warnings" in (tmp_path / "out" / "report.md").read_text()
    assert len(moefx.moe_layers(moefx.load(tmp_path / "out"))) == 3


@pytest.mark.parametrize("flags", [["--init", "random", "--seed", "3"], ["--init-noise", "0.1", "--seed", "5"]])
def test_same_inputs_and_seed_give_byte_identical_recipe_and_weights(flags, tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["convert", "toy_models:stack_of_mlps", "--experts", "4", *flags, "-o", str(tmp_path / name)]) == 0
    for file in ("recipe.json", "model.safetensors", "example_inputs.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert main(["convert", "toy_models:stack_of_mlps", "--experts", "4", *flags[:-1], "99",
                 "-o", str(tmp_path / "c")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_heal_refuses_a_dense_model_that_is_not_the_source(hf_dir, tmp_path):
    """`moefx heal --dense OTHER`, OTHER another checkpoint of the same architecture: one line, exit 2, no output."""
    from conftest import tiny_hf_model

    tiny_hf_model("bert", seed=1).save_pretrained(tmp_path / "other")
    torch.save(torch.randint(1, 96, (8, 6)), tmp_path / "calib.pt")
    assert main(["convert", str(hf_dir), "--init", "split", "--experts", "4", "--top-k", "2",
                 "-o", str(tmp_path / "out"), "--quiet"]) == 0
    result = run_cli("heal", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.pt"),
                     "--dense", str(tmp_path / "other"), "-o", str(tmp_path / "healed"))
    assert_clean_error(result, "not the one this model was converted from")
    assert not (tmp_path / "healed").exists()


def test_heal_never_writes_over_the_recorded_source(hf_dir, tmp_path):
    """Without --dense, heal reads the source OUT records: `-o SOURCE --force` is refused like any input."""
    import shutil

    source = tmp_path / "bert"
    shutil.copytree(hf_dir, source)
    torch.save(torch.randint(1, 96, (8, 6)), tmp_path / "calib.pt")
    assert main(["convert", str(source), "--experts", "4", "--top-k", "2", "-o", str(tmp_path / "out"), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    result = run_cli("heal", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.pt"), "-o", str(source), "--force")
    assert_clean_error(result, "is the input")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


@pytest.mark.slow
def test_split_with_calibration_and_healing_from_the_cli(hf_dir, tmp_path, capsys):
    """`convert --calib --heal` and `moefx heal` each bring a weight-only split conversion closer to the dense
    model on inputs they never saw, and the same data and seed give the same bytes."""
    from transformers import AutoModel

    calib, held_out = (torch.randint(1, 96, (n, 12), generator=torch.Generator().manual_seed(s)) for n, s in ((96, 0), (16, 1)))
    torch.save(calib, tmp_path / "calib.pt")
    split = ["--init", "split", "--experts", "8", "--top-k", "2"]
    assert main(["convert", str(hf_dir), *split, "-o", str(tmp_path / "plain"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["heal", str(tmp_path / "plain"), "--calib", str(tmp_path / "calib.pt"), "--steps", "40",
                 "-o", str(tmp_path / "healed"), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in report] == ["least-squares + gradient"] * 2
    # The table prints every error in one format (it mixed 0.0123 and 1.234e-05 in a column).
    assert main(["heal", str(tmp_path / "plain"), "--calib", str(tmp_path / "calib.pt"), "--steps", "0",
                 "-o", str(tmp_path / "ls"), "--quiet"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "least-squares" in line]
    assert len(rows) == 2 and all(re.fullmatch(r"\d\.\d{3}e[+-]\d\d", cell) for row in rows for cell in row[2:4]), rows
    assert all(r["error_after"] < r["error_before"] for r in report)
    for name in ("a", "b"):
        assert main(["convert", str(hf_dir), *split, "--calib", str(tmp_path / "calib.pt"), "--heal",
                     "--heal-steps", "40", "-o", str(tmp_path / name), "--quiet"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with torch.no_grad():
        want = AutoModel.from_pretrained(hf_dir).eval()(held_out).last_hidden_state

        def error(name: str) -> float:
            got = moefx.load(tmp_path / name).eval()(held_out).last_hidden_state
            return float((got - want).square().mean())

        plain, healed, both = error("plain"), error("healed"), error("a")
    assert healed < plain and both < plain, (plain, healed, both)


def test_sizes_print_in_a_unit_that_shows_them():
    from moefx.report import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1024, 20 * 1024 + 512, 3 * 1024**2, 5 * 1024**3, 4096 * 1024**3)] == [
        "0 B", "1023 B", "1.0 KB", "20.5 KB", "3.0 MB", "5.0 GB", "4096.0 GB"]
