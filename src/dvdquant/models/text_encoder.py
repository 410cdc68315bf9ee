"""A tiny learned text encoder for the embedded model's fixed caption grammar.

Real video DiTs take T5/LLM hidden states as ``encoder_hidden_states``; the embedded model
only needs to tell ~30 words apart, so a word embedding, a positional embedding and one
pre-norm transformer layer suffice. It belongs to the project (not to diffusers) and is
kept in high precision by the quantizers: only the DiT is quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-norm self-attention + MLP over the caption tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))  # (B, L, D)
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Token ids (B, L) int64 -> hidden states (B, L, dim), used as ``encoder_hidden_states``."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 128, layers: int = 1, heads: int = 4):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "max_len": max_len, "dim": dim, "layers": layers,
                       "heads": heads}
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tok_emb.weight, std=0.5)
        nn.init.normal_(self.pos_emb, std=0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.pos_emb.shape[1]:
            raise ValueError(f"{ids.shape[1]} tokens, the encoder takes at most {self.pos_emb.shape[1]}")
        x = self.tok_emb(ids) + self.pos_emb[:, : ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
