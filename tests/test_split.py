"""init='split' and 'lora', calibration and healing, each checked against the dense model or the math."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import moefx
from moefx import MoEConfig
from moefx.calibrate import calibration_batches, record_ffns
from moefx.errors import CalibrationError, ConfigError
from moefx.split import balanced_kmeans

from conftest import tiny_hf_model

ARCHS = ["bert", "gpt2", "llama", "t5-gated"]  # GELU, Conv1D + gelu_new, SwiGLU, gated GELU


def _ids(seed: int, batch: int = 3, seq: int = 7) -> torch.Tensor:
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _run(model, ids):
    kwargs = {"input_ids": ids}
    if "T5" in type(model).__name__:
        kwargs["decoder_input_ids"] = ids[:, :4]
    with torch.no_grad():
        out = model(**kwargs)
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("partition, shared", [("random", 0), ("cluster", 0), ("cluster", 2)])
def test_split_with_every_expert_active_is_the_dense_model(name, partition, shared):
    dense = tiny_hf_model(name)
    config = MoEConfig(init="split", num_experts=8 - shared, top_k=8 - shared, shared_experts=shared,
                       partition=partition)
    moe = moefx.convert(dense, config)
    assert _rel(_run(moe, _ids(1)), _run(dense, _ids(1))) <= 1e-5
    assert moe.moefx_info.verification["exact_expected"] and moe.moefx_info.verification["exact"]


def test_split_with_calibration_and_every_expert_active_is_exact():
    dense = tiny_hf_model("llama")
    config = MoEConfig(init="split", num_experts=6, top_k=6, shared_experts=2)
    moe = moefx.convert(dense, config, calib=_ids(5, batch=16, seq=9))
    assert moe.moefx_info.layers[0]["partition"] == "coactivation"
    assert _rel(_run(moe, _ids(1)), _run(dense, _ids(1))) <= 1e-5


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_lora_experts_are_exact_at_init_and_train_only_adapters_and_router(name):
    dense = tiny_hf_model(name)
    moe = moefx.convert(dense, MoEConfig(init="lora", num_experts=4, top_k=2, lora_rank=4))
    assert _rel(_run(moe, _ids(1)), _run(dense, _ids(1))) <= 1e-5
    layer = moefx.moe_layers(moe)[0][1]
    assert not any(p.requires_grad for p in layer.experts.parameters())  # the dense FFN is frozen
    moe.train()
    kwargs = {"input_ids": _ids(2)}
    moe(**kwargs)[0].float().square().mean().backward()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in layer.named_parameters() if p.grad is not None}
    assert {"up_b", "down_b", "router.gate.weight"} <= trainable
    assert all(float(p.grad.abs().sum()) > 0 for n, p in layer.named_parameters() if n.endswith("_b"))


@pytest.mark.parametrize(("name", "capacity_factor"), [("bert", None), ("llama", None), ("llama", 0.5)])
def test_lora_layer_is_the_moelora_formula_token_by_token(name, capacity_factor):
    """With non-zero adapters, a LoRA layer equals the formula evaluated token by token:
    h = act(W1 x + b1 + sum_j g_j B1_j A1_j x) [* (W3 x + b3 + sum_j g_j B3_j A3_j x)],
    y = W2 h + b2 + sum_j g_j B2_j A2_j h, over the token's routed experts j (dropped ones add nothing)."""
    from moefx.activations import ACTIVATIONS

    config = MoEConfig(init="lora", num_experts=4, top_k=2, lora_rank=3, capacity_factor=capacity_factor)
    layer = moefx.moe_layers(moefx.convert(tiny_hf_model(name), config))[0][1].eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in (layer.up_b, layer.gate_up_b, layer.down_b):
            if adapter is not None:
                adapter.copy_(torch.randn(adapter.shape, generator=g) * 0.3)
    x = torch.randn(2, 9, layer.experts.in_features, generator=g)
    with torch.no_grad():
        got = layer(x).reshape(-1, layer.experts.out_features).double()
        routing = layer.router(x.reshape(-1, x.shape[-1]), 9)
    if capacity_factor is not None:
        assert bool((routing.expert_index < 0).any())  # some assignments were dropped
    d = {n: (None if t is None else t.detach().double()) for n, t in zip(("w1", "b1", "w3", "b3", "w2", "b2"),
                                                                             layer.experts.weights())}
    act = ACTIVATIONS[layer.experts.activation]

    def proj(w, b, v):
        return w[0] @ v + (0 if b is None else b[0])

    def adapters(a, b, v, t):
        return sum(float(routing.combine_weight[t, j]) * (b[e].double() @ (a[e].double() @ v))
                   for j, e in enumerate(routing.expert_index[t].tolist()) if e >= 0)

    for t, row in enumerate(x.reshape(-1, x.shape[-1]).double()):
        h = act(proj(d["w1"], d["b1"], row) + adapters(layer.up_a, layer.up_b, row, t))
        if d["w3"] is not None:
            h = h * (proj(d["w3"], d["b3"], row) + adapters(layer.gate_up_a, layer.gate_up_b, row, t))
        want = proj(d["w2"], d["b2"], h) + adapters(layer.down_a, layer.down_b, h, t)
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["split", "lora"])
def test_split_and_lora_models_save_and_load_bit_identically(init, tmp_path):
    dense = tiny_hf_model("llama")
    config = MoEConfig(init=init, num_experts=4, top_k=2, **({"shared_experts": 0} if init == "split" else {}))
    moe = moefx.convert(dense, config, calib=_ids(5, batch=8) if init == "split" else None)
    moefx.save(moe, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out")
    assert torch.equal(_run(loaded, _ids(3)), _run(moe, _ids(3)))


# ---------------------------------------------------------------------------------------------------------
# The partition and the layer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [0, 2])
def test_split_experts_hold_exactly_the_dense_ffns_neurons(shared):
    dense = tiny_hf_model("bert")
    layer = moefx.moe_layers(moefx.convert(dense, MoEConfig(init="split", num_experts=8 - shared, top_k=2,
                                                            shared_experts=shared)))[0][1]
    ffn = dense.encoder.layer[0]
    w1, w2 = ffn.intermediate.dense.weight, ffn.output.dense.weight  # [64, 32], [32, 64]
    rows = [layer.experts.w1[e] for e in range(layer.num_experts)]
    cols = [layer.experts.w2[e] for e in range(layer.num_experts)]
    if shared:
        rows.append(layer.shared.w1[0])
        cols.append(layer.shared.w2[0])
    rows, cols = torch.cat(rows), torch.cat(cols, dim=1)
    assert rows.shape == w1.shape and cols.shape == w2.shape  # total parameters are the dense FFN's
    # Every neuron exactly once: a permutation of the dense rows, with its down-projection column alongside.
    match = (rows[:, None, :] == w1[None, :, :]).all(-1).float()  # [64, 64]
    assert torch.equal(match.sum(0), torch.ones(64)) and torch.equal(match.sum(1), torch.ones(64))
    perm = match.argmax(1)
    assert torch.equal(cols, w2[:, perm])


def test_balanced_kmeans_recovers_planted_groups():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 10
    labels = torch.arange(64) % 4
    points = centers[labels] + torch.randn(64, 16, generator=g) * 0.1
    groups = balanced_kmeans(points, 4, torch.Generator().manual_seed(1))
    assert groups.shape == (4, 16)
    assert sorted(groups.flatten().tolist()) == list(range(64))
    for group in groups:
        assert len(set(labels[group].tolist())) == 1


def test_calibrated_router_predicts_the_experts_with_the_most_activation_mass():
    from moefx.split import oracle_choice, route

    dense = tiny_hf_model("llama")
    calib = _ids(7, batch=32, seq=12)
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=8, top_k=2), calib=calib)
    layer = moefx.moe_layers(moe)[0][1]
    # The dense FFN's inputs on held-out tokens, and the experts the dense activations say are best.
    x = record_inputs(dense, _ids(8, batch=32, seq=12))  # held-out tokens
    ffn = dense.model.layers[0].mlp
    h = F.silu(ffn.gate_proj(x)) * ffn.up_proj(x)  # [N, 64]
    groups = torch.stack([_neurons_of(layer.experts.w1[e], ffn.gate_proj.weight) for e in range(8)])
    best = oracle_choice(torch.stack([(h[:, g] @ ffn.down_proj.weight[:, g].T).norm(dim=-1) for g in groups], 1), 2)
    chosen = route(layer.router.gate.weight.detach(), layer.router.gate.bias.detach(), x, 2)
    recall = float((best * chosen).sum() / best.sum())
    assert recall >= 0.5, recall  # a random router gets 2/8 = 0.25


