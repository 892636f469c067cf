"""Tiny random Hugging Face models built offline, for tests (no download)."""

from __future__ import annotations

import torch


def tiny_llama(n_layers: int = 2, hidden: int = 32, intermediate: int = 48, vocab: int = 97,
               dtype: torch.dtype = torch.float32, seed: int = 0):
    """A LlamaForCausalLM small enough for fp64 Jacobians and fast training loops."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()
