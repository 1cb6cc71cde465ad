"""Fine-tune a converted model with the router's auxiliary losses and watch the expert load even out.

A small GPT-2 (random weights, built from a config) is upcycled into top-1 MoE layers (8 experts, capacity
factor 2). A randomly initialised router sends the tokens unevenly: the hidden states share a common
direction, so a few experts get most of them. Training on a synthetic language-modelling task with the
Switch load-balancing loss (plus the router z-loss) evens the load out; the same run without the aux losses
is shown for contrast. Balance is ``mean load / max load`` (1.0 = perfectly even), measured on a fixed
probe batch of 1024 tokens before and after training.

    python examples/train_aux.py            # ~15 s on one CPU core
    python examples/train_aux.py --steps 20 # quick check (MOEFX_EXAMPLE_STEPS=20 does the same)
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import moefx
from moefx.layers import routing_stats


def build_model(seed: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def synthetic_batch(gen: torch.Generator, batch: int = 16, seq: int = 32, vocab: int = 128) -> torch.Tensor:
    """Sequences with learnable structure: a random start and a fixed stride per sequence (x_{i+1} = x_i + s)."""
    start = torch.randint(1, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    return (start + stride * torch.arange(seq)) % (vocab - 1) + 1


def summary(model: torch.nn.Module) -> str:
    rows = []
    for name, s in routing_stats(model).items():
        rows.append(f"    {name:<24} load={s['load']}  balance={s['balance']:.2f}  load_cv={s['load_cv']:.2f}  "
                    f"dropped={s['dropped_fraction']:.1%}")
    return "\n".join(rows)


def mean_stat(model: torch.nn.Module, key: str) -> float:
    values = [s[key] for s in routing_stats(model).values()]
    return sum(values) / len(values)


def train(aux: bool, steps: int, seed: int = 0) -> dict[str, float]:
    config = moefx.MoEConfig(
        num_experts=8, top_k=1, capacity_factor=2.0, router_init_std=0.5, init_noise=0.05, seed=seed,
        load_balance_weight=0.1 if aux else 0.0, z_loss_weight=1e-3 if aux else 0.0,
    )
    model = moefx.convert(build_model(seed), config)
    probe = synthetic_batch(torch.Generator().manual_seed(1234), batch=32)
    model.eval()
    with torch.no_grad():
        model(input_ids=probe)
    before = {"balance": mean_stat(model, "balance"), "cv": mean_stat(model, "load_cv"),
              "dropped": mean_stat(model, "dropped_fraction")}
    print(f"  before training: mean balance {before['balance']:.2f}, dropped {before['dropped']:.1%}")
    print(summary(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        ids = synthetic_batch(gen)
        loss = model(input_ids=ids, labels=ids).loss
        total = loss + moefx.aux_loss(model)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % max(steps // 4, 1) == 0 or step == steps - 1:
            print(f"  step {step:4d}  lm loss {loss.item():.3f}  aux {moefx.aux_loss(model).item():.4f}  "
                  f"balance {mean_stat(model, 'balance'):.2f}")
    model.eval()
    with torch.no_grad():
        model(input_ids=probe)
    after = {"balance": mean_stat(model, "balance"), "cv": mean_stat(model, "load_cv"),
             "dropped": mean_stat(model, "dropped_fraction"), "lm_loss": loss.item()}
    print(f"  after training:  mean balance {after['balance']:.2f}, dropped {after['dropped']:.1%}")
    print(summary(model))
    return {"before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("MOEFX_EXAMPLE_STEPS", 300)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for aux in (True, False):
        print("== with aux losses (load balance 0.1, z-loss 1e-3) ==" if aux else "== without aux losses ==")
        results[aux] = train(aux, args.steps)
    print("== summary (mean over layers; balance = mean load / max load, 1.0 = perfectly even) ==")
    for aux, r in results.items():
        label = "with aux   " if aux else "without aux"
        b, a = r["before"], r["after"]
        print(f"  {label}  balance {b['balance']:.2f} -> {a['balance']:.2f}   load_cv {b['cv']:.2f} -> {a['cv']:.2f}   "
              f"dropped {b['dropped']:.1%} -> {a['dropped']:.1%}   final lm loss {a['lm_loss']:.3f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
