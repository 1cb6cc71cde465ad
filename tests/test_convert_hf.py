"""Conversion of real transformers architectures and torch.nn.TransformerEncoder (random weights, no network).

For each: as many MoE layers as FFNs, upcycle + renormalised top-k reproduces the dense output on inputs other
than the example inputs, backward reaches every expert, and save -> load gives identical outputs.
"""

from __future__ import annotations

import pytest
import torch

import moefx
from moefx.capture import CapturedModule

from conftest import tiny_hf_model

# model -> number of FFNs it has (T5: encoder and decoder blocks)
ARCHS = {"bert": 2, "gpt2": 2, "llama": 2, "mistral": 2, "t5": 4, "t5-gated": 4, "vit": 2, "distilbert": 2}


def _inputs(name: str, model, batch=3, seq=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(1, 96, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding: BERT-like layers see an attention mask they did not see at capture
    if name.startswith("t5"):
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids, "attention_mask": mask}


def _first(out):
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


@pytest.mark.parametrize("name", list(ARCHS))
def test_upcycle_reproduces_dense(name):
    dense = tiny_hf_model(name)
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init="upcycle"))
    assert type(moe) is type(dense)
    assert len(moefx.moe_layers(moe)) == ARCHS[name]
    assert all(d["rule"] for d in moe.moefx_info.layers)
    inputs = _inputs(name, dense)
    with torch.no_grad():
        want = _first(dense(**inputs))
        got = _first(moe(**inputs))
    rel = (got - want).abs().max() / want.abs().max()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_half_precision_upcycle_is_reported_exact_and_a_random_init_is_not(name, dtype):
    """In fp16/bf16 the MoE's sum of expert outputs rounds differently from the dense FFN (about one unit in
    the last place): the check allows for the dtype, and still tells a conversion that changes the function."""
    dense = tiny_hf_model(name).to(dtype)
    upcycled = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2)).moefx_info.verification
    assert upcycled["exact_expected"] and upcycled["exact"], upcycled
    assert 0 < upcycled["relative_error"] <= 2 * torch.finfo(dtype).eps  # the rounding, not a looser check
    random = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init="random")).moefx_info.verification
    assert not random["exact_expected"] and not random["exact"], random
    noisy = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init_noise=0.05)).moefx_info.verification
    assert not noisy["exact_expected"] and not noisy["exact"], noisy  # small, but not rounding


def test_sequence_classifier_keeps_its_class_and_its_head():
    """BertForSequenceClassification: the encoder FFNs are converted; the pooler -> classifier pair (which
    changes the width) is not an FFN, so the model keeps its class, trains and saves like the original."""
    import transformers as tf

    torch.manual_seed(0)
    dense = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=64, vocab_size=96, num_labels=3)).eval()
    ids = torch.randint(1, 96, (2, 8))
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(ids,))
    assert type(moe) is type(dense)
    assert [d["name"] for d in moe.moefx_info.layers] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    moe.train()
    out = moe(ids, labels=torch.tensor([0, 2]))
    out.loss.backward()


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "vit"])
def test_backward_reaches_every_expert(name):
    dense = tiny_hf_model(name)
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init="random"))
    moe.train()
    inputs = _inputs(name, dense, batch=4, seq=16)
    _first(moe(**inputs)).float().pow(2).mean().backward()
    for layer_name, layer in moefx.moe_layers(moe):
        for pname, param in layer.named_parameters():
            assert param.grad is not None, f"{layer_name}.{pname} got no gradient"
        # every expert's slice of the bank got a non-zero gradient
        per_expert = layer.experts.w1.grad.abs().flatten(1).sum(1)
        assert (per_expert > 0).all(), f"{layer_name}: experts without gradient {per_expert}"
    assert moefx.aux_loss(moe).requires_grad


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_converted_causal_lm_generates_the_same_tokens(name):
    dense = tiny_hf_model(name)
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2, init="upcycle"))
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    want = dense.generate(ids, max_new_tokens=10, do_sample=False)
    got = moe.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["bert", "llama", "t5", "vit"])
def test_save_load_round_trip(name, tmp_path):
    moe = moefx.convert(tiny_hf_model(name), moefx.MoEConfig(num_experts=4, top_k=2, init="random", seed=3))
    moefx.save(moe, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out")
    assert type(loaded) is type(moe)
    assert [n for n, _ in moefx.moe_layers(loaded)] == [n for n, _ in moefx.moe_layers(moe)]
    want, got = moe.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    inputs = _inputs(name, moe)
    with torch.no_grad():
        # Not bit for bit: the loaded weights are memory-mapped (8-byte aligned), and oneDNN's GEMM on one
        # thread (the eager kernel's expert threads) may sum in another order at that alignment.
        torch.testing.assert_close(_first(loaded(**inputs)), _first(moe(**inputs)), rtol=1e-6, atol=1e-6)


def test_torch_transformer_encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    dense = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2), example_inputs=(torch.randn(2, 5, 32),))
    assert len(moefx.moe_layers(moe)) == 2
    assert all(isinstance(m, CapturedModule) for m in moe.layers)
    assert moe.layers[0].self_attn.batch_first  # the original submodules (and attributes) are kept
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
        got, want = moe(x, src_key_padding_mask=pad), dense(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], want[~pad], rtol=1e-5, atol=1e-5)
    assert moe.layers[0].num_variants == 2  # captured again for the padding mask
    moe.train()
    moe(x).sum().backward()
    assert all(p.grad is not None for _, layer in moefx.moe_layers(moe) for p in layer.parameters())


