"""Full-ranking evaluation of the models and honest baselines in one harness, and the report.

Every scorer ranks *all* items for each evaluation user at the target's time; items already in the user's
history are masked (``evaluate.exclude_seen``). Metrics: HR, NDCG, MRR at each K, and catalog coverage of the
top-K lists. Baselines: most popular, time-decayed popularity, SAR-style item-item similarity with time-decayed
user affinity, last-item co-occurrence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ebbtide.feed import SEQUENCE_COLUMNS, Snapshot, read_snapshot_frame
from ebbtide.models.base import DAY_SECONDS, Batch, InterestModel

log = logging.getLogger(__name__)
EVENT_WEIGHTS = np.array([1.0, 2.0, 3.0, 5.0])


@dataclasses.dataclass
class EvalSet:
    """One target per user: the history before it (padded), the query time and the items seen."""

    batch: Batch
    t_query: torch.Tensor        # (N,) float64 seconds
    targets: np.ndarray          # (N,) vocab index
    seen: list[np.ndarray]       # per user: vocab indices in the full history
    full: pd.DataFrame           # histories as variable-length arrays (baselines)
    train: pd.DataFrame          # training-part events per user (baselines fit on these only)
    n_items: int

    def __len__(self) -> int:
        return len(self.targets)

    @staticmethod
    def build(snapshot: Snapshot, split, which: str, max_len: int, novel_only: bool = True) -> EvalSet:
        """novel_only: keep only users whose target is not already in their history (the population on which
        masking seen items is fair; with it off, nothing is masked and repeats count)."""
        frame = read_snapshot_frame(snapshot, SEQUENCE_COLUMNS)
        rows, train_rows = [], []
        for it, ts, ty, se in zip(*(frame[c].values for c in SEQUENCE_COLUMNS)):
            ts = np.asarray(ts, dtype=np.float64)
            if split.kind == "leave_one_out":
                n = len(ts)
                pos = n - 1 if which == "test" else n - 2
                train_end = n - 2
            else:
                lo, hi = split.test_window if which == "test" else split.val_window
                inside = np.nonzero((ts >= lo) & (ts < hi))[0]
                pos = int(inside[0]) if len(inside) else -1
                train_end = int(np.searchsorted(ts, split.train_before, side="left"))
            if train_end > 0:
                train_rows.append((np.asarray(it[:train_end]), ts[:train_end], np.asarray(ty[:train_end])))
            if pos < 1:
                continue            # no target in the window, or no history before it
            if novel_only and int(it[pos]) in set(np.asarray(it[:pos]).tolist()):
                continue
            rows.append((np.asarray(it[:pos]), ts[:pos], np.asarray(ty[:pos]), np.asarray(se[:pos]),
                         int(it[pos]), ts[pos]))
        batch = Batch.from_histories([r[:4] for r in rows], max_len)
        full = pd.DataFrame({"items": [r[0] for r in rows], "ts": [r[1] for r in rows],
                             "types": [r[2] for r in rows]})
        train = pd.DataFrame({"items": [r[0] for r in train_rows], "ts": [r[1] for r in train_rows],
                              "types": [r[2] for r in train_rows]})
        return EvalSet(batch, torch.tensor([r[5] for r in rows], dtype=torch.float64),
                       np.array([r[4] for r in rows], dtype=np.int64), [np.unique(r[0]) for r in rows],
                       full, train, snapshot.n_items)


# ------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------
def rank_metrics(score_chunks, eval_set: EvalSet, ks=(10, 20), exclude_seen: bool = True,
                 curve_max_k: int = 0) -> dict[str, float]:
    """score_chunks yields (start, scores[(n, n_items)]) covering all eval users in order."""
    ks = tuple(sorted(ks))
    hits = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    mrr = {k: 0.0 for k in ks}
    covered = {k: np.zeros(eval_set.n_items, bool) for k in ks}
    curve = np.zeros(curve_max_k)
    n = len(eval_set)
    for start, scores in score_chunks:
        scores = torch.as_tensor(scores, dtype=torch.float32).clone()
        rows = torch.arange(scores.shape[0])
        targets = torch.from_numpy(eval_set.targets[start:start + len(scores)])
        if exclude_seen:  # the eval set then holds only targets the user had not seen (EvalSet.build)
            for r in range(len(scores)):
                scores[r, torch.from_numpy(eval_set.seen[start + r])] = -torch.inf
        target_scores = scores[rows, targets]
        rank = (scores > target_scores.unsqueeze(1)).sum(1).numpy()        # 0-based, ties favour the target
        top = torch.topk(scores, max(max(ks), curve_max_k), dim=1).indices.numpy()
        for k in ks:
            inside = rank < k
            hits[k] += inside.sum()
            ndcg[k] += (1.0 / np.log2(rank[inside] + 2)).sum()
            mrr[k] += (1.0 / (rank[inside] + 1)).sum()
            covered[k][top[:, :k].ravel()] = True
        for k in range(1, curve_max_k + 1):
            inside = rank < k
            curve[k - 1] += (1.0 / np.log2(rank[inside] + 2)).sum()
    out = {"users": float(n)}
    for k in ks:
        out[f"hr@{k}"] = hits[k] / max(n, 1)
        out[f"ndcg@{k}"] = ndcg[k] / max(n, 1)
        out[f"mrr@{k}"] = mrr[k] / max(n, 1)
        out[f"coverage@{k}"] = covered[k].mean()
    if curve_max_k:
        out["ndcg_curve"] = (curve / max(n, 1)).tolist()
    return out


def model_scores(model: InterestModel, eval_set: EvalSet, device="cpu", chunk: int = 1024):
    model.eval()
    with torch.no_grad():
        table = model.item_embeddings().to(device)
        for start in range(0, len(eval_set), chunk):
            sl = slice(start, start + chunk)
            b = eval_set.batch
            batch = Batch(b.items[sl], b.ts[sl], b.types[sl], b.sessions[sl], b.lengths[sl]).to(device)
            users = model.encode(batch, eval_set.t_query[sl].to(device))
            yield start, (users @ table.T).float().cpu()


def evaluate_model(model: InterestModel, eval_set: EvalSet, ks=(10, 20), exclude_seen=True, device="cpu",
                   curve_max_k: int = 0) -> dict[str, float]:
    was_training = model.training
    metrics = rank_metrics(model_scores(model, eval_set, device), eval_set, ks, exclude_seen, curve_max_k)
    model.train(was_training)
    return metrics


# ------------------------------------------------------------------------------------------------------
# Baselines (fit on the training part only)
# ------------------------------------------------------------------------------------------------------
def _train_events(eval_set: EvalSet) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train = eval_set.train
    users = np.repeat(np.arange(len(train)), [len(x) for x in train["items"]])
    if not len(users):
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0),) + (np.zeros(0, np.int64),)
    return (users, np.concatenate(train["items"].values).astype(np.int64),
            np.concatenate(train["ts"].values), np.concatenate(train["types"].values).astype(np.int64))


def _constant_scores(vector: np.ndarray, eval_set: EvalSet, chunk: int = 1024):
    row = torch.from_numpy(vector.astype(np.float32))
    for start in range(0, len(eval_set), chunk):
        yield start, row.expand(min(chunk, len(eval_set) - start), -1)


def most_popular(eval_set: EvalSet, **_):
    _, items, _, _ = _train_events(eval_set)
    return _constant_scores(np.bincount(items, minlength=eval_set.n_items).astype(float), eval_set)


def decayed_popularity(eval_set: EvalSet, half_life_days: float = 2.0, **_):
    _, items, ts, _ = _train_events(eval_set)
    t_ref = ts.max() if len(ts) else 0.0
    weights = np.exp2(-(t_ref - ts) / (half_life_days * DAY_SECONDS))
    return _constant_scores(np.bincount(items, weights=weights, minlength=eval_set.n_items), eval_set)


def _user_item(rows: np.ndarray, items: np.ndarray, values: np.ndarray, n_rows: int, n_items: int):
    return sp.csr_matrix((values, (rows, items)), shape=(n_rows, n_items))


def sar(eval_set: EvalSet, half_life_days: float = 7.0, chunk: int = 1024, **_):
    """SAR: Jaccard item-item similarity from co-occurrence in training histories; user affinity is the
    type-weighted, time-decayed (half-life) sum of the user's own events at the query time."""
    users, items, _, _ = _train_events(eval_set)
    n = eval_set.n_items
    occurrence = _user_item(users, items, np.ones(len(items)), len(eval_set.train), n)
    occurrence.data[:] = 1.0
    cooc = (occurrence.T @ occurrence).tocsr()
    diag = cooc.diagonal()
    coo = cooc.tocoo()
    jaccard = coo.data / (diag[coo.row] + diag[coo.col] - coo.data)
    similarity = sp.csr_matrix((jaccard, (coo.row, coo.col)), shape=(n, n))
    for start in range(0, len(eval_set), chunk):
        part = eval_set.full.iloc[start:start + chunk]
        rows = np.repeat(np.arange(len(part)), [len(x) for x in part["items"]])
        its = np.concatenate(part["items"].values).astype(np.int64)
        age = np.repeat(eval_set.t_query[start:start + chunk].numpy(), [len(x) for x in part["items"]]) - \
            np.concatenate(part["ts"].values)
        weight = EVENT_WEIGHTS[np.clip(np.concatenate(part["types"].values), 0, 3)] * \
            np.exp2(-age / (half_life_days * DAY_SECONDS))
        affinity = _user_item(rows, its, weight, len(part), n)
        yield start, torch.from_numpy((affinity @ similarity).toarray().astype(np.float32))


