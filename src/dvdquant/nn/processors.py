"""Fused-projection-aware versions of diffusers attention processors that have no fused form.

Why this file exists: :mod:`dvdquant.nn.fused` gives an attention module one callable for its Q/K/V
projections (``to_qkv``), which on the fp8 path quantizes the shared tokens once and runs one GEMM.
Wan's diffusers processor already calls ``attn.to_qkv`` when ``attn.fused_projections`` is set;
HunyuanVideo's does not. While the fusion is installed, the processor instance's class is switched to
the subclass here (its state — attention backend, context-parallel config, dvdquant's saved backend —
stays on the instance); :func:`dvdquant.nn.fused.remove_fused_projections` switches it back.

The subclass computes what the diffusers processor computes, in the same order of operations; only the
projections go through the fused callables when they are installed (their outputs equal the members',
bit for bit). ``tests/test_fused.py`` checks both against the stock processor.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0


def _project(attn, fused: str, members: tuple, x: torch.Tensor) -> tuple:
    """The members' outputs on ``x``: one call of ``attn.<fused>`` split in equal parts, or each member."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, fused):
        return getattr(attn, fused)(x).chunk(len(members), dim=-1)
    return tuple(getattr(attn, name)(x) for name in members)


def _rope_video_part(t: torch.Tensor, rotary, text_len: int) -> torch.Tensor:
    """RoPE on the video tokens of a joint (video, then text) sequence (B, L, H, D); text tokens unchanged."""
    return torch.cat([apply_rotary_emb(t[:, :-text_len], rotary, sequence_dim=1), t[:, -text_len:]], dim=1)


class HunyuanVideoFusedAttnProcessor(HunyuanVideoAttnProcessor2_0):
    """HunyuanVideo's joint attention (dual-stream blocks: video Q/K/V + text ``add_*`` Q/K/V; single-stream
    blocks: Q/K/V of the concatenated video + text tokens) with ``to_qkv`` / ``to_added_qkv`` used when
    installed."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:                                                # (B, Lv + Lt, C)
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        qkv = _project(attn, "to_qkv", ("to_q", "to_k", "to_v"), hidden_states)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in qkv)       # (B, L, H, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single:
                text_len = encoder_hidden_states.shape[1]
                query = _rope_video_part(query, image_rotary_emb, text_len)
                key = _rope_video_part(key, image_rotary_emb, text_len)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:     # dual-stream: text Q/K/V
            added = _project(attn, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"), encoder_hidden_states)
            e_query, e_key, e_value = (t.unflatten(2, (attn.heads, -1)) for t in added)
            if attn.norm_added_q is not None:
                e_query = attn.norm_added_q(e_query)
            if attn.norm_added_k is not None:
                e_key = attn.norm_added_k(e_key)
            query = torch.cat([query, e_query], dim=1)
            key = torch.cat([key, e_key], dim=1)
            value = torch.cat([value, e_value], dim=1)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend,
                                              parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# diffusers processor class name → dvdquant's fused-aware subclass (what FusedProjection.processor names)
FUSED_AWARE = {"HunyuanVideoAttnProcessor2_0": HunyuanVideoFusedAttnProcessor}

__all__ = ["HunyuanVideoFusedAttnProcessor", "FUSED_AWARE"]
