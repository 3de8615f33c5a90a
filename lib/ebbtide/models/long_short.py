"""Long/short-term fusion: decayed pooling over the whole history (long-term interest) plus attention over the
current session (short-term intent), fused by a gate that also sees how long the user has been idle."""

from __future__ import annotations

import torch
from torch import nn

from ebbtide.models.base import DAY_SECONDS, Batch, InterestModel, causal_mask
from ebbtide.models.decay_pool import DecayPool


class LongShort(InterestModel):
    name = "long_short"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4,
                 half_lives_days: tuple[float, ...] = (1.0, 30.0), dropout: float = 0.1):
        super().__init__(n_items, dim, n_types)
        self.long = DecayPool(n_items, dim, n_types, half_lives_days, dropout)
        self.long.item_emb = self.item_emb          # one item table for the whole model
        self.long.type_emb = self.type_emb
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.gate = nn.Sequential(nn.Linear(2 * dim + 1, dim), nn.GELU(), nn.Linear(dim, 1))
        self.drop = nn.Dropout(dropout)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        long_term = self.long.encode_positions(batch, t_query)                           # (B, L, d)
        events = self.drop(self.embed_events(batch))
        same_session = batch.sessions.unsqueeze(-1) == batch.sessions.unsqueeze(-2)     # (B, L, L)
        visible = causal_mask(batch) & same_session
        visible = visible | torch.eye(visible.shape[-1], dtype=torch.bool, device=visible.device)
        logits = (self.query(events) @ self.key(events).transpose(1, 2)) / events.shape[-1] ** 0.5
        attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        short_term = attn @ events
        idle = torch.log1p(((t_query - batch.ts) / DAY_SECONDS).clamp(min=0)).float().unsqueeze(-1)
        g = torch.sigmoid(self.gate(torch.cat([long_term, short_term, idle], dim=-1)))
        return g * short_term + (1 - g) * long_term

    def decay_kernel(self, days: torch.Tensor) -> torch.Tensor:
        """The long-term part's kernel (the short-term part attends within the current session only)."""
        return self.long.decay_kernel(days)