def last_item_cooccurrence(eval_set: EvalSet, chunk: int = 1024, **_):
    """Transitions a -> b between consecutive training events; score = the row of the user's last item."""
    n = eval_set.n_items
    prev_items, next_items = [], []
    for its in eval_set.train["items"]:
        if len(its) > 1:
            prev_items.append(its[:-1])
            next_items.append(its[1:])
    if prev_items:
        a, b = np.concatenate(prev_items).astype(np.int64), np.concatenate(next_items).astype(np.int64)
    else:
        a = b = np.zeros(0, np.int64)
    transitions = sp.csr_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    popularity = np.asarray(transitions.sum(0)).ravel() * 1e-6   # tie-break unseen rows by popularity
    last = np.array([its[-1] for its in eval_set.full["items"]], dtype=np.int64)
    for start in range(0, len(eval_set), chunk):
        rows = transitions[last[start:start + chunk]].toarray() + popularity
        yield start, torch.from_numpy(rows.astype(np.float32))


BASELINES: dict[str, Callable] = {"most_popular": most_popular, "decayed_popularity": decayed_popularity,
                                  "sar": sar, "last_item_cooccurrence": last_item_cooccurrence}


# ------------------------------------------------------------------------------------------------------
# The evaluate stage and its report
# ------------------------------------------------------------------------------------------------------
def evaluate_all(cfg, storage, artifacts: dict[str, Path] | None = None, out_dir: str | Path | None = None) -> dict:
    from ebbtide.feed import pin_snapshot
    from ebbtide.train import SplitPlan, latest_artifact, load_artifact

    e = cfg.evaluate
    names = list(cfg.train.models)
    artifacts = artifacts or {name: latest_artifact(cfg.train.output, name) for name in names}
    loaded = {name: load_artifact(path) for name, path in artifacts.items()}
    versions = {meta["data_snapshot_version"] for _, _, meta in loaded.values()}
    if len(versions) != 1:
        raise ValueError(f"models were trained on different user_sequences versions {sorted(versions)}")
    snapshot = pin_snapshot(storage, cfg, versions.pop())
    split = SplitPlan(**next(iter(loaded.values()))[2]["split"])
    eval_set = EvalSet.build(snapshot, split, "test", cfg.train.max_len, novel_only=e.exclude_seen)
    curve_k = 50
    results = {}
    for name, fn in BASELINES.items():
        half_life = e.popularity_half_life_days if name == "decayed_popularity" else e.sar_half_life_days
        results[name] = rank_metrics(fn(eval_set, half_life_days=half_life), eval_set, e.ks, e.exclude_seen, curve_k)
    decay = {}
    for name, (model, _, meta) in loaded.items():
        results[name] = evaluate_model(model, eval_set, e.ks, e.exclude_seen, curve_max_k=curve_k)
        decay[name] = meta.get("decay", {})
        results[name]["train_sequences_per_s"] = meta["metrics"].get("sequences_per_s", float("nan"))
    truth = _ground_truth(cfg)
    out = Path(out_dir or e.output)
    out.mkdir(parents=True, exist_ok=True)
    report = write_report(out, results, decay, loaded, truth, split, snapshot, len(eval_set))
    return {"results": results, "decay": decay, "report": str(report), "users": len(eval_set)}