def _neurons_of(rows: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
    return (rows[:, None, :] == dense_rows[None]).all(-1).float().argmax(1)


def record_inputs(dense, ids) -> torch.Tensor:
    rows = []
    handle = dense.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        dense(input_ids=ids)
    handle.remove()
    return torch.cat(rows)


def test_compensation_makes_the_mean_output_on_calibration_tokens_the_dense_mean():
    # c_e is expert e's mean output where the router skips it, so over those tokens the skipped experts'
    # total is exactly what the compensation adds: the layer's mean output equals the dense FFN's.
    dense = tiny_hf_model("bert")
    ids = _ids(11, batch=8, seq=6)
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=8, top_k=2), calib=ids, calib_tokens=10_000)
    ffn = dense.encoder.layer[0]
    x = record_bert_ffn_inputs(dense, ids)
    layer = moefx.moe_layers(moe)[0][1]
    with torch.no_grad():
        want = ffn.output.dense(ffn.intermediate(x)).mean(0)
        got = layer(x).mean(0)
        plain = layer(x).mean(0) - layer.bias + ffn.output.dense.bias  # without any compensation
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float((plain - want).abs().max()) > 10 * float((got - want).abs().max())


def record_bert_ffn_inputs(dense, ids) -> torch.Tensor:
    rows = []
    handle = dense.encoder.layer[0].intermediate.register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    with torch.no_grad():
        dense(input_ids=ids)
    handle.remove()
    return torch.cat(rows).reshape(-1, 32)


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


