"""Causal self-attention (SASRec-style) with a per-head learned time-decay bias on the attention logits.

Query position i attends to events j <= i with logit q_i.k_j / sqrt(d) - rate_h * f(t_q(i) - t_j), where
f = log1p(days) and t_q(i) is the query time (the time of the event being predicted): each head learns how fast
the relevance of an event fades, relative to when the user is being scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebbtide.models.base import Batch, InterestModel, causal_mask, elapsed_days


class TimeDecayAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.log_rate = nn.Parameter(torch.linspace(-2.0, 1.0, heads))  # per-head decay speed
        self.dropout = dropout

    def forward(self, x: torch.Tensor, days: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = -self.log_rate.exp()[None, :, None, None] * torch.log1p(days).unsqueeze(1)   # (B, H, L, L)
        bias = bias.masked_fill(~visible.unsqueeze(1), float("-inf")).to(q.dtype)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                              dropout_p=self.dropout if self.training else 0.0)
        return self.out(attn.transpose(1, 2).reshape(b, length, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimeDecayAttention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x, days, visible):
        x = x + self.attn(self.norm1(x), days, visible)
        return x + self.ff(self.norm2(x))


class DecayTransformer(InterestModel):
    name = "decay_transformer"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4, layers: int = 2, heads: int = 4,
                 max_len: int = 200, dropout: float = 0.1):
        super().__init__(n_items, dim, n_types)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        length = batch.items.shape[1]
        positions = torch.arange(length, device=batch.items.device).clamp(max=self.pos_emb.num_embeddings - 1)
        x = self.drop(self.embed_events(batch) + self.pos_emb(positions))
        days = elapsed_days(t_query, batch.ts)
        visible = causal_mask(batch)
        visible = visible | torch.eye(length, dtype=torch.bool, device=x.device)  # padded rows: no all -inf
        for block in self.blocks:
            x = block(x, days, visible)
        return self.norm(x)

    def decay_report(self) -> dict[str, list[float]]:
        # weight multiplier exp(-rate * log1p(days)) = (1 + days)^-rate halves at days = 2^(1/rate) - 1
        rates = self.blocks[0].attn.log_rate.detach().exp()
        return {"head_half_life_days": (torch.pow(2.0, 1.0 / rates) - 1).tolist()}
