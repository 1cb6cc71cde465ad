"""save/load of converted models built from Python objects, determinism, and the atomic output directory."""

from __future__ import annotations

import hashlib

import pytest
import torch

import moefx
from moefx.errors import ModelLoadError, OutputExistsError
from moefx.files import atomic_output_dir
from moefx.sources import load_source

from toy_models import MLP, Block, GatedMLP, Stack


def _model():
    torch.manual_seed(0)
    return Stack([Block(MLP()), Block(GatedMLP())]).eval()


def test_plain_module_round_trip_needs_the_dense_model(tmp_path):
    x = torch.randn(2, 4, 16)
    moe = moefx.convert(_model(), moefx.MoEConfig(num_experts=3, top_k=2, init="random"), example_inputs=(x,))
    moefx.save(moe, tmp_path / "out")
    with pytest.raises(ModelLoadError, match=r"pass the dense model: moefx.load\(out, model="):
        moefx.load(tmp_path / "out")
    loaded = moefx.load(tmp_path / "out", model=Stack([Block(MLP()), Block(GatedMLP())]))
    with torch.no_grad():
        assert torch.equal(loaded(x), moe(x))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_and_seed_give_identical_files(tmp_path):
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    for name in ("a", "b"):
        moe = moefx.convert(_model(), moefx.MoEConfig(num_experts=4, init="random", seed=7), example_inputs=(x,))
        moefx.save(moe, tmp_path / name)
    for file in ("model.safetensors", "recipe.json"):
        assert _digest(tmp_path / "a" / file) == _digest(tmp_path / "b" / file)
    moe = moefx.convert(_model(), moefx.MoEConfig(num_experts=4, init="random", seed=8), example_inputs=(x,))
    moefx.save(moe, tmp_path / "c")
    assert _digest(tmp_path / "a" / "model.safetensors") != _digest(tmp_path / "c" / "model.safetensors")


def test_atomic_output_dir_keeps_existing_output_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(OutputExistsError), atomic_output_dir(out):
        pass
    with pytest.raises(RuntimeError), atomic_output_dir(out, force=True) as tmp:
        (tmp / "half").write_text("half-written")
        raise RuntimeError("disk full")
    assert (out / "old").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_load_rejects_weights_of_another_model(tmp_path):
    moe = moefx.convert(_model(), moefx.MoEConfig(num_experts=2), example_inputs=(torch.randn(1, 2, 16),))
    moefx.save(moe, tmp_path / "out")
    other = Stack([Block(MLP(h=24)), Block(GatedMLP())])
    with pytest.raises(ModelLoadError, match="does not fit the rebuilt model"):
        moefx.load(tmp_path / "out", model=other)


def test_python_api_errors_are_moefx_errors_with_one_line():
    """The bad inputs the CLI turns into one line raise MoefxError from the Python API too."""
    from toy_models import no_ffn, untraceable

    cases = [
        lambda: moefx.convert(*no_ffn()[:1], example_inputs=no_ffn()[1]),
        lambda: moefx.convert(*untraceable()[:1], example_inputs=untraceable()[1]),
        lambda: moefx.MoEConfig(num_experts=2, top_k=3),
        lambda: moefx.MoEConfig(router="nope"),
        lambda: moefx.MoEConfig(capacity_factor=-1.0),
        lambda: load_source("does/not/exist.pt2"),
        lambda: moefx.load("does/not/exist"),
    ]
    for case in cases:
        with pytest.raises(moefx.MoefxError) as info:
            case()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask):
    """Staged in private temporary directories and files, outputs are published with the modes ``mkdir`` and
    ``open`` would give them, not the owner-only ones of ``mkdtemp``/``mkstemp`` (other users of a shared
    machine could not read a converted model)."""
    import os

    from moefx.files import atomic_write_text

    x = torch.randn(2, 4, 16)
    moe = moefx.convert(_model(), moefx.MoEConfig(num_experts=3, top_k=2), example_inputs=(x,))
    old = os.umask(umask)
    try:
        moefx.save(moe, tmp_path / "out")
        atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    files = [*(tmp_path / "out").iterdir(), tmp_path / "report.json"]
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}