def _targets(dense, config):
    analysis = moefx.analyze(dense)
    from moefx.experts import layer_generator

    moe = moefx.convert(dense, config)
    return moe, {name: (analysis.ffns[i].match, layer_generator(config, i, 3))
                 for i, (name, _) in enumerate(moefx.moe_layers(moe))}


def test_calibration_sample_is_bounded_deterministic_and_skips_padding():
    dense = tiny_hf_model("bert")
    config = MoEConfig(init="split", num_experts=4, top_k=2)
    ids = _ids(3, batch=40, seq=9)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0  # three padding tokens per row
    data = {"input_ids": ids, "attention_mask": mask}

    def sample(max_tokens):
        moe, targets = _targets(dense, config)
        batches = calibration_batches(data, moe, moe.moefx_info.inputs, batch_size=8)
        return record_ffns(moe, targets, batches, max_tokens=max_tokens)

    full, small, again = sample(10_000), sample(50), sample(50)
    for name in full:
        assert full[name].tokens == small[name].tokens == int(mask.sum())  # every real token counted
        assert full[name].inputs.shape == (int(mask.sum()), 32)  # all kept when they fit
        assert small[name].inputs.shape == (50, 32)  # bounded
        assert torch.equal(small[name].inputs, again[name].inputs)  # deterministic for a seed
        # the sample is made of real rows, in order
        index = (small[name].inputs[:, None, :] == full[name].inputs[None]).all(-1).float().argmax(1)
        assert torch.equal(full[name].inputs[index], small[name].inputs) and bool((index.diff() > 0).all())


def test_calibration_streams_an_iterable_it_never_holds_whole():
    dense = tiny_hf_model("bert")
    moe, targets = _targets(dense, MoEConfig(init="split", num_experts=4, top_k=2))
    alive = []

    def batches():  # 100 batches made on demand; the recorder must keep at most max_tokens rows of them
        for i in range(100):
            alive.append(i)
            yield {"input_ids": _ids(i, batch=2, seq=5)}

    samples = record_ffns(moe, targets, calibration_batches(batches(), moe, None), max_tokens=64)
    assert len(alive) == 100
    assert all(s.tokens == 1000 and s.inputs.shape == (64, 32) for s in samples.values())


