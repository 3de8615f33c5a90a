"""Top-K items per user by dot product, for the nightly job.

Two scorers with one call signature, ``scorer(users, exclude) -> (item indices (n, k), scores (n, k))``:

* ``ExactTopK``: the whole catalog, in item blocks sized so the working set stays inside a memory budget; on a
  CUDA device when there is one (half-precision product and on-device top-K, scores of the chosen items
  recomputed in float32), on the CPU otherwise.
* ``AnnTopK``: a faiss inverted-file index (inner product, 8-bit scalar-quantised codes) proposes candidates,
  which are re-scored exactly; faiss is the optional `ann` extra, imported only here and only when used.

One ranking rule for both (and for the popularity lists): score descending, ties to the lower item index.
Excluded items (consumed, or unknown at the date) never appear; a row with fewer than k allowed items is padded
with index -1 and score -inf, which callers drop.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

# Selection inside a block works on chunks of this many adjacent items: the k chunks with the largest maxima hold
# the block's top k (each item ranked above the k-th has its own chunk max above the (k+1)-th chunk's), so topk
# runs over chunk maxima and k*CHUNK candidates instead of the whole row. Blocks are multiples of it.
CHUNK = 32
# Bytes per item column of a block for a row whose selection needs the whole row (a tie at a chunk or candidate
# boundary, rare): a stable sort of that row (values, positions, scratch). One row at a time.
ROW_SCRATCH_BYTES = 24


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("nightly.device is cuda but torch sees no GPU on this worker")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    # Half precision where the hardware multiplies it fast (tensor cores); on a CPU float32 GEMM is the fast one.
    return torch.float16 if device.type == "cuda" else torch.float32


def working_set_bytes(n_users: int, block: int, dim: int, k: int, score_bytes: int, streamed_item_bytes: int) -> int:
    """What scoring one batch of n_users against one item block holds at most, besides the catalog itself:
    per item column the scores, their chunk maxima, the block's vectors when copied to the device and a tied
    row's scratch; fixed, the k*CHUNK candidates a row (values + int64 columns) and the running lists (values +
    int64 indices, twice while merging)."""
    per_item = n_users * score_bytes + -(-n_users * score_bytes // CHUNK) + dim * streamed_item_bytes \
        + ROW_SCRATCH_BYTES
    fixed = n_users * (k + 1) * CHUNK * (score_bytes + 16) + 2 * n_users * 2 * k * (score_bytes + 8)
    return block * per_item + fixed


def block_items(n_users: int, n_items: int, dim: int, k: int, budget_bytes: int, score_bytes: int,
                streamed_item_bytes: int) -> int:
    """The largest item block (a multiple of CHUNK, at most the catalog) whose working set fits the budget."""
    fixed = working_set_bytes(n_users, 0, dim, k, score_bytes, streamed_item_bytes)
    per_item = working_set_bytes(n_users, 1, dim, k, score_bytes, streamed_item_bytes) - fixed
    if budget_bytes < fixed + CHUNK * per_item:
        raise ValueError(f"nightly.topk_memory_mb: {budget_bytes / 2**20:.2f} MiB cannot score {n_users} users at "
                         f"once (needs at least {(fixed + CHUNK * per_item) / 2**20:.2f} MiB); raise it or lower "
                         "nightly.batch_size")
    block = (budget_bytes - fixed) // per_item // CHUNK * CHUNK
    return min(block, -(-n_items // CHUNK) * CHUNK)


def exclusion_pairs(exclude: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Excluded (row, item) pairs as two int64 tensors sorted by item, so each block finds its own by bisection."""
    rows = np.repeat(np.arange(len(exclude), dtype=np.int64), [len(e) for e in exclude])
    cols = np.concatenate([np.asarray(e, np.int64) for e in exclude]) if exclude else np.zeros(0, np.int64)
    order = np.argsort(cols, kind="stable")
    return torch.from_numpy(rows[order]).to(device), torch.from_numpy(cols[order]).to(device)


