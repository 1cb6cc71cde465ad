"""Shared fixtures: tiny models built from configs with random weights (no network)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import settings

# Hypothesis profiles: the default keeps CI fast; `pytest --hypothesis-profile thorough` runs hundreds.
settings.register_profile("ci", max_examples=25)
settings.register_profile("thorough", max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MOEFX_QUIET", "1")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


_quiet_transformers()


def tiny_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A small transformers model with random weights, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": 96}
    builders = {
        "bert": lambda: tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, **common)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                                         eos_token_id=0, pad_token_id=0, **common)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=64,
                                                            bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(hidden_size=32, num_hidden_layers=2,
                                                                  num_attention_heads=4, num_key_value_heads=2,
                                                                  intermediate_size=64, bos_token_id=0,
                                                                  eos_token_id=0, pad_token_id=0, **common)),
        "t5": lambda: tf.T5Model(tf.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, **common)),
        "t5-gated": lambda: tf.T5Model(tf.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                                   feed_forward_proj="gated-gelu", **common)),
        "vit": lambda: tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, image_size=16, patch_size=4)),
        "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                     **common)),
    }
    model = builders[name]()
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    return tiny_hf_model
