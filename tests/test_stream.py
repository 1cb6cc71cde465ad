"""Streaming conversion (moefx.stream): byte equality with convert + save, shards, lazy load, resume, memory."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

import moefx
from moefx.checkpoint import ShardWriter, lazy_state_dict
from moefx.cli import main
from moefx.sources import load_source
from moefx.stream import plan_stream, run_stream
from moefx.zoo import write_random_checkpoint

REPORTS = {"report.json", "report.md"}  # hold timings and the dense-vs-MoE check, so they differ run to run


def _llama_config(tied: bool = False, **kw):
    import transformers as tf

    args = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=96, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])
    args.update(kw)
    return tf.LlamaConfig(**args)


def _hf_dir(root: Path, name: str, dtype=torch.bfloat16) -> Path:
    """A small Hugging Face model directory written by save_pretrained (random weights)."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        model = tf.LlamaForCausalLM(_llama_config())
    elif name == "llama-tied":
        model = tf.LlamaForCausalLM(_llama_config(tied=True))
    elif name == "gpt2":  # Conv1D: weights stored transposed, read through a strided view
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, bos_token_id=0,
                                                 eos_token_id=0, pad_token_id=0))
    elif name == "bert-chunked":  # its FFN applied to the sequence in chunks (turned off by the conversion)
        model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                                           intermediate_size=64, chunk_size_feed_forward=2))
    elif name == "gpt-neox":  # its checkpoint names the head embed_out, which transformers renames lm_head
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, vocab_size=96))
    elif name == "phi3":  # one fused gate_up projection, split into two halves
        model = tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=64, vocab_size=96,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model = model.to(dtype).eval()
    model.config.dtype = dtype
    path = root / name
    model.save_pretrained(path)
    return path


def _in_memory(src: Path, out: Path, config: moefx.MoEConfig) -> torch.nn.Module:
    """What `moefx convert` does without --stream."""
    source = load_source(src)
    model = moefx.convert(source.model, config, None, example_kwargs=None, inplace=True, source=source.to_dict())
    moefx.save(model, out)
    return model


def _same_files(a: Path, b: Path, skip=REPORTS) -> list[str]:
    names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
    return [n for n in names if n not in skip and not (
        (a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, shallow=False))]


def test_shard_writer_writes_what_safetensors_writes(tmp_path):
    tensors = {"w.b": torch.randn(3, 2).bfloat16(), "w.a": torch.randn(4), "ids": torch.arange(5),
               "empty": torch.zeros(0, 3), "mask": torch.tensor([True, False]), "h": torch.randn(2).half(),
               "i32": torch.ones(2, dtype=torch.int32), "u8": torch.ones(3, dtype=torch.uint8)}
    for metadata in (None, {"lm_head.weight": "embed.weight"}):
        writer = ShardWriter(tmp_path / "x.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                             metadata)
        for name in list(writer.order):
            writer.write(name, tensors[name])
        writer.commit()
        assert (tmp_path / "x.safetensors").read_bytes() == safetensors_save(tensors, metadata=metadata)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("arch", "init"), [("llama", "upcycle"), ("llama", "random"), ("llama-tied", "upcycle"),
                                            ("gpt2", "random"), ("phi3", "upcycle"), ("bert-chunked", "random"),
                                            ("gpt-neox", "upcycle")])
