"""Nightly: every active user's interest embedding as of a date, top-K recommendations, written back to Delta.

For DATE the query time is the end of DATE (UTC), and the inputs are the tables *as a timely run of DATE saw
them*: `user_sequences`, `item_vocab` and `item_daily_counts` are time-travelled to the last version before any
sessionize run of a later date committed (runs.version_as_of). A backfill, or a re-run of an old date, therefore
computes from exactly the events known at the end of DATE, not from a later (possibly truncated) window.

Guards, in order, before anything is created or written: the model resolves (explicit version, the promoted
pointer, or the newest in the demo) and loads with its content hash; the sessionized data of DATE exists and is
fresh (no gap the day before, no later dates loaded first), unless `require_fresh` is off; model, vocabulary and
snapshot versions belong together. After inference: finite embeddings and the expected recommendation counts; only
then are missing output tables created.

Serving: users with at least `min_events_for_model` events get the model's top-K (consumed items and items not yet
seen as of DATE excluded), whose last `new_item_slots` go to the most popular items newer than the model;
cold-start users (fewer events) get the decayed-popularity list. `user_recommendations.source` says which.
Users idle longer than `retention_days` are not served; a returning user is active again and re-encoded from
their whole window, old events decayed by their age (docs: README, "Operating").

Incremental and exact for decay models: `user_interest` keeps each user's per-timescale decay state and mass; a
user whose history has not changed since the stored state is only rescaled (model.rescale), others re-encoded.

One consistent set, one commit order: item_embeddings (partition model_version), then user_interest (MERGE),
then user_recommendations (partition as_of, with the run's application-transaction marker) last. A night's output
is complete exactly when its user_recommendations partition exists; a failed run never leaves recommendations
without the embeddings and interest rows they came from, and re-running the date completes it (idempotent). A run
is one storage job (storage.job): of two runs at once, the second to commit a table fails there, naming it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ebbtide.artifacts import load_artifact
from ebbtide.config import Config
from ebbtide.models.base import Batch
from ebbtide.promotion import resolve_model
from ebbtide.runs import (
    SESSIONIZE_DONE_TABLE,
    AsOfUnavailableError,
    committed_dates,
    nightly_app_id,
    version_as_of,
)
from ebbtide.split import day_start_seconds as seconds
from ebbtide.storage import AppTxn, DeltaStorage, unit_of_work
from ebbtide.tables import table_specs
from ebbtide.topk import (
    AnnTopK,
    ExactTopK,
    ann_lists,
    build_ann_index,
    import_faiss,
    resolve_device,
    write_ann_index,
)

log = logging.getLogger(__name__)

OUTPUTS = ("item_embeddings", "user_interest", "user_recommendations")   # also the commit order


class VersionMismatchError(ValueError):
    """The model, the vocabulary and the data snapshot do not belong together."""


class NightlyCheckError(RuntimeError):
    """A pre-commit check failed; nothing was written."""


class StaleDataError(RuntimeError):
    """The sessionized data of the date is missing or stale; nothing was created or written."""


@dataclass
class NightlyReport:
    as_of: dt.date
    model_version: str
    sequences_version: int
    active_users: int = 0
    reencoded: int = 0
    rescaled: int = 0
    kept_newer: int = 0
    recommendations: int = 0
    cold_users: int = 0
    new_item_recs: int = 0
    exact_as_of: bool = True
    seconds: float = 0.0

    def line(self) -> str:
        where = "" if self.exact_as_of else " (latest version: NOT the data as of the date)"
        return (f"nightly {self.as_of} model {self.model_version} on user_sequences v{self.sequences_version}"
                f"{where}: {self.active_users:,} active users ({self.reencoded:,} re-encoded, {self.rescaled:,} "
                f"rescaled, {self.kept_newer:,} kept newer state, {self.cold_users:,} cold-start), "
                f"{self.recommendations:,} recommendations ({self.new_item_recs:,} new items), {self.seconds:.1f}s")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        return out


OUTPUT_SCHEMA = T.StructType([
    T.StructField("user_id", T.StringType()), T.StructField("user_bucket", T.IntegerType()),
    T.StructField("mode", T.StringType()), T.StructField("n_before", T.LongType()),
    T.StructField("last_before", T.DoubleType()),
    T.StructField("embedding", T.ArrayType(T.FloatType())), T.StructField("norm", T.FloatType()),
    T.StructField("decay_state", T.ArrayType(T.FloatType())), T.StructField("decay_mass", T.ArrayType(T.FloatType())),
    T.StructField("rec_items", T.ArrayType(T.IntegerType())), T.StructField("rec_scores", T.ArrayType(T.FloatType())),
    T.StructField("rec_sources", T.ArrayType(T.StringType())),
    T.StructField("expected_recs", T.IntegerType()), T.StructField("finite", T.BooleanType()),
])


@dataclass(frozen=True)
class AsOfInputs:
    """Table versions a timely run of the date read."""

    sequences: int
    vocab: int
    counts: int
    exact: bool


@dataclass
class ServePlan:
    """Everything the executors need besides the model: shipped inside the mapInPandas closure (no broadcast
    through sparkContext, which Spark Connect rejects)."""

    t_query: float
    k: int
    batch_size: int
    exclude_consumed: bool
    min_events: int
    new_item_slots: int
    popular_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # best first
    popular_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    new_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))       # items newer than the model
    new_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    unseen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))        # model items unknown at as_of
    # top-K (nightly.topk, .device, .topk_memory_mb, .ann_*); ann_index: the faiss index file the driver wrote
    topk: str = "exact"
    device: str = "auto"
    topk_memory_bytes: int = 256 << 20
    ann_index: str | None = None
    ann_nprobe: int = 64
    ann_rerank: int = 5


_WORKER_CACHE: dict[tuple, tuple] = {}


def _worker_state(path: str, content_hash: str, plan: ServePlan):
    """Once per Python worker: the model from its (shared) artifact path, memory-mapped so the workers of a host
    share one copy of the item table (the content hash pins the version), and the top-K scorer over its items."""
    key = (content_hash, plan.k, plan.topk, plan.device, plan.topk_memory_bytes, plan.ann_index, plan.ann_nprobe,
           plan.ann_rerank)   # workers outlive a night (backfills): another setting, another scorer
    if key not in _WORKER_CACHE:
        model, conf, meta = load_artifact(path, mmap=True)
        if meta["content_hash"] != content_hash:
            raise NightlyCheckError(f"artifact {path} changed while the job ran (content hash differs)")
        torch.set_num_threads(1)  # one thread per Spark task: the executor's cores are the parallelism
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = (model, conf, _scorer(model.item_embeddings().detach(), plan))
    return _WORKER_CACHE[key]


def _scorer(items: torch.Tensor, plan: ServePlan):
    """The top-K of the plan over `items` (a view of the model's table, not a copy)."""
    exact = ExactTopK(items, plan.k, plan.topk_memory_bytes, resolve_device(plan.device))
    if plan.topk == "exact":
        return exact
    faiss = import_faiss()
    faiss.omp_set_num_threads(1)
    return AnnTopK(faiss.read_index(plan.ann_index), items, plan.k, plan.ann_nprobe, plan.ann_rerank, exact)


def _infer(model_ref: dict, plan: ServePlan):
    """The mapInPandas function; the model is read from its artifact path once per Python worker."""
    def run(frames):
        model, conf, scorer = _worker_state(**model_ref, plan=plan)
        for frame in frames:
            for start in range(0, len(frame), plan.batch_size):
                yield _infer_batch(frame.iloc[start:start + plan.batch_size], model, scorer, conf, plan)
    return run


def _user_embeddings(model, frame: pd.DataFrame, histories: list, plan: ServePlan, max_len: int):
    """(users (n, d), decay states (n, K*d), masses (n, K)): stored states rescaled where the history is unchanged,
    the rest encoded. Models without a decay state encode everyone and store empty states."""
    n = len(frame)
    t_query = plan.t_query
    if not hasattr(model, "final_state"):
        users = model.encode(Batch.from_histories(histories, max_len), torch.full((n,), t_query, dtype=torch.float64))
        return users.float(), np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32)
    rescale = (frame["mode"] == "rescale").values
    parts: dict[str, tuple] = {}
    enc, res = np.nonzero(~rescale)[0], np.nonzero(rescale)[0]
    if len(enc):
        batch = Batch.from_histories([histories[i] for i in enc], max_len)
        parts["enc"] = model.final_state(batch, torch.full((len(enc),), t_query, dtype=torch.float64))
    if len(res):
        prev_m = torch.tensor(np.stack(frame["prev_mass"].values[res]), dtype=torch.float64)
        prev_s = torch.tensor(np.stack(frame["prev_state"].values[res]), dtype=torch.float64).view(
            len(res), prev_m.shape[1], -1)
        elapsed = torch.tensor(t_query - frame["prev_state_ts"].values[res], dtype=torch.float64)
        parts["res"] = model.rescale(prev_s, prev_m, elapsed)
    some_states, some_masses = next(iter(parts.values()))
    states = torch.zeros((n, *some_states.shape[1:]), dtype=torch.float64)
    masses = torch.zeros((n, some_masses.shape[1]), dtype=torch.float64)
    for rows, key in ((enc, "enc"), (res, "res")):
        if key in parts:
            states[rows], masses[rows] = parts[key][0].double(), parts[key][1].double()
    # Stored precision is float32; embeddings come from the stored values, so a re-run is identical.
    states32, masses32 = states.float(), masses.float()
    return model.combine(states32, masses32), states32.reshape(n, -1).numpy(), masses32.numpy()


