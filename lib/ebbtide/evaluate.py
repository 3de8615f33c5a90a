"""Full-ranking evaluation of the models and honest baselines in one harness, and the report.

Every scorer ranks *all* items for each evaluation user at the target's time; items already in the user's
history are masked (``evaluate.exclude_seen``). Metrics: HR, NDCG, MRR at each K, and catalog coverage of the
top-K lists. Baselines (fitted on training events only, half-lives chosen on the validation split): most popular,
time-decayed popularity, SAR-style item-item similarity with time-decayed user affinity, the first-order transition
model (counts of last item -> next item) and the same with ties broken by popularity.
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
from ebbtide.split import SplitPlan

log = logging.getLogger(__name__)
EVENT_WEIGHTS = np.array([1.0, 2.0, 3.0, 5.0])


@dataclasses.dataclass
class EvalSet:
    """One target per user: the history before it (padded), the query time and the items seen."""

    batch: Batch
    t_query: torch.Tensor        # (N,) float64 seconds
    targets: np.ndarray          # (N,) vocab index
    seen: list[np.ndarray]       # per user: vocab indices in the history before the target
    full: pd.DataFrame           # histories as variable-length arrays (baselines)
    train: pd.DataFrame          # training-part events per user (baselines fit on these only)
    n_items: int

    def __len__(self) -> int:
        return len(self.targets)

    @staticmethod
    def build(snapshot: Snapshot, split: SplitPlan, which: str, max_len: int, novel_only: bool = True) -> EvalSet:
        """novel_only: keep only users whose target is not already in their history (the population on which
        masking seen items is fair; with it off, nothing is masked and repeats count)."""
        frame = read_snapshot_frame(snapshot, SEQUENCE_COLUMNS)
        rows, train_rows = [], []
        for it, ts, ty, se in zip(*(frame[c].values for c in SEQUENCE_COLUMNS)):
            it, ts, ty, se = np.asarray(it), np.asarray(ts, dtype=np.float64), np.asarray(ty), np.asarray(se)
            end = split.train_end(ts)
            if end > 0:
                train_rows.append((it[:end], ts[:end], ty[:end]))
            pos = split.target(ts, which)
            if pos < 0 or (novel_only and it[pos] in it[:pos]):
                continue
            rows.append((it[:pos], ts[:pos], ty[:pos], se[:pos], int(it[pos]), ts[pos]))
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
class EvaluationError(ValueError):
    """Scores that cannot be ranked (NaN or infinite): the evaluation fails instead of reporting a number."""


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: list[np.ndarray] | None) -> torch.Tensor:
    """0-based rank of each target among all items; ties count against the target (every item scored at least as
    high ranks before it). Seen items (when given) are masked out first. Non-finite scores raise."""
    bad = ~torch.isfinite(scores)
    if bad.any():
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise EvaluationError(f"{int(bad.sum())} non-finite scores (rows {rows}...): cannot rank")
    if seen is not None:
        for r, items in enumerate(seen):
            scores[r, torch.from_numpy(items)] = -torch.inf
    target_scores = scores.gather(1, targets.unsqueeze(1))
    return (scores >= target_scores).sum(1) - 1


def rank_metrics(score_chunks, eval_set: EvalSet, ks=(10, 20), exclude_seen: bool = True,
                 curve_max_k: int = 0) -> dict[str, float]:
    """score_chunks yields (start, scores[(n, n_items)]) covering all eval users in order."""
    ks = tuple(sorted(ks))
    top_k = min(max(max(ks), curve_max_k), eval_set.n_items)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg", "mrr")}
    covered = {k: np.zeros(eval_set.n_items, bool) for k in ks}
    curve = np.zeros(curve_max_k)
    n = len(eval_set)
    for start, scores in score_chunks:
        scores = torch.as_tensor(scores, dtype=torch.float32).clone()
        targets = torch.from_numpy(eval_set.targets[start:start + len(scores)])
        seen = eval_set.seen[start:start + len(scores)] if exclude_seen else None
        rank = target_ranks(scores, targets, seen).numpy()
        top = torch.topk(scores, top_k, dim=1).indices.numpy()
        gain = 1.0 / np.log2(rank + 2)
        for k in ks:
            inside = rank < k
            sums[f"hr@{k}"] += inside.sum()
            sums[f"ndcg@{k}"] += gain[inside].sum()
            sums[f"mrr@{k}"] += (1.0 / (rank[inside] + 1)).sum()
            covered[k][top[:, :k].ravel()] = True
        for k in range(1, curve_max_k + 1):
            curve[k - 1] += gain[rank < k].sum()
    out = {"users": float(n), **{key: value / max(n, 1) for key, value in sums.items()}}
    out.update({f"coverage@{k}": float(covered[k].mean()) for k in ks})
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
    try:
        return rank_metrics(model_scores(model, eval_set, device), eval_set, ks, exclude_seen, curve_max_k)
    finally:
        model.train(was_training)


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


def _transitions(eval_set: EvalSet) -> sp.csr_matrix:
    """Counts of a -> b between consecutive training events of the same user."""
    n = eval_set.n_items
    pairs = [(its[:-1], its[1:]) for its in eval_set.train["items"] if len(its) > 1]
    a = np.concatenate([p[0] for p in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
    b = np.concatenate([p[1] for p in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(a)), (a, b)), shape=(n, n))


def _last_item_rows(matrix: sp.csr_matrix, eval_set: EvalSet, tie_break: np.ndarray | None, chunk: int):
    last = np.array([its[-1] for its in eval_set.full["items"]], dtype=np.int64)
    for start in range(0, len(eval_set), chunk):
        rows = matrix[last[start:start + chunk]].toarray()
        if tie_break is not None:
            rows = rows + tie_break
        yield start, torch.from_numpy(rows.astype(np.float32))


def transition(eval_set: EvalSet, chunk: int = 1024, **_):
    """First-order transition model: score(b) = count of (user's last item -> b) in training. Most items score 0
    and tie; ties count against the target, so this is the plain count model of the literature."""
    return _last_item_rows(_transitions(eval_set), eval_set, None, chunk)


def transition_popular(eval_set: EvalSet, chunk: int = 1024, **_):
    """The transition model with ties broken by training popularity (a stronger, equally cheap baseline)."""
    _, items, _, _ = _train_events(eval_set)
    popularity = np.bincount(items, minlength=eval_set.n_items).astype(float)
    return _last_item_rows(_transitions(eval_set), eval_set, popularity / (popularity.max() + 1.0), chunk)


# name -> (scorer, the hyperparameter tuned on the validation split or None)
BASELINES: dict[str, tuple[Callable, str | None]] = {
    "most_popular": (most_popular, None), "decayed_popularity": (decayed_popularity, "half_life_days"),
    "sar": (sar, "half_life_days"), "transition": (transition, None),
    "transition_popular": (transition_popular, None)}


def fit_baselines(val_set: EvalSet, grid: list[float], exclude_seen: bool) -> dict[str, dict]:
    """The same care as the models get: each baseline's half-life is chosen on the validation split."""
    chosen = {}
    for name, (fn, param) in BASELINES.items():
        if param is None:
            chosen[name] = {}
            continue
        scores = {h: rank_metrics(fn(val_set, **{param: h}), val_set, (10,), exclude_seen)["ndcg@10"] for h in grid}
        chosen[name] = {param: max(scores, key=scores.get)}
    return chosen


# ------------------------------------------------------------------------------------------------------
# The evaluate stage and its report
# ------------------------------------------------------------------------------------------------------
def evaluate_all(cfg, storage, artifacts: dict[str, Path] | None = None, out_dir: str | Path | None = None) -> dict:
    """Score every trained model and every baseline on the test split of the models' snapshot; write the report."""
    from ebbtide.artifacts import latest_artifact, load_artifact
    from ebbtide.feed import pin_snapshot

    e = cfg.evaluate
    artifacts = artifacts or {name: latest_artifact(cfg.train.output, name) for name in cfg.train.models}
    loaded = {name: load_artifact(path) for name, path in artifacts.items()}
    versions = {meta["data_snapshot_version"] for _, _, meta in loaded.values()}
    if len(versions) != 1:
        raise ValueError(f"models were trained on different user_sequences versions {sorted(versions)}")
    snapshot = pin_snapshot(storage, cfg, versions.pop())
    split = SplitPlan.from_dict(next(iter(loaded.values()))[2]["split"])
    max_len = max(conf["max_len"] for _, conf, _ in loaded.values())
    test_set = EvalSet.build(snapshot, split, "test", max_len, novel_only=e.exclude_seen)
    val_set = EvalSet.build(snapshot, split, "val", max_len, novel_only=e.exclude_seen)
    chosen = fit_baselines(val_set, e.baseline_half_lives_days, e.exclude_seen)
    results = {}
    for name, (fn, _) in BASELINES.items():
        results[name] = rank_metrics(fn(test_set, **chosen[name]), test_set, e.ks, e.exclude_seen, CURVE_K)
        results[name]["settings"] = chosen[name]
    for name, (model, _, meta) in loaded.items():
        results[name] = evaluate_model(model, test_set, e.ks, e.exclude_seen, curve_max_k=CURVE_K)
        results[name]["training"] = {k: meta["metrics"].get(k) for k in TRAINING_FACTS}
    decay = {name: model.decay_report() for name, (model, _, _) in loaded.items()}
    out = Path(out_dir or e.output)
    out.mkdir(parents=True, exist_ok=True)
    report = write_report(out, results, decay, loaded, _ground_truth(cfg), split, snapshot, len(test_set), e)
    return {"results": results, "decay": decay, "report": str(report), "users": len(test_set)}


CURVE_K = 50
TRAINING_FACTS = ("seconds_to_best", "train_seconds", "best_epoch", "epochs", "steps", "best_val_ndcg@10",
                  "world_size", "device")


def _ground_truth(cfg) -> dict:
    path = Path(cfg.sessionize.input) / "_ground_truth.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_report(out: Path, results: dict, decay: dict, loaded: dict, truth: dict, split: SplitPlan,
                 snapshot: Snapshot, n_users: int, e) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    ks = sorted(e.ks)
    _plot_metrics(out / "metrics.png", results, ks, n_users)
    _plot_curves(out / "ndcg_at_k.png", results, loaded)
    _plot_decay(out / "decay.png", decay, truth.get("interest_half_life_days"))
    lines = ["# ebbtide evaluation report", "",
             f"- data: user_sequences v{snapshot.version}, item_vocab v{snapshot.vocab_version}, "
             f"{snapshot.n_items:,} items; {n_users:,} test users",
             f"- split: {split.describe()}",
             "- protocol: full ranking over all items at the target's time, one target per user; "
             + ("items in the user's history are masked and only users whose target is new to them are scored; "
                if e.exclude_seen else "nothing is masked; ")
             + "ties count against the target (an item scored equal to the target ranks before it); non-finite "
               "scores fail the evaluation",
             "- baselines are fitted on training events only; their half-lives were chosen on the validation split. "
             "Models stop early on validation NDCG@10 and are scored with their best validation epoch's weights.",
             "", "| scorer | " + " | ".join(f"HR@{k} | NDCG@{k} | MRR@{k} | cov@{k}" for k in ks)
             + " | trained to best (s) | settings |",
             "|---|" + "---|" * (4 * len(ks) + 2)]
    for name, r in results.items():
        training = r.get("training") or {}
        seconds = f"{training['seconds_to_best']:.0f} (epoch {training['best_epoch']})" if training else "-"
        settings = ", ".join(f"{k}={v:g}" for k, v in (r.get("settings") or {}).items()) or "-"
        lines.append(f"| {name}{' (model)' if name in loaded else ''} | " + " | ".join(
            f"{r[f'hr@{k}']:.4f} | {r[f'ndcg@{k}']:.4f} | {r[f'mrr@{k}']:.4f} | {r[f'coverage@{k}']:.3f}"
            for k in ks) + f" | {seconds} | {settings} |")
    lines += ["", "## Learned decay", "", "Weight a model gives a past event, relative to an event happening now "
              "(models.base.kernel_half_life: the half-life of the part of that weight which decays)."]
    if truth.get("interest_half_life_days"):
        lines.append(f"Planted short-term interest half-life: **{truth['interest_half_life_days']:g} days**.")
    for name, d in decay.items():
        if d:
            lines.append(f"- {name}: half-life **{d['half_life_days']:.2f} days**, non-decaying share "
                         f"{d['kernel_floor']:.2f}" + "".join(f"; {k} " + ", ".join(f"{v:.3g}" for v in d[k])
                                                             for k in ("part_half_life_days", "mix") if k in d))
    lines += ["", "## Training", ""]
    for name, (_, _, meta) in loaded.items():
        m = meta["metrics"]
        lines.append(f"- {name}: best validation NDCG@10 {m['best_val_ndcg@10']:.4f} at epoch {m['best_epoch']} "
                     f"after {m['seconds_to_best']:.0f}s of training ({m['epochs']} epochs, {m['steps']} steps, "
                     f"{m['train_seconds']:.0f}s in all) on {m['device']} x{m['world_size']}; artifact hash "
                     f"{meta['content_hash'][:12]}")
    lines += ["", "![metrics](metrics.png)", "", "![NDCG@K](ndcg_at_k.png)", "", "![decay](decay.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps(
        {"results": {n: {k: v for k, v in r.items() if k != "ndcg_curve"} for n, r in results.items()},
         "decay": decay, "split": split.as_dict(), "users": n_users}, indent=2, default=float))
    log.info("report written to %s", out / "report.md")
    return out / "report.md"