def test_text_calibration_uses_the_models_tokenizer_when_it_has_one(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "moe"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    text = tmp_path / "calib.txt"
    text.write_text("hello world\n\nmoe hello moe\n")
    dense = tiny_hf_model("bert")
    batches = list(calibration_batches(text, dense, None, tokenizer=tokenizer))
    assert len(batches) == 1
    _, kwargs, mask = batches[0]
    want = tokenizer(["hello world", "moe hello moe"], padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(kwargs["input_ids"], want["input_ids"]) and kwargs["input_ids"].shape[1] > 2
    assert torch.equal(mask, want["attention_mask"].bool())


def test_an_encoder_decoder_model_calibrates_on_plain_token_ids(tmp_path):
    """T5 from token ids alone (a tensor, a .txt file): the decoder reads the ids shifted right behind its start
    token, so every decoder FFN is calibrated too, for convert and for partition's routing statistics."""
    from moefx.placement.stats import calibration_batches as placement_batches
    from moefx.placement.stats import record_stats

    dense = tiny_hf_model("t5")
    ids = _ids(3, batch=8, seq=9)
    (_, kwargs, _), = calibration_batches(ids, dense, None, batch_size=8)
    start = dense.config.pad_token_id  # T5 starts its decoder with the padding token
    assert torch.equal(kwargs["decoder_input_ids"], torch.cat([torch.full((8, 1), start), ids[:, :-1]], dim=1))
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox\njumps over the lazy dog today\n")
    (_, kwargs, mask), = calibration_batches(text, dense, None)
    assert kwargs["decoder_input_ids"].shape == kwargs["input_ids"].shape == mask.shape == (2, 6)
    (args, kwargs, _), = calibration_batches([(ids, torch.ones_like(ids))], dense, None)  # positional (ids, mask)
    assert len(args) == 2 and torch.equal(kwargs["decoder_input_ids"][:, 1:], ids[:, :-1])
    dense(*args, **kwargs)
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=4, top_k=2), calib=ids)
    assert [d["partition"] for d in moe.moefx_info.layers] == ["coactivation"] * 4  # 2 encoder + 2 decoder
    torch.save(ids, tmp_path / "ids.pt")
    stats = record_stats(moe, placement_batches(moe, tmp_path / "ids.pt"))
    assert stats.tokens.tolist() == [72.0] * 4
    stats = record_stats(moe, placement_batches(moe, text))  # padding tokens are not counted
    assert stats.tokens.tolist() == [10.0] * 4


@pytest.mark.parametrize("data, says", [
    (torch.randn(4, 6), "dtype float32"),
    (torch.randint(0, 9, (4,)), "has 2 dimensions"),
    (torch.full((2, 3), 500), "outside the model's vocabulary"),
    ({"pixel_values": torch.randn(2, 3)}, "batch 0 failed in the model"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(3, 3)}, "different numbers of rows"),
    (42, "not supported"),
])
def test_unusable_calibration_data_is_a_clear_error(data, says):
    dense = tiny_hf_model("bert")
    with pytest.raises(CalibrationError, match=says):
        moefx.convert(dense, MoEConfig(init="split", num_experts=4, top_k=2), calib=data)


# ---------------------------------------------------------------------------------------------------------
# Healing
# ---------------------------------------------------------------------------------------------------------


def test_healing_leaves_an_exact_layer_exactly_as_it_was():
    dense = tiny_hf_model("llama")
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=4, top_k=4))
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    report = moefx.heal(moe, _ids(4, batch=8), dense=dense)
    assert [r["method"] for r in report] == ["exact", "exact"]
    after = moe.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_healing_lowers_every_layers_error_and_brings_the_model_closer(name):
    dense = tiny_hf_model(name)
    calib = _ids(6, batch=200, seq=12)
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=8, top_k=2))  # weight-only: far from dense
    config = MoEConfig(init="split", num_experts=8, top_k=2)
    _, targets = _targets(dense, config)
    held_out = record_ffns(moe, targets, calibration_batches(_ids(99, batch=16, seq=10), moe, moe.moefx_info.inputs))

    def errors(model):  # each layer against its dense FFN on held-out inputs of the dense model
        out = {}
        for name, (match, _) in targets.items():
            x = held_out[name].inputs
            with torch.no_grad():
                want = F.linear(F.silu(F.linear(x, match.up_weight)) * F.linear(x, match.gate_up_weight),
                                match.down_weight) if match.gated else \
                    F.linear(F.gelu(F.linear(x, match.up_weight, match.up_bias)), match.down_weight, match.down_bias)
                out[name] = float((model.get_submodule(name)(x) - want).square().mean() / want.square().mean())
        return out

    before = errors(moe)
    solved = copy.deepcopy(moe)
    report = moefx.heal(solved, calib, dense=dense, steps=0)
    assert {r["method"] for r in report} == {"least-squares"}
    assert all(r["kept"] == ["least-squares"] and r["error_after"] < r["error_before"] for r in report), report
    report = moefx.heal(moe, calib, dense=dense)
    assert {r["method"] for r in report} == {"least-squares + gradient"}
    assert all("least-squares" in r["kept"] and r["error_after"] < r["error_before"] for r in report), report
    assert any("gradient" in r["kept"] for r in report), report
    after, after_solve = errors(moe), errors(solved)
    assert all(after[name] < before[name] for name in before), (before, after)
    # the gradient stage refines the least-squares fit: on data it never saw, too
    assert sum(after.values()) < sum(after_solve.values()), (after_solve, after)
    assert moe.moefx_info.healing == report