def ranked(scores: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row by the ranking rule (score descending, ties to the lower item index)."""
    by_item = torch.argsort(items, dim=1, stable=True)
    scores, items = scores.gather(1, by_item), items.gather(1, by_item)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), items.gather(1, by_score)


def rule_top(values: torch.Tensor, cols: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of `values` by the ranking rule, returned as (scores, columns); `cols` maps positions
    to columns (ascending along each row; None = the positions themselves). torch.topk picks among tied values
    arbitrarily, so a row whose k-th score ties with one left out is re-ranked by a stable sort."""
    take = min(k + 1, values.shape[1])
    top, pos = torch.topk(values, take, dim=1)
    if take > k:
        for row in ((top[:, k - 1] == top[:, k]) & torch.isfinite(top[:, k])).nonzero().flatten().tolist():
            order = torch.argsort(values[row], descending=True, stable=True)[:take]
            top[row], pos[row] = values[row, order], order
        top, pos = top[:, :k], pos[:, :k]
    return ranked(top, pos if cols is None else cols.gather(1, pos), k)


def block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row of a block by the ranking rule, via chunk maxima (see CHUNK). If the k-th and
    (k+1)-th chunk maxima tie, an item outside the chosen chunks may tie with the k-th: that row is ranked whole."""
    n, width = scores.shape
    chunks = width // CHUNK
    if chunks <= k + 1:
        return rule_top(scores, None, k)
    maxima = scores[:, :chunks * CHUNK].view(n, chunks, CHUNK).amax(dim=2)
    top_max, top_chunk = torch.topk(maxima, k + 1, dim=1)
    chosen = torch.sort(top_chunk[:, :k], dim=1).values         # ascending chunks: ascending columns
    cols = (chosen.unsqueeze(2) * CHUNK + torch.arange(CHUNK, device=scores.device)).flatten(1)
    if width % CHUNK:                                           # the catalog's last, partial chunk: always a candidate
        cols = torch.cat([cols, torch.arange(chunks * CHUNK, width, device=scores.device).expand(n, -1)], 1)
    top, top_cols = rule_top(scores.gather(1, cols), cols, k)
    for row in ((top_max[:, k - 1] == top_max[:, k]) & torch.isfinite(top_max[:, k])).nonzero().flatten().tolist():
        top[row:row + 1], top_cols[row:row + 1] = rule_top(scores[row:row + 1], None, k)
    return top, top_cols


class ExactTopK:
    """Blocked exact top-K. Per item block: one matrix product into a reused buffer, excluded pairs set to -inf,
    the block's top-k by chunk maxima (block_top), merged into the running lists. Blocks are as large as `budget_bytes` allows for the
    batch (see working_set_bytes); on a GPU the half-precision catalog is kept on the device when it fits in half
    the budget (the rest bounds the blocks), otherwise each block is copied there in turn."""

    def __init__(self, items: torch.Tensor, k: int, budget_bytes: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.items, self.k = items, k                       # float32 on the host: re-scoring reads it
        self.device = torch.device(device)
        self.dtype = dtype or compute_dtype(self.device)
        self.score_bytes = torch.finfo(self.dtype).bits // 8
        self.budget = budget_bytes
        copied = self.device.type != "cpu" or self.dtype != items.dtype
        if copied and items.numel() * self.score_bytes <= budget_bytes // 2:
            self.table, self.streamed_bytes = items.to(self.device, self.dtype), 0
            self.budget -= self.table.numel() * self.score_bytes
        else:
            self.table, self.streamed_bytes = items, self.score_bytes if copied else 0
        self._buffer = torch.empty(0, dtype=self.dtype, device=self.device)

    def block_for(self, n_users: int) -> int:
        return block_items(n_users, len(self.items), self.items.shape[1], self.k, self.budget, self.score_bytes,
                           self.streamed_bytes)

    def _scores(self, users: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """users x items[start:stop] into the reused buffer (fresh pages cost as much as the product itself)."""
        block = self.table[start:stop].to(self.device, self.dtype, non_blocking=True)
        size = len(users) * (stop - start)
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=self.dtype, device=self.device)
        return torch.matmul(users, block.T, out=self._buffer[:size].view(len(users), stop - start))

    def __call__(self, users: torch.Tensor, exclude: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = len(users), self.k
        on_device = users.to(self.device, self.dtype)
        best_s = torch.full((n, k), -torch.inf, dtype=self.dtype, device=self.device)
        best_i = torch.full((n, k), -1, dtype=torch.long, device=self.device)
        ex_rows, ex_cols = exclusion_pairs(exclude, self.device)
        block = self.block_for(n)
        for start in range(0, len(self.items), block):
            stop = min(start + block, len(self.items))
            scores = self._scores(on_device, start, stop)
            lo, hi = torch.searchsorted(ex_cols, torch.tensor([start, stop], device=self.device)).tolist()
            scores[ex_rows[lo:hi], ex_cols[lo:hi] - start] = -torch.inf
            cand_s, cand_i = block_top(scores, k)
            # Earlier blocks hold lower indices, so the running list goes first: ties keep the lower index.
            best_s, best_i = ranked(torch.cat([best_s, cand_s], 1), torch.cat([best_i, cand_i + start], 1), k)
        return self._rescored(users, best_i.cpu(), torch.isfinite(best_s).cpu())

    def _rescored(self, users: torch.Tensor, idx: torch.Tensor, found: torch.Tensor):
        """The block products chose the items; their scores are re-computed by `exact_scores` and re-ranked. A
        product's last bit depends on where a user sits in its batch (the matrix kernel's tiles), and a half-precision
        one is coarser still: the written scores must not depend on which users shared a batch."""
        scores = exact_scores(users.float().cpu(), self.items, idx.clamp(min=0), self.budget)
        scores[~found] = -torch.inf
        scores, idx = ranked(scores, torch.where(found, idx, -1), self.k)
        return idx, scores


def exact_scores(users: torch.Tensor, items: torch.Tensor, idx: torch.Tensor, budget_bytes: int) -> torch.Tensor:
    """Dot products of each user with their candidate items (n, c), gathered a slice of users at a time so the
    gathered vectors stay within the budget. Accumulated in float64 and rounded to float32 once: a user's score is
    then the same whatever batch it was computed in (float32 products of float32 vectors are exact in float64)."""
    n, c = idx.shape
    rows = max(1, budget_bytes // max(c * items.shape[1] * 12, 1))   # the float32 gather + its float64 copy
    out = torch.empty((n, c), dtype=torch.float32)
    for start in range(0, n, rows):
        part = idx[start:start + rows]
        vectors = items.index_select(0, part.flatten()).view(len(part), c, -1)   # index_select: 2x faster than items[part]
        out[start:start + rows] = torch.bmm(vectors.double(),
                                            users[start:start + rows].double().unsqueeze(2)).squeeze(2)
    return out


# -- approximate: faiss ---------------------------------------------------------------------------------------

def import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("nightly.topk: ann needs faiss-cpu (pip install 'ebbtide[ann]', or faiss-gpu on GPU "
                          "clusters); nightly.topk: exact needs nothing extra") from err
    return faiss


def ann_lists(n_items: int, requested: int = 0) -> int:
    """IVF lists: `requested`, else ~2*sqrt(items) (~500 items a list at 1M), and never so many that k-means
    gets fewer than 39 training points a list (faiss warns below that)."""
    lists = requested or int(2 * math.sqrt(n_items))
    return max(1, min(lists, n_items // 39))


def build_ann_index(items: np.ndarray, lists: int, seed: int = 1234):
    """IVF index for inner-product search over `items` (ids = row numbers): a k-means coarse quantiser trained
    on a seeded sample (the same items give the same index), and per list 4-bit product-quantised residuals, one
    dimension a sub-quantiser, scanned with faiss' SIMD fast-scan kernels (d/2 bytes an item; candidates are
    re-scored exactly, so the codes only have to find them)."""
    faiss = import_faiss()
    items = np.ascontiguousarray(items, dtype=np.float32)
    dim = items.shape[1]
    if dim % 2:
        raise ValueError(f"nightly.topk: ann needs an even embedding size (4-bit codes are packed in pairs), got {dim}")
    index = faiss.index_factory(dim, f"IVF{lists},PQ{dim}x4fs", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = seed
    sample = np.random.default_rng(seed).choice(len(items), min(len(items), 50 * lists), replace=False)
    if len(sample) < 39 * 16:      # tiny catalogs: 16 codes a dimension from fewer points is fine, not a warning
        faiss.downcast_index(index).pq.cp.min_points_per_centroid = 1
    index.train(items[np.sort(sample)])
    index.add(items)
    return index


def write_ann_index(index, path: Path) -> Path:
    """Written beside, then renamed: a worker never reads half an index."""
    faiss = import_faiss()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    faiss.write_index(index, str(staging))
    os.replace(staging, path)
    return path


class AnnTopK:
    """Approximate top-K: the index proposes rerank*k + (the batch's largest number of excluded indexed items)
    candidates per user, probing `nprobe` lists; candidates are re-scored exactly (`exact_scores`), excluded ones
    dropped, and ranked by the rule. Over-fetching by the exclusions means filtering can only leave a row short
    when its probed lists held too few allowed items; such rows (counted in `fallbacks`) get the exact top-K, so
    every user still gets k items."""

    def __init__(self, index, items: torch.Tensor, k: int, nprobe: int, rerank: int, exact: ExactTopK):
        faiss = import_faiss()
        self.index, self.items, self.k, self.rerank, self.exact = index, items, k, rerank, exact
        self.params = faiss.SearchParametersIVF(nprobe=nprobe)
        self.fallbacks = 0

    def __call__(self, users: torch.Tensor, exclude: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        indexed, k = self.index.ntotal, self.k
        excluded = [np.unique(np.asarray(e, np.int64)) for e in exclude]
        excluded = [e[e < indexed] for e in excluded]         # unindexed items are never proposed
        fetch = min(indexed, self.rerank * k + max((len(e) for e in excluded), default=0))
        _, cand = self.index.search(np.ascontiguousarray(users.float().numpy()), fetch, params=self.params)
        cand = torch.from_numpy(cand)
        scores = exact_scores(users.float(), self.items, cand.clamp(min=0), self.exact.budget)
        ex_rows, ex_cols = exclusion_pairs(excluded, torch.device("cpu"))
        banned = torch.isin(torch.arange(len(cand)).unsqueeze(1) * indexed + cand, ex_rows * indexed + ex_cols)
        scores[banned | (cand < 0)] = -torch.inf
        scores, idx = ranked(scores, cand, k)
        allowed = torch.tensor([min(k, indexed - len(e)) for e in excluded])
        short = (torch.isfinite(scores).sum(dim=1) < allowed).nonzero().flatten()
        if len(short):
            self.fallbacks += len(short)
            idx[short], scores[short] = self.exact(users[short], [exclude[r] for r in short.tolist()])
        return idx, scores
