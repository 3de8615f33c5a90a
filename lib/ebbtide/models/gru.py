"""Recurrent encoder (GRU, or LSTM) with elapsed-time inputs and a query-time-aware output."""

from __future__ import annotations

import torch
from torch import nn

from ebbtide.models.base import DAY_SECONDS, Batch, InterestModel


def log_days(delta_seconds: torch.Tensor) -> torch.Tensor:
    return torch.log1p((delta_seconds / DAY_SECONDS).clamp(min=0)).float().unsqueeze(-1)


class RecurrentInterest(InterestModel):
    name = "gru"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4, cell: str = "gru", layers: int = 1,
                 dropout: float = 0.2):
        super().__init__(n_items, dim, n_types)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.name = cell
        self.time_in = nn.Linear(1, dim)
        self.rnn = rnn(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        # The state after event i is read at the query time: the gap since event i modulates it.
        self.time_out = nn.Sequential(nn.Linear(dim + 1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        prev = torch.cat([batch.ts[:, :1], batch.ts[:, :-1]], dim=1)
        x = self.embed_events(batch) + self.time_in(log_days(batch.ts - prev))
        packed = nn.utils.rnn.pack_padded_sequence(self.drop(x), batch.lengths.clamp(min=1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        hidden = self.drop(hidden)
        gap = log_days(t_query - batch.ts)
        return hidden + self.time_out(torch.cat([hidden, gap], dim=-1))
