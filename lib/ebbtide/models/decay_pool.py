"""Multi-timescale decay pooling: a user's interest is the decay-weighted mean of the events they had.

An event j of type y_j, seen Delta_j days before the query time, gets the weight

    a_j = w(y_j) * kappa(Delta_j),    kappa(Delta) = pi_0 + sum_k pi_k * exp(-Delta / tau_k)

with learned time constants tau_k (reported as half-lives tau_k * ln 2), learned mixing weights pi (a softmax over
a non-decaying long-term part pi_0 and K decaying parts) and a learned log-weight per event type. The interest is

    u(t) = head( sum_j a_j e_j / (sum_j a_j + lambda) )

with e_j the event's item (+ type) embedding and lambda a learned pseudo-count. Read between events, this is the
exponentially weighted moving average u_t = alpha * u_(t-1) + (1 - alpha) * e_new of the seed articles with
alpha = m / (m + a_new), m the decayed mass of the earlier events: every new event pulls the average towards
itself, older events fade at the learned rates. kappa is the only weighting in the model, so it is exactly
what the report plots; its half-life is that of the decaying part (models.base.kernel_half_life). lambda makes an
idle user's short-term part fade (the mass shrinks while lambda stays), leaving the long-term taste pi_0.

Because every part of the mass and of the weighted sum only rescales between events (by exp(-dt / tau_k), the
long-term part by 1), the per-part states can be carried forward exactly to any later time: the nightly job
stores them and rescales them for users without new events.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ebbtide.models.base import DAY_SECONDS, Batch, InterestModel, causal_mask, elapsed_days


class DecayPool(InterestModel):
    name = "decay_pool"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4,
                 half_lives_days: tuple[float, ...] = (0.1, 1.0, 10.0), dropout: float = 0.1):
        super().__init__(n_items, dim, n_types)
        taus = torch.tensor([h / math.log(2) for h in half_lives_days])
        self.log_tau = nn.Parameter(taus.log())                     # decaying parts' time constants, days
        self.mix_logits = nn.Parameter(torch.zeros(len(half_lives_days) + 1))   # [long-term, decaying...]
        self.log_pseudo_count = nn.Parameter(torch.zeros(()))       # lambda = exp(.) events
        self.type_weight = nn.Parameter(torch.zeros(n_types + 1))   # learned log-weight per event type
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, dim)
        nn.init.eye_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # -- the kernel: one place ------------------------------------------------------------------------------
    def part_decay(self, days: torch.Tensor) -> torch.Tensor:
        """(..., K + 1) decay factor of each part at the given ages: 1 for the long-term part."""
        tau = self.log_tau.exp().to(days.dtype)
        decaying = torch.exp(-days.unsqueeze(-1) / tau)
        return torch.cat([torch.ones_like(decaying[..., :1]), decaying], dim=-1)

    @property
    def n_parts(self) -> int:
        """Parts of the state the nightly job stores per user: the long-term part and each decaying one."""
        return self.mix_logits.numel()

    def mix(self) -> torch.Tensor:
        return torch.softmax(self.mix_logits, 0)

    def decay_kernel(self, days: torch.Tensor) -> torch.Tensor:
        return self.part_decay(days) @ self.mix().to(days.dtype)

    # -- encoding -------------------------------------------------------------------------------------------
    def event_weights(self, batch: Batch) -> torch.Tensor:
        return self.type_weight.exp()[batch.types.clamp(min=0)] * batch.mask         # (B, L)

    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        days = elapsed_days(t_query, batch.ts)                                       # (B, Lq, Lk)
        weights = self.decay_kernel(days) * causal_mask(batch) * self.event_weights(batch).unsqueeze(1)
        pooled = weights @ self.drop(self.embed_events(batch))                       # (B, Lq, d)
        return self.head(self.drop(pooled / (weights.sum(-1, keepdim=True) + self.log_pseudo_count.exp())))

    # -- exact carry-forward (nightly) ----------------------------------------------------------------------
    def final_state(self, batch: Batch, t_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-part weighted sums (B, K+1, d) and masses (B, K+1) of the whole history at t_query (B,), in
        float64: the nightly job stores these and later only rescales them."""
        days = ((t_query.double().unsqueeze(1) - batch.ts.double()) / DAY_SECONDS).clamp(min=0)      # (B, L)
        parts = self.part_decay(days) * self.event_weights(batch).double().unsqueeze(-1)            # (B, L, K+1)
        return torch.einsum("blk,bld->bkd", parts, self.embed_events(batch).double()), parts.sum(dim=1)

    def rescale(self, states: torch.Tensor, masses: torch.Tensor, elapsed_seconds: torch.Tensor):
        """Carry states (B, K+1, d) and masses (B, K+1) forward by elapsed_seconds (B,) without new events."""
        factor = self.part_decay(elapsed_seconds.to(masses.dtype) / DAY_SECONDS)                 # (B, K+1)
        return states * factor.unsqueeze(-1), masses * factor

    def combine(self, states: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
        """The light head on stored (or rescaled) states: mix the parts, normalise, project."""
        mix = self.mix().to(states.dtype)
        pooled = (mix[:, None] * states).sum(-2) / ((mix * masses).sum(-1, keepdim=True)
                                                    + self.log_pseudo_count.exp().to(states.dtype))
        return self.head(pooled.to(self.head.weight.dtype))

    def half_lives_days(self) -> list[float]:
        return (self.log_tau.detach().exp() * math.log(2)).tolist()

    def decay_report(self) -> dict:
        return {**super().decay_report(), "part_half_life_days": self.half_lives_days(),
                "mix": self.mix().detach().tolist()}