def test_streamed_output_equals_in_memory_conversion_byte_for_byte(tmp_path, arch, init):
    src = _hf_dir(tmp_path, arch)
    config = moefx.MoEConfig(num_experts=4, top_k=2, init=init, expert_size=16 if init == "random" else None, seed=3)
    _in_memory(src, tmp_path / "memory", config)
    plan = plan_stream(src, config)
    result = run_stream(plan, tmp_path / "streamed")
    assert result.shards_written == 1 and result.bytes_read > 0
    assert sorted(os.listdir(tmp_path / "memory")) == sorted(os.listdir(tmp_path / "streamed"))
    assert _same_files(tmp_path / "memory", tmp_path / "streamed") == []  # model.safetensors, recipe, config...
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("calibrated", [False, True])
def test_streamed_split_equals_in_memory_split_byte_for_byte(tmp_path, calibrated):
    # Calibration streams too: the batches go through one decoder layer at a time, and each FFN keeps the
    # same seeded sample of its inputs that the in-memory conversion keeps.
    from moefx.stream import calibrate_stream

    src = _hf_dir(tmp_path, "llama", dtype=torch.float32)
    config = moefx.MoEConfig(num_experts=3, top_k=1, shared_experts=1, init="split", seed=1)
    calib = None
    if calibrated:
        ids = torch.randint(1, 96, (12, 7), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[::2, 5:] = 0  # padding is left out of both samples
        calib = {"input_ids": ids, "attention_mask": mask}
    source = load_source(src)
    # --stream builds each layer from the dense model's inputs: the in-memory conversion without the refit in order.
    model = moefx.convert(source.model, config, inplace=True, source=source.to_dict(), calib=calib, calib_tokens=40,
                          sequential=False)
    moefx.save(model, tmp_path / "memory")
    plan = plan_stream(src, config)
    calibration = calibrate_stream(plan, calib, calib_tokens=40) if calibrated else None
    run_stream(plan, tmp_path / "streamed", calibration=calibration)
    assert _same_files(tmp_path / "memory", tmp_path / "streamed") == []


def test_sharded_output_loads_lazily_with_the_same_tensors_and_outputs(tmp_path):
    src = _hf_dir(tmp_path, "llama-tied")
    config = moefx.MoEConfig(num_experts=4, init="random", expert_size=16)
    memory = _in_memory(src, tmp_path / "memory", config)
    plan = plan_stream(src, config, max_shard_size="20KB")
    run_stream(plan, tmp_path / "streamed")
    out = tmp_path / "streamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == len(plan.shard_files) > 2
    recipe = json.loads((out / "recipe.json").read_text())
    assert set(shards) | {"model.safetensors.index.json", "config.json"} == set(recipe["files"])
    streamed, _ = lazy_state_dict(out)
    for name, value in memory.state_dict().items():
        if name in streamed:
            assert torch.equal(streamed[name].view(torch.uint8), value.contiguous().view(torch.uint8)), name
    loaded = moefx.load(out)
    sizes = {os.path.getsize(out / f) for f in shards}
    assert all(p.untyped_storage().nbytes() in sizes for p in loaded.parameters())  # views of mapped files
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, memory(ids).logits)
    eager = moefx.load(out, lazy=False)
    with torch.no_grad():
        assert torch.equal(eager(ids).logits.to(torch.bfloat16), memory(ids).logits)


@pytest.mark.parametrize("init", ["split", "random"])
def test_streamed_healing_equals_in_memory_healing_byte_for_byte(tmp_path, init):
    """--stream --heal heals each layer right after building it, on the same samples of the dense inputs as
    convert(heal=True): the same bytes, and the same per-layer report."""
    from moefx.stream import calibrate_stream

    src = _hf_dir(tmp_path, "llama", dtype=torch.float32)
    extra = {"shared_experts": 1} if init == "split" else {"expert_size": 16}
    config = moefx.MoEConfig(num_experts=3, top_k=1, init=init, seed=1, **extra)
    ids = torch.randint(1, 96, (48, 8), generator=torch.Generator().manual_seed(0))
    calib = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    source = load_source(src)
    model = moefx.convert(source.model, config, inplace=True, source=source.to_dict(), calib=calib,
                          calib_tokens=300, heal=True, heal_steps=60, sequential=False)
    moefx.save(model, tmp_path / "memory")
    plan = plan_stream(src, config)
    if init == "split":
        samples = {"calibration": calibrate_stream(plan, calib, calib_tokens=300)}
    else:
        samples = {"heal_inputs": calibrate_stream(plan, calib, calib_tokens=300, for_healing=True)}
    run_stream(plan, tmp_path / "streamed", heal_steps=60, **samples)
    assert _same_files(tmp_path / "memory", tmp_path / "streamed") == []
    report = json.loads((tmp_path / "streamed" / "report.json").read_text())["healing"]
    assert report == json.loads(json.dumps(model.moefx_info.healing))
    assert len(report) == 3 and all(entry["kept"] and entry["error_after"] < entry["error_before"] for entry in report)


def test_streamed_healing_resumes_after_a_crash_with_the_same_bytes_and_report(tmp_path):
    """A crash part-way through --stream --heal, then a resume: layers in finished shards keep their healing
    report entries, the rest are healed again, and bytes and report equal an uninterrupted run's."""
    from moefx.stream import calibrate_stream

    src = _hf_dir(tmp_path, "llama", dtype=torch.float32)
    config = moefx.MoEConfig(num_experts=3, top_k=1, init="random", expert_size=16, seed=1)
    ids = torch.randint(1, 96, (48, 8), generator=torch.Generator().manual_seed(0))
    calib = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def stream(out, **kwargs):
        plan = plan_stream(src, config, max_shard_size="20KB")
        inputs = calibrate_stream(plan, calib, calib_tokens=300, for_healing=True)
        return plan, run_stream(plan, out, heal_steps=30, heal_inputs=inputs, **kwargs)

    plan, _ = stream(tmp_path / "reference")
    assert len(plan.shard_files) >= 3
    with pytest.raises(KeyboardInterrupt):
        stream(tmp_path / "out", crash_after_shards=2)
    _, result = stream(tmp_path / "out")
    assert result.shards_kept == 2
    assert _same_files(tmp_path / "reference", tmp_path / "out") == []
    reports = [json.loads((tmp_path / d / "report.json").read_text())["healing"] for d in ("reference", "out")]
    assert reports[0] == reports[1] and len(reports[0]) == 3