def _infer_batch(frame: pd.DataFrame, model, scorer, conf: dict, plan: ServePlan) -> pd.DataFrame:
    n, n_items, k = len(frame), conf["n_items"], plan.k
    histories, consumed = [], []
    for it, ts, ty, se in zip(frame["item_idx"], frame["ts"], frame["event_type"], frame["session_idx"]):
        it, ts = np.asarray(it, np.int64), np.asarray(ts, np.float64)
        before = ts < plan.t_query
        keep = before & (it < n_items)     # events up to the query time; items the model knows
        histories.append((it[keep], ts[keep], np.asarray(ty)[keep], np.asarray(se)[keep]))
        consumed.append(np.unique(it[before]) if plan.exclude_consumed else np.zeros(0, np.int64))
    with torch.no_grad():
        users, state_out, mass_out = _user_embeddings(model, frame, histories, plan, conf["max_len"])
        excluded = [np.union1d(c[c < n_items], plan.unseen) for c in consumed]
        model_items, model_scores = scorer(users, excluded)
    finite = torch.isfinite(users).all(dim=1).numpy()
    cold = frame["n_before"].values < plan.min_events
    rec_items, rec_scores, rec_sources, expected = [], [], [], []
    for row in range(n):
        if cold[row]:
            idx, score = _not_in(plan.popular_idx, plan.popular_score, consumed[row], k)
            rec_items.append(idx), rec_scores.append(score), rec_sources.append(["popular"] * len(idx))
            expected.append(len(idx))
            continue
        new_idx, new_score = _not_in(plan.new_idx, plan.new_score, consumed[row], plan.new_item_slots)
        n_model = k - len(new_idx)
        scores = model_scores[row, :n_model].numpy()
        ranked = model_items[row, :n_model].numpy()[np.isfinite(scores)]   # excluded items score -inf
        rec_items.append(np.concatenate([ranked, new_idx]))
        rec_scores.append(np.concatenate([scores[np.isfinite(scores)], new_score]))
        rec_sources.append(["model"] * len(ranked) + ["new_item"] * len(new_idx))
        expected.append(min(n_model, n_items - len(excluded[row])) + len(new_idx))
    return pd.DataFrame({
        "user_id": frame["user_id"].values, "user_bucket": frame["user_bucket"].values,
        "mode": frame["mode"].values if hasattr(model, "final_state") else "encode",
        "n_before": frame["n_before"].values, "last_before": frame["last_before"].values,
        "embedding": list(users.numpy()), "norm": users.norm(dim=1).numpy(),
        "decay_state": list(state_out), "decay_mass": list(mass_out),
        "rec_items": [a.astype(np.int32) for a in rec_items], "rec_scores": [a.astype(np.float32) for a in rec_scores],
        "rec_sources": rec_sources, "expected_recs": np.array(expected, np.int32), "finite": finite})


