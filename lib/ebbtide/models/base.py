"""The interface every interest model shares.

A batch is a padded history: item indices (0 = padding, so vocabulary index i is stored as i + 1), event times in
seconds, event types, session indices and lengths. Each model maps (history, query time) -> a user embedding;
items share one embedding table and score = dot product. The query time matters: the same history yields a
different embedding a week later, because interest decays while the user is idle.

What a model implements: ``encode_positions`` (the user embedding after every prefix of the history, each queried
at its own time; training uses it for next-item prediction at every position). Decay models also implement
``decay_kernel`` (the weight they give a past event as a function of its age), from which the reported half-life
is derived in one place (``kernel_half_life``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DAY_SECONDS = 86_400.0


@dataclass
class Batch:
    items: torch.Tensor       # (B, L) long, 0 = padding, else vocab index + 1
    ts: torch.Tensor          # (B, L) float64/float32 seconds (relative to any origin; only differences matter)
    types: torch.Tensor       # (B, L) long event type code
    sessions: torch.Tensor    # (B, L) long session index (0 = oldest in window)
    lengths: torch.Tensor     # (B,) long
    # (B,) long: positions before this one are context only (training windows overlap; see feed.py). Targets
    # are the events at positions >= max(1, first_target).
    first_target: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        tensors = (self.items, self.ts, self.types, self.sessions, self.lengths, self.first_target)
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None for t in tensors))

    @property
    def mask(self) -> torch.Tensor:
        return self.items > 0

    def target_mask(self) -> torch.Tensor:
        """(B, L-1) True where position i+1 is a target predicted from positions 0..i."""
        valid = self.items[:, 1:] > 0
        if self.first_target is None:
            return valid
        positions = torch.arange(1, self.items.shape[1], device=self.items.device)
        return valid & (positions.unsqueeze(0) >= self.first_target.unsqueeze(1))

    @staticmethod
    def from_histories(histories, max_len: int) -> Batch:
        """[(items, ts, types, sessions), ...] variable-length numpy histories -> a padded batch."""
        return Batch(*(torch.from_numpy(a) for a in pad_arrays(histories, max_len)))


def pad_arrays(histories, max_len: int) -> tuple[np.ndarray, ...]:
    """Right-padded (n, max_len) arrays keeping the most recent max_len events; item index i is stored as i + 1
    (0 = padding). Returns items, ts, types, sessions, lengths."""
    n = len(histories)
    items = np.zeros((n, max_len), np.int64)
    ts = np.zeros((n, max_len), np.float64)
    types = np.zeros((n, max_len), np.int64)
    sessions = np.zeros((n, max_len), np.int64)
    lengths = np.zeros(n, np.int64)
    for r, (it, t, ty, se) in enumerate(histories):
        m = min(len(it), max_len)
        if m:
            items[r, :m] = np.asarray(it[-m:], np.int64) + 1
            ts[r, :m] = t[-m:]
            types[r, :m] = ty[-m:]
            sessions[r, :m] = se[-m:]
        lengths[r] = m
    return items, ts, types, sessions, lengths


class InterestModel(nn.Module, ABC):
    """Base: item and event-type tables, scoring, and `encode` built on `encode_positions`."""

    name = "base"

    def __init__(self, n_items: int, dim: int = 64, n_types: int = 4):
        super().__init__()
        self.n_items = n_items
        self.dim = dim
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.type_emb = nn.Embedding(n_types + 1, dim)
        # One scale for every table added into an event vector: with nn.Embedding's N(0, 1) the type vectors
        # would be sqrt(d) times longer than the item vectors and drown them.
        for table in (self.item_emb, self.type_emb):
            nn.init.normal_(table.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # -- what a model implements ------------------------------------------------------------------------
    @abstractmethod
    def encode_positions(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        """User embedding after each position i of the history, queried at t_query[:, i]: (B, L, d).

        Position i may only use events 0..i (causal). Training queries position i at the time of event i+1.
        """

    def decay_kernel(self, days: torch.Tensor) -> torch.Tensor | None:
        """Relative weight the model gives an event `days` old (1 at age 0), or None without an explicit decay."""
        return None

    # -- shared ----------------------------------------------------------------------------------------
    def forward(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        """DDP hooks run on forward(): training calls the model, which encodes every position."""
        return self.encode_positions(batch, t_query)

    def encode(self, batch: Batch, t_query: torch.Tensor) -> torch.Tensor:
        """User embedding as of t_query (B,) given the whole history: (B, d)."""
        q = t_query.to(batch.ts.dtype).unsqueeze(1).expand_as(batch.ts)
        per_position = self.encode_positions(batch, q)
        last = (batch.lengths - 1).clamp(min=0)
        return per_position[torch.arange(len(last), device=last.device), last]

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d): row i is vocabulary index i."""
        return self.item_emb.weight[1:]

    def score(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        table = self.item_embeddings() if items is None else self.item_emb(items + 1)
        return user @ table.T if items is None or items.dim() == 1 else (user.unsqueeze(-2) * table).sum(-1)

    def embed_events(self, batch: Batch) -> torch.Tensor:
        return self.item_emb(batch.items) + self.type_emb(batch.types.clamp(min=0))

    def decay_report(self) -> dict:
        """The learned decay as reported (artifact meta, evaluation report): the kernel sampled on a grid of ages
        and its half-life; models without an explicit decay report nothing."""
        grid = torch.tensor([*KERNEL_GRID_DAYS, float("inf")], dtype=torch.float64)
        with torch.no_grad():
            kernel = self.decay_kernel(grid)
        if kernel is None:
            return {}
        kernel = kernel.double().numpy()
        return {"kernel_days": KERNEL_GRID_DAYS, "kernel": kernel[:-1].tolist(), "kernel_floor": float(kernel[-1]),
                "half_life_days": kernel_half_life(kernel[:-1], np.asarray(KERNEL_GRID_DAYS), kernel[-1])}


# Ages at which a decay kernel is reported: fine near 0, out to a year.
KERNEL_GRID_DAYS = np.unique(np.concatenate([np.linspace(0, 2, 81), np.linspace(2, 30, 113),
                                             np.geomspace(30, 365, 40)])).tolist()


def kernel_half_life(kernel: np.ndarray, days: np.ndarray, floor: float) -> float:
    """Half-life of the decaying part of a kernel sampled at `days` (days[0] = 0): the age at which
    kernel - floor falls to half its value at age 0, where floor is the weight that never decays (the kernel's
    limit). inf when nothing decays or the decaying part has not halved within the grid."""
    decaying = kernel - floor
    below = np.nonzero(decaying <= decaying[0] / 2)[0]
    if decaying[0] <= 1e-9 * max(abs(kernel[0]), 1e-30) or not len(below):
        return float("inf")
    i = int(below[0])
    # linear interpolation between the grid ages around the crossing
    x0, x1, y0, y1 = days[i - 1], days[i], decaying[i - 1], decaying[i]
    return float(x0 + (y0 - decaying[0] / 2) * (x1 - x0) / (y0 - y1)) if y0 != y1 else float(x1)


def elapsed_days(t_query: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """(B, Lq, Lk) non-negative days from each key event to each query time."""
    return ((t_query.unsqueeze(-1) - ts.unsqueeze(-2)) / DAY_SECONDS).clamp(min=0).float()


def causal_mask(batch: Batch) -> torch.Tensor:
    """(B, L, L) True where query position i may see key position j: j <= i and j is not padding."""
    length = batch.items.shape[1]
    tri = torch.ones(length, length, dtype=torch.bool, device=batch.items.device).tril()
    return tri.unsqueeze(0) & batch.mask.unsqueeze(1)
