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


# --- tiny builders for each architecture dowser.probe supports (issue #6) ---

def _finish(model, dtype):
    return model.to(dtype).eval()


def tiny_qwen2(n_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    return _finish(Qwen2ForCausalLM(cfg), dtype)


def tiny_gemma3(n_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=n_layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           sliding_window=16, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return _finish(Gemma3ForCausalLM(cfg), dtype)


def tiny_gpt2(n_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=n_layers, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2)
    return _finish(GPT2LMHeadModel(cfg), dtype)


def tiny_llava(n_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                              num_attention_heads=2, image_size=16, patch_size=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=99,
                      projector_hidden_act="gelu", vision_feature_layer=-1)
    return _finish(LlavaForConditionalGeneration(cfg), dtype)


def tiny_qwen2_vl(n_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=110, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=n_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3),
        image_token_id=105, video_token_id=106, vision_start_token_id=107,
        vision_end_token_id=108)
    return _finish(Qwen2VLForConditionalGeneration(cfg), dtype)


def tiny_idefics3(n_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=100, hidden_size=32,
                         intermediate_size=48, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        scale_factor=2, image_token_id=99)
    return _finish(Idefics3ForConditionalGeneration(cfg), dtype)


class TinyMLP(torch.nn.Module):
    """Embedding -> Linear -> tanh -> Linear -> logits: the smallest model with a Jacobian."""

    def __init__(self, vocab: int = 13, hidden: int = 6, inner: int = 5):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.fc1 = torch.nn.Linear(hidden, inner)
        self.fc2 = torch.nn.Linear(inner, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(torch.tanh(self.fc1(self.embed(input_ids))))


def tiny_mlp(dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return TinyMLP().to(dtype).eval()


ARCHITECTURES = {
    "llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2,
    "llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "idefics3": tiny_idefics3,
}
