"""Tiny random-init configs of the five diffusers video transformers, with matching inputs.

Shared by the tests and by ``benchmarks/sqnr_outliers.py``; sizes are chosen so that every
method runs in well under a second per model on a CPU.
"""
from __future__ import annotations

import torch


def tiny_wan(hidden_heads: int = 2, head_dim: int = 32, layers: int = 2):
    from diffusers import WanTransformer3DModel
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=hidden_heads, attention_head_dim=head_dim,
                              in_channels=4, out_channels=4, text_dim=32, freq_dim=32,
                              ffn_dim=4 * hidden_heads * head_dim,
                              num_layers=layers, rope_max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    return m, inputs


def tiny_hunyuan(layers: int = 1, single_layers: int = 1, heads: int = 2, head_dim: int = 32):
    from diffusers import HunyuanVideoTransformer3DModel
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                       attention_head_dim=head_dim,
                                       num_layers=layers, num_single_layers=single_layers, num_refiner_layers=1,
                                       patch_size=1, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                       rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  encoder_attention_mask=torch.ones(1, 8, dtype=torch.long),
                  pooled_projections=torch.randn(1, 16, generator=g), guidance=torch.tensor([4000.0]))
    return m, inputs


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                    time_embed_dim=16, text_embed_dim=32, num_layers=1, sample_width=8,
                                    sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                    max_text_seq_length=8)
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    return m, inputs


def tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel
    m = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                   attention_head_dim=32, cross_attention_dim=64, num_layers=1, caption_channels=32)
    g = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(1, 2 * 4 * 4, 4, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  encoder_attention_mask=torch.ones(1, 8, dtype=torch.long), num_frames=2, height=4, width=4)
    return m, inputs


def tiny_mochi():
    from diffusers import MochiTransformer3DModel
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                                pooled_projection_dim=32, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                activation_fn="swiglu", max_sequence_length=8)
    g = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  encoder_attention_mask=torch.ones(1, 8, dtype=torch.long))
    return m, inputs


TINY_MODELS = {"wan": tiny_wan, "hunyuan": tiny_hunyuan, "cogvideox": tiny_cogvideox, "ltx": tiny_ltx,
               "mochi": tiny_mochi}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