def test_resume_after_a_crash_gives_the_same_bytes(tmp_path):
    src = tmp_path / "src"
    write_random_checkpoint(src, _llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                               vocab_size=128), max_shard_size=40_000)
    config = moefx.MoEConfig(num_experts=4, init="random", expert_size=32)
    run_stream(plan_stream(src, config, max_shard_size="30KB"), tmp_path / "reference")

    plan = plan_stream(src, config, max_shard_size="30KB")
    assert len(plan.shard_files) >= 4
    with pytest.raises(KeyboardInterrupt):
        run_stream(plan, tmp_path / "out", crash_after_shards=3)
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists() and partial.is_dir()
    done = json.loads((partial / "stream-state.json").read_text())["done"]
    assert len(done) == 3 and not list(partial.glob("*.tmp"))
    # A crash in the middle of a shard leaves only a .tmp file; a damaged finished shard is written again.
    (partial / f"{plan.shard_files[3]}.tmp").write_bytes(b"half a shard")
    damaged = partial / plan.shard_files[1]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")

    result = run_stream(plan_stream(src, config, max_shard_size="30KB"), tmp_path / "out")
    assert result.shards_kept == 2 and result.shards_written == len(plan.shard_files) - 2
    assert not partial.exists()
    assert _same_files(tmp_path / "reference", tmp_path / "out") == []


def test_a_partial_conversion_of_another_config_is_started_over(tmp_path):
    src = _hf_dir(tmp_path, "llama")
    config = moefx.MoEConfig(num_experts=4, init="random", expert_size=16)
    with pytest.raises(KeyboardInterrupt):
        run_stream(plan_stream(src, config, max_shard_size="20KB"), tmp_path / "out", crash_after_shards=1)
    other = config.replace(seed=1)
    result = run_stream(plan_stream(src, other, max_shard_size="20KB"), tmp_path / "out")
    assert result.shards_kept == 0
    run_stream(plan_stream(src, other, max_shard_size="20KB"), tmp_path / "fresh")
    assert _same_files(tmp_path / "fresh", tmp_path / "out") == []


