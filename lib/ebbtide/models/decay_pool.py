"""Multi-timescale exponential decay pooling: the continuous-time form of u_t = a*u_(t-1) + (1-a)*u_new.

With K learned time constants tau_k, the state of scale k at query time t_q is
    s_k(t_q) = sum_{j <= i} w_j * exp(-(t_q - t_j) / tau_k) * e_j
(each new event adds its embedding; between events the state shrinks by exp(-dt / tau_k), i.e. a = exp(-dt/tau_k)).
The user embedding mixes the normalised scales with learned weights. Because the states only rescale between
events, they can be carried forward exactly to any later date: the nightly job uses this for idle users.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ebbtide.models.base import Batch, InterestModel, causal_mask, elapsed_days


class DecayPool(InterestModel):
    name = "decay_pool"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4,
                 half_lives_days: tuple[float, ...] = (0.1, 1.0, 10.0)):
        super().__init__(n_items, dim, n_types)
        taus = torch.tensor([h / math.log(2) for h in half_lives_days])
        self.log_tau = nn.Parameter(taus.log())           # learned time constants, in days
        self.mix_logits = nn.Parameter(torch.zeros(len(half_lives_days)))
        self.type_weight = nn.Parameter(torch.zeros(n_types + 1))  # learned log-weight per event type
        self.head = nn.Linear(dim, dim)
        nn.init.eye_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def scale_states(self, batch: Batch, t_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scale decayed sums (B, L, K, d) and their total weights (B, L, K)."""
        days = elapsed_days(t_query, batch.ts)                                  # (B, L, L)
        visible = causal_mask(batch)
        tau = self.log_tau.exp()                                                # (K,)
        decay = torch.exp(-days.unsqueeze(-1) / tau)                            # (B, L, L, K)
        w = self.type_weight.exp()[batch.types.clamp(min=0)]                    # (B, L)
        decay = decay * (visible.unsqueeze(-1) * w[:, None, :, None])
        events = self.embed_events(batch)                                       # (B, L, d)
        states = torch.einsum("bqkm,bkd->bqmd", decay, events)
        return states, decay.sum(dim=2)

    def combine(self, states: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """The light head: normalise each scale, mix, project. States may come from any time (nightly rescale)."""
        pooled = states / (totals.unsqueeze(-1) + 1e-6)
        mixed = (torch.softmax(self.mix_logits, 0)[:, None] * pooled).sum(-2)
        return self.head(mixed)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.scale_states(batch, t_query))

    def half_lives_days(self) -> list[float]:
        return (self.log_tau.detach().exp() * math.log(2)).tolist()

    def decay_report(self) -> dict[str, list[float]]:
        return {"half_life_days": self.half_lives_days(),
                "mix": torch.softmax(self.mix_logits.detach(), 0).tolist()}