def test_a_layer_captured_again_at_batch_one_still_runs_larger_batches():
    """torch.export fixes a dim it sees at size 1: a BERT layer captured again for a new input structure at
    batch 1 ran only batch 1 after that (moefx bench crashed at --batch 1,8). Each size-1 pattern now has its
    own graph, and one captured at larger sizes serves size 1 as well."""
    dense = tiny_hf_model("bert")
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=4, top_k=2))  # upcycled, exact
    with torch.no_grad():
        for shape in [(1, 16), (2, 16), (1, 16), (2, 3), (3, 5), (1, 2)]:  # padded: a new structure
            mask = torch.ones(shape, dtype=torch.long)
            mask[0, -1] = 0
            inputs = {"input_ids": torch.randint(1, 96, shape), "attention_mask": mask}
            got, want = moe(**inputs).last_hidden_state, dense(**inputs).last_hidden_state
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    assert {m.num_variants for m in moe.modules() if isinstance(m, CapturedModule)} == {3}


@pytest.mark.parametrize("verify", [True, False])
def test_conversion_keeps_every_module_in_the_dense_models_mode(verify):
    # A captured container starts in the mode of the module it replaces: one left in training mode would
    # capture again with live dropout on the first padded batch (the example inputs have no padding).
    dense = tiny_hf_model("bert")
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=2, top_k=2), verify=verify)
    assert not any(module.training for module in moe.modules())
    inputs = _inputs("bert", dense)
    with torch.no_grad():
        torch.testing.assert_close(_first(moe(**inputs)), _first(dense(**inputs)), rtol=1e-5, atol=1e-5)


def test_captured_module_follows_train_and_eval_modes():
    dense = tiny_hf_model("bert")
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=2, top_k=2))
    inputs = _inputs("bert", dense)
    moe.train()
    torch.manual_seed(0)
    a = _first(moe(**inputs))
    torch.manual_seed(1)
    b = _first(moe(**inputs))
    assert not torch.equal(a, b)  # dropout is live in training mode
    moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(moe(**inputs)), _first(dense(**inputs)), rtol=1e-5, atol=1e-5)


def test_state_dict_keeps_original_names_for_dense_parts():
    dense = tiny_hf_model("bert")
    moe = moefx.convert(dense, moefx.MoEConfig(num_experts=2, top_k=1))
    dense_keys = set(dense.state_dict())
    moe_keys = set(moe.state_dict())
    ffn = {k for k in dense_keys if ".intermediate.dense." in k or (".output.dense." in k and "attention" not in k)}
    assert dense_keys - ffn <= moe_keys
    assert any(".moe.experts.w1" in k for k in moe_keys)


def test_an_ffn_applied_in_chunks_becomes_one_moe_layer_over_all_tokens():
    """transformers' chunk_size_feed_forward applies BERT's FFN to pieces of the sequence. moefx used to convert
    the first piece's FFN only: the other pieces ran the dense FFN, and the captured graph ran only sequences
    of the example's length. Chunking is turned off in the converted copy: one MoE call per layer on every token,
    the same output as converting the unchunked model, at any length; the caller's model keeps its chunking."""
    import transformers as tf

    from moefx.layers import MoELayer

    def bert(chunk: int):
        torch.manual_seed(0)
        return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                                          intermediate_size=64, chunk_size_feed_forward=chunk)).eval()

    ids = torch.randint(1, 96, (2, 6))
    config = moefx.MoEConfig(num_experts=4, top_k=2, init="random")
    chunked = bert(2)
    got, want = moefx.convert(chunked, config, example_inputs=(ids,)), moefx.convert(bert(0), config, example_inputs=(ids,))
    assert chunked.encoder.layer[0].chunk_size_feed_forward == 2
    rows = []
    for module in got.modules():
        if isinstance(module, MoELayer):
            module.register_forward_pre_hook(lambda _, args: rows.append(args[0].numel() // args[0].shape[-1]))
    with torch.no_grad():
        for x in (ids, torch.randint(1, 96, (3, 10))):
            assert torch.equal(got(x).last_hidden_state, want(x).last_hidden_state)
    assert rows == [12, 12, 30, 30]
    # inspect (the analysis heal and the streamed plan use too) sees the FFNs convert converts, and leaves the
    # model's chunking as it was
    assert [f.name for f in moefx.analyze(chunked, (ids,)).ffns] == [f"encoder.layer.{i}" for i in range(2)]
    assert chunked.encoder.layer[0].chunk_size_feed_forward == 2
