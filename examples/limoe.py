"""LIMoE-style multimodal MoE: image patches and text tokens share one MoE backbone.

One small Transformer encoder sees each example as one sequence ``[48 image patches ; 16 text tokens]``
(attention stays within a modality, so it is two towers with shared weights, as in LIMoE) and is trained
with a CLIP-style contrastive loss between the pooled image and pooled text embeddings of synthetic paired
data. Its FFNs are converted into 8-expert top-1 MoE layers with Batch Priority Routing and a tight capacity
(capacity factor 1.0 over all tokens of a batch), so the minority modality (text, 25% of the tokens) competes
with the images for expert capacity.

The text tokens start out agreeing on a few experts (their embeddings share a direction), overflow them and
get dropped. The script trains the same model three times: without aux losses, with the Switch
load-balancing loss, and with LIMoE's per-modality entropy losses (``with moefx.tasks.modality(mask):``
tells the routers which tokens are text), and prints each modality's routing success rate (the fraction of
its tokens that an expert processed) on a probe batch before and after training.

    python examples/limoe.py             # ~25 s on one CPU core
    python examples/limoe.py --steps 20  # quick check (MOEFX_EXAMPLE_STEPS=20 does the same)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx.layers import routing_stats
from moefx.tasks import modality

IMAGE, TEXT = 1, 0
PATCHES, PATCH_DIM, WORDS, VOCAB, CLASSES = 48, 32, 16, 64, 16
HIDDEN, EXPERTS = 64, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TwoTowerEncoder(nn.Module):
    """Image patches and text tokens in one sequence through shared blocks; returns both pooled embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(PATCH_DIM, HIDDEN)
        self.word_embed = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Parameter(torch.randn(PATCHES + WORDS, HIDDEN) * 0.02)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.norm = nn.LayerNorm(HIDDEN)
        self.register_buffer("attn_mask", _block_mask(), persistent=False)
        with torch.no_grad():  # text embeddings share a direction: the router first sends them all alike
            self.word_embed.weight.mul_(0.3).add_(torch.randn(HIDDEN))

    def forward(self, patches: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.patch_embed(patches), self.word_embed(words)], dim=1) + self.position
        for block in self.blocks:
            x = block(x, self.attn_mask)
        x = self.norm(x)
        return x[:, :PATCHES].mean(1), x[:, PATCHES:].mean(1)


def _block_mask() -> torch.Tensor:
    """``[S, S]`` attention mask, True = blocked: images attend to images, text to text."""
    kind = torch.tensor([IMAGE] * PATCHES + [TEXT] * WORDS)
    return kind[:, None] != kind[None, :]


def modality_mask(batch: int) -> torch.Tensor:
    return torch.tensor([IMAGE] * PATCHES + [TEXT] * WORDS).expand(batch, -1)


class PairedData:
    """Synthetic image/caption pairs: class prototypes plus noise (images), class-specific words (text)."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(CLASSES, PATCHES, PATCH_DIM, generator=gen)
        self.words = torch.stack([torch.randperm(VOCAB, generator=gen)[:8] for _ in range(CLASSES)])  # [C, 8]

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, CLASSES, (size,), generator=gen)
        patches = self.prototypes[labels] + 0.8 * torch.randn(size, PATCHES, PATCH_DIM, generator=gen)
        pick = torch.randint(0, 8, (size, WORDS), generator=gen)
        words = self.words[labels].gather(1, pick)
        return patches, words, labels


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    target = torch.arange(len(image))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def success_rates(model: nn.Module) -> dict[str, float]:
    """Mean over MoE layers of each modality's routing success rate in the last forward pass."""
    layers = list(routing_stats(model).values())
    return {name: sum(s["modalities"][m]["routing_success_rate"] for s in layers) / len(layers)
            for name, m in (("image", IMAGE), ("text", TEXT))}


#: The three trainings compared: (name, MoEConfig loss options).
SETUPS = [
    ("no aux losses", {}),
    ("Switch load balance", {"load_balance_weight": 0.01}),
    ("LIMoE entropy losses", {"local_entropy_weight": 0.05, "global_entropy_weight": 0.2}),
]


def run(losses: dict, steps: int, seed: int = 0, batch: int = 32) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    dense = TwoTowerEncoder()
    data = PairedData(seed)
    config = moefx.MoEConfig(
        router="bpr", num_experts=EXPERTS, top_k=1, capacity_factor=1.0, init_noise=0.05, router_init_std=0.3,
        seed=seed, **{"load_balance_weight": 0.0, **losses},
    )
    model = moefx.convert(dense, config, example_inputs=data.batch(torch.Generator().manual_seed(99), 2)[:2],
                          verify=False)
    patches, words, labels = data.batch(torch.Generator().manual_seed(1234), 64)  # probe batch
    model.eval()
    with torch.no_grad(), modality(modality_mask(64)):
        model(patches, words)
    before = success_rates(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    mask = modality_mask(batch)
    for step in range(steps):
        image, text = data.batch(gen, batch)[:2]
        with modality(mask):  # the routers learn which tokens are text and which are image patches
            image, text = model(image, text)
        loss = contrastive_loss(image, text)
        optimizer.zero_grad()
        (loss + moefx.aux_loss(model)).backward()
        optimizer.step()
        if step % max(steps // 3, 1) == 0 or step == steps - 1:
            rates = success_rates(model)
            print(f"  step {step:4d}  contrastive {loss.item():.3f}  aux {moefx.aux_loss(model).item():+.4f}  "
                  f"success image {rates['image']:.1%} text {rates['text']:.1%}")
    model.eval()
    with torch.no_grad(), modality(modality_mask(64)):
        image, text = model(patches, words)
    nearest = (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()).argmax(-1)
    accuracy = float((labels[nearest] == labels).float().mean())  # the nearest caption has the right class
    return {"before": before, "after": success_rates(model), "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("MOEFX_EXAMPLE_STEPS", 300)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for name, losses in SETUPS:
        print(f"== {name} {losses or ''} ==")
        results[name] = run(losses, args.steps, seed=args.seed)
    print("== routing success rate per modality on a probe batch (before -> after training) ==")
    for name, r in results.items():
        b, a = r["before"], r["after"]
        print(f"  {name:<22} image {b['image']:6.1%} -> {a['image']:6.1%}   text {b['text']:6.1%} -> {a['text']:6.1%}"
              f"   image->text retrieval (class) {r['accuracy']:.1%}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
