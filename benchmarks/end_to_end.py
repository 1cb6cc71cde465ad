"""Whole converted models against their dense sources: GPT-2-small-shaped and LLaMA-shaped, torch and ORT.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/end_to_end.py                    # both models, 1 and 2 threads
    OMP_WAIT_POLICY=PASSIVE python benchmarks/end_to_end.py --models llama --threads 1 --json e2e.json

Each dense model (random weights, built from a transformers config; hidden 768, ``--layers`` blocks) is saved
as a Hugging Face directory and converted the way ``moefx convert`` does it: every FFN split into 8 experts of
inter/8 (total FFN parameters unchanged), top-2. ``moefx.bench.run_bench`` then times dense and MoE in torch
eager and ONNX Runtime (fused and unfused), whole model and one FFN alone, and reports the realised speed-up
against the ideal one from counted FLOPs. Goal (issue 5): the whole-model speed-up is above 1 whenever the FFN
is more than half of the dense model's FLOPs; the script checks that for every row it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MOEFX_QUIET", "1")

import torch

import moefx
from moefx.bench import run_bench
from moefx.sources import load_source

VOCAB = 8192  # the base models end at the last hidden state: the embedding lookup costs no FLOPs


def dense_model(arch: str, layers: int):
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "gpt2":  # GPT-2 small: 768 wide, 12 heads, FFN 3072 (GELU)
        config = tf.GPT2Config(n_embd=768, n_inner=3072, n_head=12, n_layer=layers, vocab_size=VOCAB,
                               n_positions=1024)
        return tf.GPT2Model(config).eval(), 3072
    if arch == "llama":  # LLaMA-shaped: SwiGLU FFN 8/3 * 768 = 2048, grouped-query attention
        config = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                                num_key_value_heads=4, num_hidden_layers=layers, vocab_size=VOCAB,
                                max_position_embeddings=2048)
        return tf.LlamaModel(config).eval(), 2048
    raise SystemExit(f"unknown model {arch!r}: choose gpt2 or llama")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--seq", default="128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    results = {}
    failures = 0
    for arch in args.models.split(","):
        start = time.perf_counter()
        dense, inter = dense_model(arch, args.layers)
        with tempfile.TemporaryDirectory(prefix=f"moefx-e2e-{arch}-") as tmp:
            dense.save_pretrained(Path(tmp) / "dense")
            source = load_source(Path(tmp) / "dense")
            config = moefx.MoEConfig(num_experts=8, top_k=2, init="random", expert_size=inter // 8)
            model = moefx.convert(source.model, config, source=source.to_dict(), inplace=True)
            moefx.save(model, Path(tmp) / "out")
            report = run_bench(Path(tmp) / "out", batches=ints(args.batch), seqs=ints(args.seq),
                               threads=ints(args.threads), min_seconds=args.min_seconds)
        report.source = f"{arch} ({args.layers} layers, hidden 768, FFN {inter} -> 8 x {inter // 8}, top-2)"
        print(report.render())
        share = report.costs["dense"]["ffn_fraction"]
        print(f"{arch}: FFN share of the dense model's FLOPs {100 * share:.0f}%")
        for s in report.speedups:
            if s.scope != "model":
                continue
            ok = s.realised > 1 or share <= 0.5
            failures += not ok
            print(f"    {s.runtime:<11} threads {s.threads} batch {s.batch} seq {s.seq}: speed-up {s.realised:.2f}x "
                  f"(ideal {s.ideal:.2f}x)  {'ok' if ok else 'BELOW 1 although the FFN is over half the FLOPs'}")
        print(f"({time.perf_counter() - start:.0f} s)\n")
        results[arch] = report.to_dict()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
