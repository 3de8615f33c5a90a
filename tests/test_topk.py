"""Top-K scorers: blocked exact == a plain full ranking (exclusions, ties, every block size), the memory budget
bounds what a batch holds (measured), half precision, ANN validity, recall and its exact fallback, and the
Arrow form of item_embeddings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ebbtide.generate import clustered_embeddings
from ebbtide.nightly import item_embeddings_arrow
from ebbtide.topk import CHUNK, ExactTopK, block_items, working_set_bytes


def reference(users: torch.Tensor, items: torch.Tensor, k: int, exclude: list[np.ndarray]):
    """The plain definition: every score (float64 sums rounded to float32, as `exact_scores`), exclusions at -inf,
    a stable descending sort (ties: lower index)."""
    scores = (users.double() @ items.double().T).float()
    for row, ex in enumerate(exclude):
        scores[row, torch.from_numpy(ex)] = -torch.inf
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return order, scores.gather(1, order)


def assert_same_ranking(idx, scores, ref_idx, ref_scores):
    found = torch.isfinite(ref_scores)
    assert torch.equal(torch.isfinite(scores), found)
    assert torch.equal(idx[found], ref_idx[found]) and torch.equal(scores[found], ref_scores[found])
    assert (idx[~found] == -1).all(), "rows with fewer than k allowed items are padded with -1 / -inf"


def tied_catalog(n_users=40, n_items=3001, dim=8, seed=0):
    """Small integer vectors: exact ties everywhere, also across chunk, block and candidate boundaries."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(-2, 3, (n_users, dim), generator=g).float()
    items = torch.randint(-2, 3, (n_items, dim), generator=g).float()
    items[1500:1600] = items[7]                      # a run of duplicates of one item
    exclude = [np.sort(np.random.default_rng(r).choice(n_items, 25 * (r % 4), replace=False)) for r in range(n_users)]
    exclude[1] = np.arange(n_items - 5)              # fewer than k allowed items
    exclude[2] = np.arange(n_items)                  # none allowed
    return users, items, exclude


@pytest.mark.parametrize("budget_mb", [1.2, 2, 8, 64])
def test_blocked_exact_equals_full_ranking_with_exclusions_and_ties(budget_mb):
    users, items, exclude = tied_catalog()
    scorer = ExactTopK(items, 10, int(budget_mb * 2**20))
    assert scorer.block_for(len(users)) % CHUNK == 0
    assert_same_ranking(*scorer(users, exclude), *reference(users, items, 10, exclude))


def test_exact_on_continuous_vectors_and_a_catalog_smaller_than_k():
    users, items = (torch.from_numpy(a) for a in clustered_embeddings(64, 5000, dim=16, clusters=50))
    exclude = [np.arange(r, 5000, 97) for r in range(64)]
    assert_same_ranking(*ExactTopK(items, 20, 4 << 20)(users, exclude), *reference(users, items, 20, exclude))
    few = items[:7]
    idx, scores = ExactTopK(few, 10, 4 << 20)(users, [np.zeros(0, np.int64)] * 64)
    assert (idx[:, 7:] == -1).all() and torch.isfinite(scores[:, :7]).all()


def test_a_users_scores_do_not_depend_on_the_batch_it_is_scored_in():
    """Nightly slices its users into batches by where Spark put them; a re-run (another partitioning, another
    process) must write the same scores bit for bit, although a float32 product's last bit depends on where a row
    sits among the matrix kernel's tiles."""
    users, items = (torch.from_numpy(a) for a in clustered_embeddings(67, 3000, dim=40, clusters=30, seed=3))
    none = [np.zeros(0, np.int64)] * 67
    scorer = ExactTopK(items, 20, 8 << 20)
    idx, scores = scorer(users, none)
    for start, stop in ((0, 1), (5, 6), (3, 40), (13, 67), (30, 33)):
        part_idx, part_scores = scorer(users[start:stop], none[start:stop])
        assert torch.equal(part_idx, idx[start:stop]) and torch.equal(part_scores, scores[start:stop]), (start, stop)


def test_half_precision_product_keeps_float32_scores_and_order():
    users, items = (torch.from_numpy(a) for a in clustered_embeddings(64, 4000, dim=32, clusters=40, seed=1))
    exclude = [np.arange(r, 4000, 50) for r in range(64)]
    idx, scores = ExactTopK(items, 20, 64 << 20, dtype=torch.float16)(users, exclude)   # the GPU's arithmetic
    ref_idx, _ = reference(users, items, 20, exclude)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(idx, ref_idx)])
    assert overlap >= 0.95, overlap
    torch.testing.assert_close(scores, (users.unsqueeze(1) * items[idx]).sum(-1))    # float32 dot products
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert not any(np.isin(idx[r].numpy(), exclude[r]).any() for r in range(64))


def test_block_is_the_largest_that_fits_the_budget():
    for n_users, budget in [(1024, 256 << 20), (100, 3 << 20), (4096, 64 << 20)]:
        block = block_items(n_users, 10**9, 64, 20, budget, 4, 0)
        assert working_set_bytes(n_users, block, 64, 20, 4, 0) <= budget
        assert working_set_bytes(n_users, block + CHUNK, 64, 20, 4, 0) > budget
    with pytest.raises(ValueError, match="nightly.topk_memory_mb"):
        block_items(1024, 10**6, 64, 20, 1 << 20, 4, 0)