def test_least_squares_healing_reaches_the_least_squares_optimum_and_keeps_unreached_experts():
    """The closed-form stage against ``torch.linalg.lstsq`` on the design matrix written here from the layer's
    math (top-k experts with weight 1, a shared expert, per-expert and layer biases): its training error is the
    optimum's, whatever the scale of the hidden units (small activations made a shared ridge pin the experts),
    and an expert no row is routed to keeps its down projection."""
    heal_module = importlib.import_module("moefx.heal")
    dense = tiny_hf_model("llama")
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=6, top_k=2, shared_experts=2))
    name, layer = moefx.moe_layers(moe)[0]
    mlp = dense.get_submodule(name)
    x = torch.randn(600, 32, generator=torch.Generator().manual_seed(0)).abs() * 0.05  # small activations
    with torch.no_grad():
        layer.router.gate.weight[0] = -1.0  # expert 0: never chosen for these (positive) inputs
        y = mlp(x)
        bank, shared = layer.experts, layer.shared
        chosen = layer.router(x, None).expert_index
        assert not (chosen == 0).any()
        mask = torch.zeros(600, 6).scatter_(1, chosen, 1.0)
        hidden = [F.silu(x @ bank.w1[e].T) * (x @ bank.w3[e].T) * mask[:, e:e + 1] for e in range(6)]
        design = torch.cat([*hidden, F.silu(x @ shared.w1[0].T) * (x @ shared.w3[0].T), mask, torch.ones(600, 1)], 1)
        optimum = torch.linalg.lstsq(design.double(), y.double(), driver="gelsd").solution  # SVD: any rank
        best = float((design.double() @ optimum - y).square().mean() / y.square().mean())
        w2_unreached = bank.w2[0].clone()
        before = heal_module._error(layer, x, y)
        heal_module._fit_split(layer, x, y, refit_router=False)
        after = heal_module._error(layer, x, y)
    assert after <= best * 1.01 + 1e-7, (before, after, best)
    torch.testing.assert_close(bank.w2[0], w2_unreached, rtol=1e-6, atol=0)


def test_healing_refuses_a_dense_model_that_is_not_the_source():
    """Another checkpoint of the same architecture, the source in another dtype, or with another activation:
    one clear error, and the converted model is left as it was."""
    dense = tiny_hf_model("llama")
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=4, top_k=2))
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(ConfigError, match=r"not the one this model was converted from: its 'model\.embed_tokens"):
        moefx.heal(moe, _ids(4, batch=8), dense=tiny_hf_model("llama", seed=1))
    with pytest.raises(ConfigError, match=r"dense model is in bfloat16 .* pass the dense model in float32"):
        moefx.heal(moe, _ids(4, batch=8), dense=copy.deepcopy(dense).to(torch.bfloat16))
    relu = copy.deepcopy(dense)  # the same weights, another activation
    for layer in relu.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    with pytest.raises(ConfigError, match=r"is a 32->32 gated relu FFN in the dense model but was a 32->32 gated silu"):
        moefx.heal(moe, _ids(4, batch=8), dense=relu)
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())
    assert moefx.heal(moe, _ids(4, batch=8), dense=dense, steps=0)  # the source itself


def test_healing_needs_rows_to_hold_out():
    """Fewer than 10 rows per layer: no tenth to hold out, so a fit would be judged on its own rows (and kept)."""
    from moefx.errors import CalibrationError

    dense = tiny_hf_model("llama")
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=4, top_k=2))
    with pytest.raises(CalibrationError, match=r"at least 10 input rows per layer .* got 3"):
        moefx.heal(moe, _ids(4, batch=8), dense=dense, calib_tokens=3)
    with pytest.raises(CalibrationError, match="at least 10 input rows"):
        moefx.convert(dense, MoEConfig(init="split", num_experts=4, top_k=2), calib=_ids(4, batch=8), heal=True,
                      calib_tokens=3)


