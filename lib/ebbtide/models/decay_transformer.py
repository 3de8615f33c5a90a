"""Causal self-attention (SASRec-style) with learned per-head decay biases on the attention logits.

Query position i attends to events j <= i with logit

    q_i.k_j / sqrt(d) - rate_h * log1p(days from t_j to the query time) - order_h * log1p(i - j)

The first bias is the time decay: each head learns how fast an event's relevance fades with the time since it
happened, relative to when the user is scored (so the same history reads differently a week later). The second
is recency in events: histories often hold bursts of events with the same timestamp, where only their order
says which came last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebbtide.models.base import Batch, InterestModel, causal_mask, elapsed_days


class TimeDecayAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.log_rate = nn.Parameter(torch.linspace(-2.0, 1.0, heads))    # per-head decay speed in time
        self.log_order = nn.Parameter(torch.linspace(-2.0, 1.0, heads))   # per-head decay speed in events

    def forward(self, x: torch.Tensor, days: torch.Tensor, gaps: torch.Tensor, visible: torch.Tensor):
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = (-self.log_rate.exp()[None, :, None, None] * torch.log1p(days).unsqueeze(1)
                - self.log_order.exp()[None, :, None, None] * gaps)                        # (B, H, L, L)
        bias = bias.masked_fill(~visible.unsqueeze(1), float("-inf")).to(q.dtype)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(attn.transpose(1, 2).reshape(b, length, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimeDecayAttention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, days, gaps, visible):
        x = x + self.drop(self.attn(self.norm1(x), days, gaps, visible))
        return x + self.drop(self.ff(self.norm2(x)))


class DecayTransformer(InterestModel):
    name = "decay_transformer"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4, layers: int = 2, heads: int = 2,
                 max_len: int = 200, dropout: float = 0.2):
        super().__init__(n_items, dim, n_types)
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos_emb.weight, std=dim ** -0.5)    # the scale of the item vectors it is added to
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        length = batch.items.shape[1]
        idx = torch.arange(length, device=batch.items.device)
        x = self.drop(self.embed_events(batch) + self.pos_emb(idx.clamp(max=self.pos_emb.num_embeddings - 1)))
        days = elapsed_days(t_query, batch.ts)
        gaps = torch.log1p((idx[:, None] - idx[None, :]).clamp(min=0).float())
        visible = causal_mask(batch) | torch.eye(length, dtype=torch.bool, device=x.device)  # no all -inf row
        for block in self.blocks:
            x = block(x, days, gaps, visible)
        return self.norm(x)

    def decay_kernel(self, days: torch.Tensor) -> torch.Tensor:
        """The first layer's attention multiplier for an event `days` old, exp(-rate * log1p(days)) =
        (1 + days)^-rate, averaged over heads (other things equal: same content, same order)."""
        rates = self.blocks[0].attn.log_rate.detach().exp().to(days.dtype)
        return torch.pow(1.0 + days.unsqueeze(-1), -rates).mean(-1)