PEAK = textwrap.dedent("""
    import sys, numpy as np, torch
    from ebbtide.topk import ExactTopK

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(512, 32, generator=g), torch.randn(200_000, 32, generator=g)
    scorer = ExactTopK(items, 20, int(sys.argv[1]))
    ExactTopK(items[:4096], 20, 16 << 20)(users, [np.zeros(0, np.int64)] * 512)   # library code paged in
    open("/proc/self/clear_refs", "w").write("5")          # the peak (VmHWM) restarts from the current RSS
    before = status("VmRSS:")
    scorer(users, [np.zeros(0, np.int64)] * 512)
    print(status("VmHWM:") - before)
""")


def test_memory_budget_bounds_the_peak_of_a_batch():
    """Peak RSS growth of a fresh process while scoring 512 users x 200k items (library code paged in first):
    within a 24 MiB budget (plus 2 MiB of allocator slack), while a budget that allows one block (a 410 MB score matrix) shows up in the same
    measurement."""
    def peak(budget: int) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK, str(budget)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    bounded, unbounded = peak(24 << 20), peak(4 << 30)
    assert bounded <= (24 << 20) + (2 << 20), bounded
    assert unbounded >= 400 << 20, f"the measurement must see an unbounded score block ({unbounded})"


def _clustered_with_consumed(n_users=300, n_items=20_000, k=20, seed=3):
    users, items = (torch.from_numpy(a) for a in clustered_embeddings(n_users, n_items, dim=32, clusters=200,
                                                                     seed=seed))
    top100, _ = ExactTopK(items, 100, 64 << 20)(users, [np.zeros(0, np.int64)] * n_users)
    rng = np.random.default_rng(seed)
    consumed = [np.sort(rng.choice(t.numpy(), 30, replace=False)) for t in top100]   # users consume what they like
    return users, items, consumed


def test_ann_returns_valid_unconsumed_items_with_recall():
    faiss = pytest.importorskip("faiss", reason="the `ann` extra (faiss-cpu) is not installed")
    from ebbtide.topk import AnnTopK, ann_lists, build_ann_index

    users, items, consumed = _clustered_with_consumed()
    exact = ExactTopK(items, 20, 64 << 20)
    faiss.omp_set_num_threads(1)
    ann = AnnTopK(build_ann_index(items.numpy(), ann_lists(len(items))), items, 20, 16, 5, exact)
    idx, scores = ann(users, consumed)
    ref_idx, _ = exact(users, consumed)
    assert ((idx >= 0) & (idx < len(items))).all() and torch.isfinite(scores).all()
    for row in range(len(users)):
        assert len(set(idx[row].tolist())) == 20 and not np.isin(idx[row].numpy(), consumed[row]).any()
    torch.testing.assert_close(scores, (users.unsqueeze(1) * items[idx]).sum(-1))    # re-scored exactly
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(idx, ref_idx)])
    assert recall >= 0.9, recall


def test_ann_rows_left_short_by_exclusions_get_the_exact_top_k():
    faiss = pytest.importorskip("faiss", reason="the `ann` extra (faiss-cpu) is not installed")
    from ebbtide.topk import AnnTopK, build_ann_index

    users, items, _ = _clustered_with_consumed(n_users=50, n_items=4000)
    index = build_ann_index(items.numpy(), 100)                  # ~40 items a list
    faiss.omp_set_num_threads(1)
    nearest = index.quantizer.search(users.numpy(), 1)[1][:, 0]
    lists = faiss.extract_index_ivf(index).invlists
    # Each user has consumed most of the one list that is probed: the over-fetch cannot find k allowed items there.
    consumed = [np.sort(faiss.rev_swig_ptr(lists.get_ids(int(c)), lists.list_size(int(c))).copy())[:-5]
                for c in nearest]
    exact = ExactTopK(items, 20, 64 << 20)
    ann = AnnTopK(index, items, 20, 1, 1, exact)
    idx, scores = ann(users, consumed)
    assert ann.fallbacks == len(users)
    assert_same_ranking(idx, scores, *exact(users, consumed))


def test_item_embeddings_arrow_is_the_buffer_itself():
    vectors = np.random.default_rng(0).standard_normal((1000, 24)).astype(np.float32)
    table = item_embeddings_arrow(vectors)
    values = table.column("embedding").chunk(0).values
    assert values.buffers()[1].address == vectors.ctypes.data, "no copy of the float buffer"
    assert table.column("item_idx").to_pylist() == list(range(1000))
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), vectors)


def test_exact_path_needs_no_faiss():
    code = ("import sys, numpy as np, torch, ebbtide.nightly\nfrom ebbtide.topk import ExactTopK\n"
            "ExactTopK(torch.randn(100, 4), 5, 1 << 20)(torch.randn(3, 4), [np.zeros(0, np.int64)] * 3)\n"
            "print('faiss' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False"


def test_workers_map_the_model_instead_of_copying_it(tmp_path):
    """The nightly's workers load with mmap=True: the item table is the mapped weights file (shared by the
    workers of a host through the page cache), equal to a plain load."""
    from ebbtide.artifacts import load_artifact, write_artifact
    from ebbtide.models import build_model

    conf = {"name": "decay_pool", "n_items": 500, "n_types": 4, "dim": 16, "max_len": 20}
    path = write_artifact(tmp_path, build_model("decay_pool", 500, 4, 16, 20), conf, {})
    mapped, _, _ = load_artifact(path, mmap=True)
    assert any(line.rstrip().endswith(str(path / "weights.pt")) for line in open("/proc/self/maps"))
    plain, _, _ = load_artifact(path)
    assert torch.equal(mapped.item_embeddings(), plain.item_embeddings())