def test_healing_accepts_the_source_when_its_checkpoint_lacks_a_head(tmp_path):
    """A BertForSequenceClassification read from a BertModel checkpoint: its classifier is initialised at random
    on every load, so the source heal loads again differs there, and only there. That is still the source."""
    import json

    from moefx.sources import load_source

    tiny_hf_model("bert").save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    source = load_source(tmp_path / "bert")
    moe = moefx.convert(source.model, MoEConfig(init="split", num_experts=4, top_k=2), source=source.to_dict())
    assert not torch.equal(moe.classifier.weight, load_source(tmp_path / "bert").model.classifier.weight)
    report = moefx.heal(moe, _ids(4, batch=8), steps=0)  # the recorded source, loaded again
    assert [r["method"] for r in report] == ["least-squares", "least-squares"]


def test_masked_dense_refinement_runs_the_layers_own_function():
    """The healing's gradient stage trains a masked dense FFN: it must compute exactly what the layer does."""
    heal_module = importlib.import_module("moefx.heal")
    dense = tiny_hf_model("llama")  # gated, with a shared expert and a layer bias
    moe = moefx.convert(dense, MoEConfig(init="split", num_experts=6, top_k=2, shared_experts=2))
    _, layer = moefx.moe_layers(moe)[0]
    with torch.no_grad():
        layer.bias.normal_()
        layer.experts.b2.normal_()
        x = torch.randn(50, layer.experts.in_features)
        names = ("w1", "b1", "w3", "b3", "w2", "b2")
        out = layer.bias.clone()
        for bank, mask in ((layer.experts, heal_module._routing_mask(layer, x)), (layer.shared, torch.ones(50, 1))):
            out = out + heal_module._masked_dense({n: getattr(bank, n) for n in names}, bank.activation, x, mask)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)


def test_healing_by_gradient_for_experts_that_are_not_split():
    dense = tiny_hf_model("bert")
    moe = moefx.convert(dense, MoEConfig(init="upcycle", num_experts=4, top_k=2, init_noise=0.5))
    report = moefx.heal(moe, _ids(6, batch=32, seq=10), dense=dense)
    assert {r["method"] for r in report} == {"gradient"}
    assert all(r["error_after"] <= r["error_before"] for r in report)
    assert any(r["kept"] for r in report)


def test_convert_with_heal_needs_calibration_data():
    with pytest.raises(ConfigError, match="calib"):
        moefx.convert(tiny_hf_model("bert"), MoEConfig(init="split", num_experts=4, top_k=2), heal=True)


def test_a_lazily_loaded_split_model_saves_again_and_partitions(tmp_path):
    # The example model ties lm_head to the embeddings; a lazy load maps every weight from one file.
    from pathlib import Path

    from moefx.placement.planner import model_fingerprint, plan_placement
    from moefx.placement.shards import write_partition
    from moefx.placement.stats import calibration_batches as placement_batches
    from moefx.placement.stats import record_stats
    from moefx.sources import load_source

    source = load_source(Path(__file__).parent.parent / "examples" / "models" / "tiny-llama")
    moe = moefx.convert(source.model, MoEConfig(init="split", num_experts=4, top_k=2), inplace=True,
                        source=source.to_dict())
    moefx.save(moe, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out")
    moefx.save(loaded, tmp_path / "again")
    again = moefx.load(tmp_path / "again")
    ids = _ids(4)
    assert torch.equal(again(input_ids=ids).logits, moe(input_ids=ids).logits)
    stats = record_stats(loaded, placement_batches(loaded, None))
    plan = plan_placement(stats, 2, fingerprint=model_fingerprint(loaded))
    write_partition(loaded, plan, tmp_path / "plan", stats=stats, picture=False)
    assert sorted(p.name for p in (tmp_path / "plan").glob("rank-*.safetensors")) == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]


def test_lora_experts_are_not_placed_on_devices():
    from moefx.errors import MoefxError
    from moefx.placement.stats import calibration_batches as placement_batches
    from moefx.placement.stats import record_stats

    moe = moefx.convert(tiny_hf_model("llama"), MoEConfig(init="lora", num_experts=4, top_k=2))
    with pytest.raises(MoefxError, match="low-rank adapters"):
        record_stats(moe, placement_batches(moe, None))