def _ground_truth(cfg) -> dict:
    path = Path(cfg.sessionize.input) / "_ground_truth.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_report(out: Path, results: dict, decay: dict, loaded: dict, truth: dict, split, snapshot,
                 n_users: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(k.split("@")[1]) for r in results.values() for k in r if k.startswith("hr@")})
    names = list(results)
    # Metrics bar chart
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(names))
    width = 0.8 / (2 * len(ks))
    for i, k in enumerate(ks):
        for j, metric in enumerate(("hr", "ndcg")):
            ax.bar(x + (2 * i + j) * width, [results[n][f"{metric}@{k}"] for n in names], width, label=f"{metric.upper()}@{k}")
    ax.set_xticks(x + width * (len(ks) - 0.5), names, rotation=25, ha="right")
    ax.set_title(f"Full-ranking metrics on the test split ({n_users:,} users)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)
    # NDCG@K curves
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        curve = results[n].get("ndcg_curve")
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=n, linestyle="-" if n in loaded else "--")
    ax.set_xlabel("K")
    ax.set_ylabel("NDCG@K")
    ax.legend(fontsize=8)
    ax.set_title("NDCG@K")
    fig.tight_layout()
    fig.savefig(out / "ndcg_at_k.png", dpi=120)
    plt.close(fig)
    # Learned decay vs planted
    planted = truth.get("interest_half_life_days")
    days = np.linspace(0, 14, 200)
    fig, ax = plt.subplots(figsize=(7, 4))
    if planted:
        ax.plot(days, np.exp2(-days / planted), "k--", lw=2, label=f"planted (half-life {planted:g} d)")
    for name, d in decay.items():
        if "half_life_days" in d:
            mix = d.get("mix") or [1.0 / len(d["half_life_days"])] * len(d["half_life_days"])
            curve = sum(m * np.exp2(-days / h) for m, h in zip(mix, d["half_life_days"]))
            ax.plot(days, curve, label=f"{name}: " + ", ".join(f"{h:.2f}d" for h in d["half_life_days"]))
            for h in d["half_life_days"]:
                ax.plot(days, np.exp2(-days / h), lw=0.6, alpha=0.4)
    ax.set_xlabel("days since the event")
    ax.set_ylabel("relative weight")
    ax.set_title("Learned interest decay vs the planted curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decay.png", dpi=120)
    plt.close(fig)

    lines = ["# ebbtide evaluation report", "",
             f"- data: user_sequences v{snapshot.version}, item_vocab v{snapshot.vocab_version}, "
             f"{snapshot.n_items:,} items; split: {split.kind}; {n_users:,} test users",
             "- protocol: full ranking over all items, one target per user (its first event in the test window, "
             "or the last event for leave-one-out); with exclude_seen, history items are masked and only users whose "
             "target is new to them are scored",
             "", "| scorer | " + " | ".join(f"HR@{k} | NDCG@{k} | MRR@{k} | cov@{k}" for k in ks) + " |",
             "|---|" + "---|" * (4 * len(ks))]
    for n in names:
        r = results[n]
        lines.append(f"| {n}{' (model)' if n in loaded else ''} | " + " | ".join(
            f"{r[f'hr@{k}']:.4f} | {r[f'ndcg@{k}']:.4f} | {r[f'mrr@{k}']:.4f} | {r[f'coverage@{k}']:.3f}"
            for k in ks) + " |")
    lines += ["", "## Learned decay", ""]
    if planted:
        lines.append(f"Planted short-term interest half-life: **{planted:g} days**.")
    for name, d in decay.items():
        for key, values in d.items():
            lines.append(f"- {name} {key}: " + ", ".join(f"{v:.3f}" for v in values))
    lines += ["", "## Training", ""]
    for name, (_, _, meta) in loaded.items():
        m = meta["metrics"]
        lines.append(f"- {name}: {m.get('steps')} steps, {m.get('epochs')} epochs, best val NDCG@10 "
                     f"{m.get('best_val_ndcg@10', float('nan')):.4f}, {m.get('sequences_per_s', 0):.0f} sequences/s "
                     f"on {m.get('device')} x{m.get('world_size')}; artifact hash {meta['content_hash'][:12]}")
    lines += ["", "![metrics](metrics.png)", "", "![NDCG@K](ndcg_at_k.png)", "", "![decay](decay.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps({"results": {n: {k: v for k, v in r.items() if k != "ndcg_curve"}
                                                              for n, r in results.items()}, "decay": decay},
                                                 indent=2, default=float))
    log.info("report written to %s", out / "report.md")
    return out / "report.md"