def item_embeddings_arrow(vectors: np.ndarray) -> pa.Table:
    """(item_idx int32, embedding list<float32>) over the (n, d) float32 buffer without copying it: the list
    values are the buffer itself, the offsets a multiple of d (64-bit offsets past 2^31 floats)."""
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    large = n * d >= 2**31
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int64 if large else np.int32))
    lists = (pa.LargeListArray if large else pa.ListArray).from_arrays(offsets, flat)
    return pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)), "embedding": lists})


def _not_in(idx: np.ndarray, score: np.ndarray, consumed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of a ranked list that are not in `consumed`."""
    keep = ~np.isin(idx, consumed)
    return idx[keep][:k].astype(np.int64), score[keep][:k].astype(np.float32)


class Nightly:
    def __init__(self, spark: SparkSession, cfg: Config, storage: DeltaStorage):
        self.spark, self.cfg, self.storage = spark, cfg, storage
        self.specs = table_specs(cfg)

    def resolve_model(self) -> Path:
        return resolve_model(self.cfg)

    @unit_of_work("nightly", writes=OUTPUTS)
    def run(self, as_of: dt.date, full: bool = False) -> NightlyReport:
        started = time.time()
        n, specs, storage = self.cfg.nightly, self.specs, self.storage
        path = self.resolve_model()
        model, conf, meta = load_artifact(path)          # before any table is created
        inputs = self._inputs(as_of)
        self._check_versions(conf, meta, path)
        for name in OUTPUTS:   # check existing outputs before any work; a missing one is created only to write
            if storage.exists(specs[name]):
                storage.ensure(specs[name])
        version = path.name
        report = NightlyReport(as_of, version, inputs.sequences, exact_as_of=inputs.exact)
        t_query = seconds(as_of + dt.timedelta(days=1))
        vocab = storage.read(specs["item_vocab"])          # append-only: the latest maps every index to its id
        plan = self._plan(as_of, t_query, conf["n_items"], inputs, vocab)
        if plan.topk == "ann":
            plan.ann_index = str(self._ann_index(path, model, conf["n_items"] - len(plan.unseen)))
        use_state = n.incremental and not full and hasattr(model, "final_state")
        users = self._active_users(as_of, t_query, version, inputs.sequences, use_state)
        model_ref = {"path": str(path.resolve()), "content_hash": meta["content_hash"]}
        results = users.mapInPandas(_infer(model_ref, plan), OUTPUT_SCHEMA)
        prev_as_of = self._interest().select("user_id", F.col("as_of").alias("prev_as_of"))
        results = results.join(prev_as_of, "user_id", "left").persist(StorageLevel.MEMORY_AND_DISK)
        try:
            self._check_results(results, report)
            txn = AppTxn(nightly_app_id(as_of), int(started))
            self._write(results, vocab, model, version, as_of, t_query, txn)
        finally:
            results.unpersist()
        report.seconds = time.time() - started
        log.info("%s", report.line())
        return report

    def _ann_index(self, path: Path, model, n_indexed: int) -> Path:
        """The faiss index of the items known at the date, built once on the driver (all its cores) and kept
        beside the model's artifact, where the workers read it like the weights: one build per model version and
        catalog size, however many workers and nights."""
        lists = ann_lists(n_indexed, self.cfg.nightly.ann_lists)
        out = path.parent / ".ann" / f"{path.name}-{n_indexed}-ivf{lists}-pq4fs.faiss"   # what build_ann_index builds
        if not out.exists():
            started = time.time()
            with torch.no_grad():
                items = model.item_embeddings()[:n_indexed].detach().numpy()
            write_ann_index(build_ann_index(items, lists), out)
            log.info("ann index of %d items, %d lists: %s (%.1fs)", n_indexed, lists, out, time.time() - started)
        return out

    def _inputs(self, as_of: dt.date) -> AsOfInputs:
        """The guard on the sessionized data, then the versions a timely run of as_of read."""
        n, specs, storage = self.cfg.nightly, self.specs, self.storage
        seq = specs["user_sequences"]
        if not storage.exists(seq):
            raise StaleDataError(f"nightly {as_of}: no user_sequences table yet; run `ebbtide sessionize` first")
        day = dt.timedelta(days=1)
        if n.require_fresh:
            earlier = [as_of - day * i for i in range(1, n.retention_days + 1)]
            done = committed_dates(storage, specs[SESSIONIZE_DONE_TABLE], [as_of, *earlier])
            if as_of not in done:
                raise StaleDataError(
                    f"nightly {as_of}: no sessionized data for {as_of} (no committed `ebbtide sessionize --date "
                    f"{as_of}`); sessionize it first, or pass --allow-stale to score as of {as_of} with what is "
                    "loaded")
            if as_of - day not in done and done - {as_of}:
                raise StaleDataError(
                    f"nightly {as_of}: stale data: {as_of - day} was never sessionized although earlier dates were "
                    f"(latest before it: {max(done - {as_of})}); sessionize it first, or pass --allow-stale")
        last_counted = storage.read(specs["item_daily_counts"]).agg(F.max("event_date")).collect()[0][0]
        horizon = max(last_counted or as_of, as_of) + dt.timedelta(days=7 + self.cfg.sessionize.max_future_days)
        later = [as_of + day * i for i in range(1, (horizon - as_of).days + 1)]
        names = ("user_sequences", "item_vocab", "item_daily_counts")
        try:
            found = {name: version_as_of(storage, specs[name], as_of, later) for name in names}
            exact = True
        except AsOfUnavailableError as err:
            if n.require_fresh:
                raise StaleDataError(f"nightly {as_of}: {err}; pass --allow-stale to compute from the latest "
                                     "versions (events before the end of the date only)") from None
            log.warning("nightly %s: %s; using the latest versions", as_of, err)
            found, exact = {name: storage.version(specs[name]) for name in names}, False
        return AsOfInputs(found["user_sequences"], found["item_vocab"], found["item_daily_counts"], exact)

    def _plan(self, as_of: dt.date, t_query: float, n_items: int, inputs: AsOfInputs, vocab: DataFrame) -> ServePlan:
        """Decayed popularity as of the end of as_of (item_daily_counts as of then): the fallback lists."""
        n, specs = self.cfg.nightly, self.specs
        vocab_size = self.storage.read(specs["item_vocab"], inputs.vocab).count()
        age_days = F.datediff(F.lit(as_of), F.col("event_date")) + F.lit(0.5)     # mid-day to the end of as_of
        counts = self.storage.read(specs["item_daily_counts"], inputs.counts).where(
            (F.col("event_date") <= F.lit(as_of))
            & (F.col("event_date") > F.lit(as_of - dt.timedelta(days=n.retention_days))))
        popularity = (counts.groupBy("item_id").agg(F.sum(
            F.col("weight_sum") * F.pow(F.lit(0.5), age_days / F.lit(n.popularity_half_life_days))).alias("score"))
            .join(vocab.select("item_id", "item_idx"), "item_id")
            .where(F.col("item_idx") < vocab_size))
        depth = n.top_k + self.cfg.sessionize.max_len          # enough to fill a list after consumed items
        ranked = popularity.orderBy(F.desc("score"), "item_idx")
        top = ranked.limit(depth).collect()
        new = ranked.where(F.col("item_idx") >= n_items).limit(n.new_item_slots + self.cfg.sessionize.max_len) \
            .collect() if n.new_item_slots else []
        as_arrays = lambda rows: (np.array([r.item_idx for r in rows], np.int64),  # noqa: E731
                                  np.array([r.score for r in rows], np.float32))
        plan = ServePlan(t_query, n.top_k, n.batch_size, n.exclude_consumed, n.min_events_for_model,
                         n.new_item_slots, unseen=np.arange(vocab_size, n_items, dtype=np.int64), topk=n.topk,
                         device=n.device, topk_memory_bytes=n.topk_memory_mb << 20, ann_nprobe=n.ann_nprobe,
                         ann_rerank=n.ann_rerank)
        plan.popular_idx, plan.popular_score = as_arrays(top)
        plan.new_idx, plan.new_score = as_arrays(new)
        return plan

    def _active_users(self, as_of: dt.date, t_query: float, version: str, seq_version: int,
                      use_state: bool) -> DataFrame:
        """Users with an event inside the retention horizon, their window before t_query, and their stored state
        with the decision rescale (history unchanged since the state) or encode."""
        specs, storage = self.specs, self.storage
        horizon = t_query - self.cfg.nightly.retention_days * 86_400
        before = F.filter("ts", lambda x: x < F.lit(t_query))
        seqs = (storage.read(specs["user_sequences"], seq_version)
                .where(F.exists("ts", lambda x: (x >= F.lit(horizon)) & (x < F.lit(t_query))))
                .withColumn("n_before", F.col("n_events") - F.size(F.filter("ts", lambda x: x >= F.lit(t_query))))
                .withColumn("last_before", F.array_max(before).cast("double")))
        if seq_version != storage.version(specs["user_sequences"]):
            # an older version may still hold users deleted since (forget-user, or every event withdrawn)
            seqs = seqs.join(storage.read(specs["user_sequences"]).select("user_id"), "user_id", "left_semi")
        prev = self._interest().select(
            "user_id", F.col("as_of").alias("prev_as_of"), F.col("model_version").alias("prev_model"),
            F.col("n_events").alias("prev_n"), F.unix_seconds("last_event_ts").cast("double").alias("prev_last"),
            F.col("decay_state").alias("prev_state"), F.col("decay_mass").alias("prev_mass"),
            F.unix_seconds("updated_at").cast("double").alias("prev_state_ts"))
        unchanged = ((F.col("prev_model") == version) & (F.col("prev_as_of") <= F.lit(as_of))
                     & (F.col("prev_n") == F.col("n_before")) & (F.col("prev_last") == F.col("last_before")))
        joined = seqs.join(prev, "user_id", "left").withColumn(
            "mode", F.when(F.lit(use_state) & F.coalesce(unchanged, F.lit(False)), "rescale").otherwise("encode"))
        return joined.select("user_id", "user_bucket", "item_idx", "ts", "event_type", "session_idx", "n_before",
                             "last_before", "mode", "prev_state", "prev_mass", "prev_state_ts")

    def _interest(self) -> DataFrame:
        """The stored interest state; empty before the first night (the table is created by the first write)."""
        spec = self.specs["user_interest"]
        if self.storage.exists(spec):
            return self.storage.read(spec)
        return self.spark.createDataFrame([], spec.schema)

    def _check_versions(self, conf: dict, meta: dict, path: Path) -> None:
        """Against the latest tables (a backfill uses older versions of them, with the current model)."""
        seq_version = self.storage.version(self.specs["user_sequences"])
        vocab_size = self.storage.read(self.specs["item_vocab"]).count()
        problems = []
        if conf["n_items"] > vocab_size:
            problems.append(f"model knows {conf['n_items']} items but item_vocab has only {vocab_size}")
        vocab_version = self.storage.version(self.specs["item_vocab"])
        if meta["vocab_version"] > vocab_version:
            problems.append(f"model was trained on item_vocab v{meta['vocab_version']}, table is at v{vocab_version}")
        if meta["data_snapshot_version"] > seq_version:
            problems.append(f"model was trained on user_sequences v{meta['data_snapshot_version']}, "
                            f"table is at v{seq_version}")
        if conf["event_types"] != list(self.cfg.sessionize.event_types):
            problems.append(f"model event types {conf['event_types']} != sessionize.event_types "
                            f"{list(self.cfg.sessionize.event_types)}")
        if problems:
            raise VersionMismatchError(f"refusing to run with model {path}: " + "; ".join(problems))

    def _check_results(self, results: DataFrame, report: NightlyReport) -> None:
        stats = results.agg(
            F.count("*").alias("users"),
            F.sum(F.when(F.col("mode") == "rescale", 1).otherwise(0)).alias("rescaled"),
            F.sum(F.when(~F.col("finite"), 1).otherwise(0)).alias("non_finite"),
            F.sum(F.when(F.size("rec_items") != F.col("expected_recs"), 1).otherwise(0)).alias("short_recs"),
            F.sum(F.size("rec_items")).alias("recs"),
            F.sum(F.when(F.array_contains("rec_sources", "popular"), 1).otherwise(0)).alias("cold"),
            F.sum(F.size(F.filter("rec_sources", lambda x: x == "new_item"))).alias("new_items"),
            F.sum(F.when(F.col("prev_as_of") > F.lit(report.as_of), 1).otherwise(0)).alias("newer"),
        ).collect()[0]
        report.active_users = stats["users"]
        report.rescaled = stats["rescaled"] or 0
        report.reencoded = report.active_users - report.rescaled
        report.recommendations = stats["recs"] or 0
        report.kept_newer = stats["newer"] or 0
        report.cold_users = stats["cold"] or 0
        report.new_item_recs = stats["new_items"] or 0
        failures = []
        if stats["non_finite"]:
            failures.append(f"{stats['non_finite']} users have non-finite embeddings")
        if stats["short_recs"]:
            failures.append(f"{stats['short_recs']} users have fewer recommendations than expected")
        if failures:
            raise NightlyCheckError(f"nightly {report.as_of}: " + "; ".join(failures) + "; nothing was written")

    def _write(self, results: DataFrame, vocab: DataFrame, model, version: str, as_of: dt.date, t_query: float,
               txn: AppTxn) -> None:
        """Commit order item_embeddings -> user_interest -> user_recommendations (see the module docstring)."""
        specs, storage = self.specs, self.storage
        for name in OUTPUTS:
            storage.ensure(specs[name])
        with torch.no_grad():
            table = item_embeddings_arrow(model.item_embeddings().detach().float().numpy())
        items = self.spark.createDataFrame(table).join(vocab.select("item_id", "item_idx"), "item_idx") \
            .withColumn("model_version", F.lit(version))
        storage.replace_where(specs["item_embeddings"], items, {"model_version": [version]}, txn=txn)
        state_ts = dt.datetime.fromtimestamp(t_query, dt.timezone.utc)
        interest = (results.where(F.col("prev_as_of").isNull() | (F.col("prev_as_of") <= F.lit(as_of)))
                    .select("user_id", F.lit(as_of).alias("as_of"), F.lit(version).alias("model_version"),
                            "embedding", "norm", F.col("n_before").alias("n_events"),
                            F.timestamp_seconds("last_before").alias("last_event_ts"), "decay_state", "decay_mass",
                            F.lit(state_ts).alias("updated_at"), "user_bucket"))
        storage.merge(specs["user_interest"], interest, txn=txn)
        storage.replace_where(specs["user_recommendations"], recommendation_rows(results, vocab, version, as_of),
                              {"as_of": [as_of]}, txn=txn)


def recommendation_rows(results: DataFrame, vocab: DataFrame, version: str, as_of: dt.date) -> DataFrame:
    """user_recommendations rows from per-user ranked arrays (rec_items, rec_scores, rec_sources)."""
    ranked = F.arrays_zip("rec_items", "rec_scores", "rec_sources")
    return (results.select("user_id", F.posexplode(ranked).alias("pos", "r"))
            .select("user_id", (F.col("pos") + 1).alias("rank"), F.col("r.rec_items").alias("item_idx"),
                    F.col("r.rec_scores").alias("score"), F.col("r.rec_sources").alias("source"))
            .join(F.broadcast(vocab.select("item_id", "item_idx")), "item_idx")
            .select("user_id", "rank", "item_id", "score", "source", F.lit(version).alias("model_version"),
                    F.lit(as_of).alias("as_of")))
