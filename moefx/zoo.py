"""Small models for demos, docs and tests: ``moefx convert moefx.zoo:tiny_llama -o out/``.

Each factory returns ``(model, example_inputs)`` with deterministic random weights; nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyTransformer", "tiny_llama", "tiny_transformer"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 256, vocab: int = 256):
    """A LLaMA-architecture causal LM (transformers) with random weights, and example input ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": ids}


class TinyTransformer(nn.Module):
    """A plain-PyTorch pre-norm Transformer encoder (GELU MLPs), traceable by ``symbolic_trace``."""

    def __init__(self, hidden: int = 64, layers: int = 2, intermediate: int = 256, heads: int = 4, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, intermediate, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def tiny_transformer(seed: int = 0):
    """A :class:`TinyTransformer` with random weights, and example token ids."""
    torch.manual_seed(seed)
    model = TinyTransformer().eval()
    return model, (torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed)),)
