"""Small models for demos, docs and tests: ``moefx convert moefx.zoo:tiny_llama -o out/``.

Each factory returns ``(model, example_inputs)`` with deterministic random weights; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import INDEX_NAME, ShardWriter, shard_names, write_index
from .hf import build_without_weights
from .sources import hf_model_class

__all__ = ["TinyTransformer", "tiny_llama", "tiny_transformer", "write_random_checkpoint"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 256, vocab: int = 256):
    """A LLaMA-architecture causal LM (transformers) with random weights, and example input ids."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional: needs moefx[hf]

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


def write_random_checkpoint(directory, config, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            max_shard_size: int = 5 * 1000**3, std: float = 0.02) -> int:
    """Write a Hugging Face model directory for the transformers ``config`` with random weights, tensor by
    tensor (never the whole model in memory): ``config.json`` and safetensors shards with an index, as
    ``save_pretrained`` lays them out. Matrices are N(0, std), vectors (norms) are ones. Returns the bytes
    of weights written.

    Values are slices of one random pool at random offsets, so a 13 GB checkpoint takes seconds to make.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    cls = hf_model_class({"architectures": getattr(config, "architectures", None) or []})
    model = build_without_weights(cls, config, dtype=dtype)
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    tensors = {}
    for name, t in state.items():
        if id(t) in seen:  # a tied weight is stored once
            continue
        seen.add(id(t))
        tensors[name] = (dtype if t.is_floating_point() else t.dtype, tuple(t.shape))
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dt, shape) in tensors.items():
        nbytes = torch.empty((), dtype=dt).element_size() * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = shard_names(len(shards))
    gen = torch.Generator().manual_seed(seed)
    largest = max(int(torch.Size(s).numel()) for _, s in tensors.values())
    pool = (torch.randn(min(largest, 1 << 24) + 1, generator=gen) * std).to(dtype)
    total = 0
    for file, names in zip(files, shards):
        writer = ShardWriter(directory / file, {n: tensors[n] for n in names})
        for name in list(writer.order):
            dt, shape = tensors[name]
            n = int(torch.Size(shape).numel())
            if len(shape) == 1:
                value = torch.ones(shape, dtype=dt)
            else:
                start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
                reps = -(-(start + n) // pool.numel())
                value = (pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]).reshape(shape)
            writer.write(name, value.to(dt))
            total += value.numel() * value.element_size()
        writer.commit()
    if len(files) > 1:
        write_index(directory / INDEX_NAME, {n: f for f, names in zip(files, shards) for n in names}, total)
    config.save_pretrained(str(directory))
    return total
