"""moefx.evaluate and `moefx eval`: the metrics against hand-computed values, the per-layer errors against
the dense FFN, and bad evaluation data as one clear line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_clean_error, run_cli
from torch import nn

import moefx
from moefx.errors import CalibrationError
from moefx.evaluate import evaluate_batches
from moefx.report import render_conversion_text

from conftest import tiny_hf_model


class FixedForCausalLM(nn.Module):
    """A 'causal LM' whose logits at every position are ``logits [V]``, whatever the tokens."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask=None):
        out = self.logits.expand(*input_ids.shape, -1).clone()
        return type("Out", (), {"logits": out})()


class FixedEncoder(nn.Module):
    """An 'encoder' whose hidden states are given."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"last_hidden_state": self.hidden})()


def test_causal_lm_metrics_match_hand_computed_values():
    dense = FixedForCausalLM([math.log(0.6), math.log(0.4)])
    moe = FixedForCausalLM([math.log(0.75), math.log(0.25)])
    ids = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1]])  # next tokens: 1,0,0 and 0,1,1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()  # the last token of row 2 is padding
    ev = evaluate_batches(moe, dense, [((), {"input_ids": ids, "attention_mask": mask}, mask)] * 8)
    # Per copy of the batch: row 1 predicts 1,0,0; row 2 predicts 0,1 (the padded position is no target).
    zeros, ones = 3, 2
    nll_dense = -(zeros * math.log(0.6) + ones * math.log(0.4)) / 5
    nll_moe = -(zeros * math.log(0.75) + ones * math.log(0.25)) / 5
    kl = 0.6 * math.log(0.6 / 0.75) + 0.4 * math.log(0.4 / 0.25)
    assert ev.kind == "causal-lm" and ev.tokens == 5 * 8
    assert ev.metrics["perplexity_dense"] == pytest.approx(math.exp(nll_dense), rel=1e-6)
    assert ev.metrics["perplexity_moe"] == pytest.approx(math.exp(nll_moe), rel=1e-6)
    assert ev.metrics["perplexity_ratio"] == pytest.approx(math.exp(nll_moe - nll_dense), rel=1e-6)
    assert ev.metrics["kl"] == pytest.approx(kl, rel=1e-5)
    assert ev.metrics["top1_agreement"] == 1.0


def test_top1_agreement_and_kl_of_disagreeing_models():
    dense = FixedForCausalLM([2.0, 0.0, 0.0])
    moe = FixedForCausalLM([0.0, 2.0, 0.0])
    ids = torch.zeros(4, 9, dtype=torch.long)
    ev = evaluate_batches(moe, dense, [((ids,), {}, None)])
    p = F.softmax(torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), 0)
    q = F.softmax(torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64), 0)
    assert ev.metrics["top1_agreement"] == 0.0
    assert ev.metrics["kl"] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert ev.tokens == 4 * 8


def test_encoder_embedding_cosine_pools_real_tokens_only():
    dense_h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # the third token is padding
    moe_h = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-9.0, 3.0]]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    ids = torch.zeros(1, 3, dtype=torch.long)
    ev = evaluate_batches(FixedEncoder(moe_h), FixedEncoder(dense_h),
                          [((), {"input_ids": ids, "attention_mask": mask}, mask)] * 16)
    # Pooled: dense (0.5, 0.5), converted (1, 0): cosine 1/sqrt(2). Per token: 1 and 0.
    assert ev.kind == "encoder"
    assert ev.metrics["embedding_cosine"] == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert ev.metrics["output_cosine"] == pytest.approx(0.5, rel=1e-6)
    assert ev.metrics["relative_error"] == pytest.approx(2 / 2, rel=1e-6)  # |(1,-1)|^2 / (|e1|^2 + |e2|^2)


def test_upcycled_model_costs_nothing_and_split_layers_are_measured_against_their_ffn():
    dense = tiny_hf_model("llama").eval()
    vocab = dense.config.vocab_size
    data = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(1))
    up = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init="upcycle"))
    ev = moefx.evaluate(up, data, dense=dense)
    assert ev.metrics["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert ev.metrics["kl"] < 1e-6 and ev.metrics["top1_agreement"] == 1.0
    assert len(ev.layers) == 2 and all(d["relative_error"] < 1e-10 for d in ev.layers)

    calib = torch.randint(0, vocab, (16, 16), generator=torch.Generator().manual_seed(2))
    split = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=1, init="split"), calib=calib)
    ev = moefx.evaluate(split, data, dense=dense)
    # The per-layer error, recomputed here: each MoE layer against its dense LlamaMLP on the same inputs.
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(a[0]))
             for name, layer in moefx.moe_layers(split)]
    with torch.no_grad():
        split(data)
        for h in hooks:
            h.remove()
        for entry in ev.layers:
            x = seen[entry["layer"]][0]
            layer = split.get_submodule(entry["layer"])
            ref = dense.get_submodule(layer.source)(x)
            expected = float((layer(x) - ref).square().sum() / ref.square().sum())
            assert entry["relative_error"] == pytest.approx(expected, rel=1e-4)
    assert ev.metrics["perplexity_ratio"] != pytest.approx(1.0, abs=1e-6)
    assert "perplexity ratio" in ev.render() and "model.layers.1.mlp" in ev.render()


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval")
    tiny_hf_model("llama").save_pretrained(path / "llama")
    result = run_cli("convert", str(path / "llama"), "--experts", "4", "--top-k", "2", "-o", str(path / "out"))
    assert result.returncode == 0, result.stderr
    return path


def test_cli_eval_prints_the_figures(converted_dir, tmp_path):
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    result = run_cli("eval", str(converted_dir / "out"), "--data", str(tmp_path / "ids.pt"), "--json")
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["kind"] == "causal-lm" and report["tokens"] == 6 * 11
    assert report["metrics"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_cli_eval_bad_data_is_one_line(converted_dir, tmp_path):
    path = tmp_path / "data.pt"
    torch.save(torch.tensor([[1, 2, 999]] * 20), path)
    assert_clean_error(run_cli("eval", str(converted_dir / "out"), "--data", str(path)),
                       "data.pt: holds token ids from 1 to 999, outside the model's vocabulary")


@pytest.mark.parametrize("case", ["missing", "too-short", "out-of-vocab", "float", "not-text"])
def test_bad_evaluation_data_is_one_clear_error(tmp_path, case):
    dense = tiny_hf_model("llama")
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2))
    data = tmp_path / "data.pt"
    if case == "too-short":
        torch.save(torch.tensor([[1, 2, 3]]), data)
        match = "has 2 tokens to compare, too few to evaluate on; give at least 32"
    elif case == "out-of-vocab":
        torch.save(torch.tensor([[1, 2, 999]] * 20), data)
        match = "outside the model's vocabulary"
    elif case == "float":
        torch.save(torch.randn(4, 16), data)
        match = "has dtype float32 but the model's input 'input_ids' is int64; pass integer token ids"
    elif case == "not-text":
        data = tmp_path / "data.txt"
        data.write_bytes(b"\xff\xfe\x00bad")
        match = "is not UTF-8 text"
    else:
        data = tmp_path / "none.txt"
        match = "no such evaluation file"
    with pytest.raises(CalibrationError, match=match):
        moefx.evaluate(moe, data, dense=dense)


def test_convert_holds_every_tenth_calibration_batch_out_and_reports_the_quality_on_them():
    dense = tiny_hf_model("llama")
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, dense.config.vocab_size, (3, 16), generator=gen) for _ in range(12)]
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=1, init="split"), calib=batches)
    quality = moe.moefx_info.quality
    assert quality["tokens"] == 3 * 15 and quality["kind"] == "causal-lm"  # batch 9 alone, 15 targets a row
    assert all(d["calibration_tokens"] == 11 * 48 for d in moe.moefx_info.layers)  # the other 11 calibrate
    # The same figures, recomputed by moefx.evaluate on the held-out batch.
    again = moefx.evaluate(moe, [batches[9]], dense=dense, max_tokens=None)
    assert quality["metrics"]["kl"] == pytest.approx(again.metrics["kl"], rel=1e-5)
    assert "quality on held-out calibration data: perplexity" in render_conversion_text(moe.moefx_info.report())
    few = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=1, init="split"), calib=batches[:9])
    assert few.moefx_info.quality is None  # under ten batches, all of them calibrate


def test_evaluate_needs_a_converted_model():
    with pytest.raises(moefx.MoefxError, match=r"needs a model converted by moefx\.convert"):
        moefx.evaluate(nn.Linear(2, 2), torch.zeros(1, 2))


def test_too_little_data_raises_before_figures():
    dense = FixedForCausalLM([0.0, 1.0])
    with pytest.raises(CalibrationError, match="too few to evaluate on"):
        evaluate_batches(dense, dense, [((torch.zeros(1, 5, dtype=torch.long),), {}, None)])