def _cli(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


def test_cli_stream_and_bad_inputs(tmp_path, capsys):
    src = _hf_dir(tmp_path, "llama")
    rc = main(["convert", str(src), "--stream", "-q", "--max-shard-size", "20KB", "-o", str(tmp_path / "out")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    # A tiny model's bytes in a unit that shows them (it printed "0.00 GB in, 0.00 GB out").
    assert re.search(r"streamed \d+\.\d KB in, \d+\.\d KB out in", printed.out), printed.out
    assert moefx.load(tmp_path / "out") is not None
    calib = tmp_path / "calib.pt"
    torch.save(torch.randint(1, 96, (24, 8), generator=torch.Generator().manual_seed(0)), calib)
    rc, err = _cli(["convert", str(src), "--stream", "-q", "--init", "split", "--experts", "4", "--calib", str(calib),
                    "--heal", "--heal-steps", "5", "-o", str(tmp_path / "healed")], capsys)
    assert rc == 0, err
    healing = json.loads((tmp_path / "healed" / "report.json").read_text())["healing"]
    assert [entry["layer"] for entry in healing] == [f"model.layers.{i}.mlp" for i in range(3)]

    def bad(args, pattern):
        rc, err = _cli(["convert", *args, "--stream", "-q", "-o", str(tmp_path / "bad")], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert pattern in lines[0], lines[0]
        assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()

    bad([str(tmp_path / "missing")], "no such directory")
    bad([str(src), "--max-shard-size", "lots"], "is not a size")
    bad([str(src), "--init", "upcycle", "--expert-size", "3"], "--expert-size must be unset or 64")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((src / "config.json").read_text())
    bad([str(no_weights)], "has no model.safetensors")
    wrong = tmp_path / "wrong-shape"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    bad([str(wrong)], "config.json and the weights disagree")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((src / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-100])
    bad([str(truncated)], "truncated")


_CAPPED = textwrap.dedent("""
    import resource, sys
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    from moefx.cli import main
    sys.exit(main(sys.argv[2:]))
""")

_BASELINE = textwrap.dedent("""
    import moefx.cli, moefx.stream, transformers, torch
    from transformers.models.llama import modeling_llama
    status = open("/proc/self/status").read()
    print(int(status.split("VmData:")[1].split()[0]) * 1024)
""")


@pytest.mark.slow
def test_streaming_converts_a_model_larger_than_its_memory_cap(tmp_path):
    """RLIMIT_DATA (heap and anonymous memory) at the interpreter's own footprint + 300 MB: the streamed
    conversion of a 400 MB checkpoint fits; the in-memory one cannot even load the model."""
    src = tmp_path / "src"
    size = write_random_checkpoint(src, _llama_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                                      num_attention_heads=8, num_key_value_heads=8,
                                                      vocab_size=32000), max_shard_size=200_000_000)
    assert size > 380e6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEFX_QUIET": "1"}
    baseline = int(subprocess.run([sys.executable, "-c", _BASELINE], capture_output=True, text=True, env=env,
                                  check=True).stdout)
    cap = baseline + 300 * 2**20
    args = ["convert", str(src), "-q", "--init", "random", "--expert-size", "512"]
    streamed = subprocess.run([sys.executable, "-c", _CAPPED, str(cap), *args, "--stream", "--max-shard-size", "100MB",
                               "-o", str(tmp_path / "streamed")], capture_output=True, text=True, env=env)
    assert streamed.returncode == 0, streamed.stderr
    in_memory = subprocess.run([sys.executable, "-c", _CAPPED, str(cap), *args, "-o", str(tmp_path / "memory")],
                               capture_output=True, text=True, env=env)
    assert in_memory.returncode != 0 and not (tmp_path / "memory").exists()
    loaded = moefx.load(tmp_path / "streamed")
    assert len(moefx.moe_layers(loaded)) == 8
    with torch.no_grad():
        logits = loaded(torch.randint(0, 32000, (1, 6))).logits
    assert torch.isfinite(logits.float()).all()


def test_layerwise_runner_sees_what_a_full_forward_sees_one_layer_in_memory_at_a_time(tmp_path):
    from moefx.layerwise import LayerwiseRunner

    src = _hf_dir(tmp_path, "llama", dtype=torch.float32)
    batches = [torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runner = LayerwiseRunner(src)
    assert runner.stack_name == "model.layers" and len(runner.blocks) == 3
    seen, resident = {}, []

    def on_ffn(a):
        seen[(a.name, a.batch)] = (a.inputs.clone(), a.hidden.clone())
        resident.append(sum(not p.is_meta for p in runner.model.model.layers.parameters()))

    ends = []
    runner.run(batches, on_ffn, lambda index, names: ends.append((index, names)))
    assert ends == [(i, [f"model.layers.{i}.mlp"]) for i in range(3)]
    assert set(resident) == {len(list(runner.model.model.layers[0].parameters()))}  # one layer at a time
    assert all(p.is_meta for p in runner.model.parameters())  # everything released

    reference = load_source(src).model
    expected = {}
    for i, layer in enumerate(reference.model.layers):
        layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a, i=i: expected.setdefault(i, {}).update(x=a[0]))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: expected.setdefault(i, {}).update(h=a[0]))
    for b, ids in enumerate(batches):
        with torch.no_grad():
            reference(input_ids=ids, use_cache=False)
        for i in range(3):
            inputs, hidden = seen[(f"model.layers.{i}.mlp", b)]
            torch.testing.assert_close(inputs, expected[i]["x"].reshape(-1, 32), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(hidden, expected[i]["h"].reshape(-1, 64), rtol=1e-5, atol=1e-6)


def test_non_finite_dense_weights_are_reported_as_in_memory(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(_llama_config()).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "src")
    config = moefx.MoEConfig(num_experts=4)
    _in_memory(tmp_path / "src", tmp_path / "memory", config)
    run_stream(plan_stream(tmp_path / "src", config), tmp_path / "streamed")
    warnings = [json.loads((tmp_path / d / "report.json").read_text())["warnings"] for d in ("memory", "streamed")]
    assert warnings[0] == warnings[1] and "model.layers.1.mlp: non-finite weights" in warnings[0][0]
    assert _same_files(tmp_path / "memory", tmp_path / "streamed") == []
