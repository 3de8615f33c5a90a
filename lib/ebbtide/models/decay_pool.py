"""Multi-timescale exponential decay pooling: the continuous-time form of u_t = a*u_(t-1) + (1-a)*u_new.

With K learned time constants tau_k, the state of scale k at query time t_q is
    s_k(t_q) = sum_{j <= i} w_j * exp(-(t_q - t_j) / tau_k) * e_j
(each new event adds its embedding; between events the state shrinks by exp(-dt / tau_k), i.e. a = exp(-dt/tau_k)).
Each scale is read as s_k / (m_k + lambda_k), with m_k the decayed event mass and lambda_k a learned pseudo-count:
a plain average s_k / m_k would not change while the user is idle (the common decay factor cancels), whereas with
lambda_k an idle user's short-term scales fade toward the prior (the head's bias) as their mass decays.
Because states and masses only rescale between events, they can be carried forward exactly to any later date:
the nightly job uses this for users without new events.
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
        self.log_pseudo_count = nn.Parameter(torch.zeros(len(half_lives_days)))   # lambda_k = exp(.) events
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

    def final_state(self, batch: Batch, t_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, d) states and (B, K) masses of the whole history at t_query (B,), computed in float64:
        the nightly job stores these and later only rescales them."""
        days = ((t_query.double().unsqueeze(1) - batch.ts.double()) / 86_400.0).clamp(min=0)     # (B, L)
        tau = self.log_tau.double().exp()
        w = self.type_weight.double().exp()[batch.types.clamp(min=0)] * batch.mask.double()      # (B, L)
        decay = torch.exp(-days.unsqueeze(-1) / tau) * w.unsqueeze(-1)                           # (B, L, K)
        events = self.embed_events(batch).double()
        return torch.einsum("blk,bld->bkd", decay, events), decay.sum(dim=1)

    def combine(self, states: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """The light head: shrink each scale by its decayed mass, mix, project. States may come from any time
        (the nightly job rescales stored states instead of re-encoding)."""
        pooled = states / (totals + self.log_pseudo_count.exp()).unsqueeze(-1)
        mixed = (torch.softmax(self.mix_logits, 0)[:, None] * pooled).sum(-2)
        return self.head(mixed)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.scale_states(batch, t_query))

    def rescale(self, states: torch.Tensor, totals: torch.Tensor, elapsed_seconds: torch.Tensor):
        """Carry (B, K, d) states and (B, K) masses forward by elapsed_seconds (B,) with no new events."""
        factor = torch.exp(-(elapsed_seconds.float() / 86_400.0).unsqueeze(-1) / self.log_tau.exp())   # (B, K)
        return states * factor.unsqueeze(-1), totals * factor

    def half_lives_days(self) -> list[float]:
        return (self.log_tau.detach().exp() * math.log(2)).tolist()

    def decay_report(self) -> dict[str, list[float]]:
        return {"half_life_days": self.half_lives_days(),
                "mix": torch.softmax(self.mix_logits.detach(), 0).tolist()}