def _plot_metrics(path: Path, results: dict, ks: list[int], n_users: int) -> None:
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(names))
    width = 0.8 / (2 * len(ks))
    for i, k in enumerate(ks):
        for j, metric in enumerate(("hr", "ndcg")):
            ax.bar(x + (2 * i + j) * width, [results[n][f"{metric}@{k}"] for n in names], width,
                   label=f"{metric.upper()}@{k}")
    ax.set_xticks(x + width * (len(ks) - 0.5), names, rotation=25, ha="right")
    ax.set_title(f"Full-ranking metrics on the test split ({n_users:,} users)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(path: Path, results: dict, loaded: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        curve = r.get("ndcg_curve")
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=name, linestyle="-" if name in loaded else "--")
    ax.set(xlabel="K", ylabel="NDCG@K", title="NDCG@K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_decay(path: Path, decay: dict, planted: float | None) -> None:
    """Left: the decaying part of each model's kernel (the weight it actually applies) against the planted
    curve. Right: the whole kernel, with its non-decaying floor."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    horizon = max(14.0, 3 * planted) if planted else 14.0
    for name, d in decay.items():
        if not d:
            continue
        days, kernel, floor = np.asarray(d["kernel_days"]), np.asarray(d["kernel"]), d["kernel_floor"]
        shown = days <= horizon
        left.plot(days[shown], ((kernel - floor) / (kernel[0] - floor))[shown],
                  label=f"{name} (half-life {d['half_life_days']:.2f} d)")
        right.plot(days[shown], kernel[shown], label=name)
    if planted:
        grid = np.linspace(0, horizon, 200)
        left.plot(grid, np.exp2(-grid / planted), "k--", lw=2, label=f"planted (half-life {planted:g} d)")
    left.set(xlabel="days since the event", ylabel="decaying part of the weight (1 at age 0)",
             title="Learned decay vs the planted curve")
    right.set(xlabel="days since the event", ylabel="weight (1 at age 0)", title="Whole kernel (floor = long-term)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
