"""Nightly: every active user's interest embedding as of a date, top-K recommendations, written back to Delta.

For DATE the query time is the end of DATE (UTC). Inference runs on the executors (mapInPandas, the model shipped
once per executor through a broadcast), batched, with top-K by a blocked matrix product against the item
embeddings, excluding items the user already consumed.

Incremental and exact for decay models: `user_interest` keeps each user's per-timescale decay state and mass.
A user whose history has not changed since the stored state (same model version, same last event, same count)
is not re-encoded: state_k(t) = state_k(t_state) * exp(-(t - t_state)/tau_k), then the light head. Everyone
else is re-encoded from `user_sequences` (events before the query time only). Models without a decay state are
re-encoded every night.

Idempotent: the same DATE twice gives identical tables (states are stored as float32 and every embedding is
computed from the stored precision). Running DATE-1 after DATE never overwrites newer user_interest rows.
Nothing is written unless every check passes: finite embeddings, expected recommendation counts, consistent
model / vocabulary / snapshot versions.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ebbtide.config import Config
from ebbtide.feed import seconds
from ebbtide.models import build_model
from ebbtide.models.base import Batch
from ebbtide.storage import AppTxn, DeltaStorage, unit_of_work
from ebbtide.tables import table_specs
from ebbtide.train import latest_artifact, load_artifact

log = logging.getLogger(__name__)


class VersionMismatchError(ValueError):
    """The model, the vocabulary and the data snapshot do not belong together."""


class NightlyCheckError(RuntimeError):
    """A pre-commit check failed; nothing was written."""


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
    seconds: float = 0.0

    def line(self) -> str:
        return (f"nightly {self.as_of} model {self.model_version} on user_sequences v{self.sequences_version}: "
                f"{self.active_users:,} active users ({self.reencoded:,} re-encoded, {self.rescaled:,} rescaled, "
                f"{self.kept_newer:,} kept newer state), {self.recommendations:,} recommendations, "
                f"{self.seconds:.1f}s")

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
    T.StructField("expected_recs", T.IntegerType()), T.StructField("finite", T.BooleanType()),
])

_MODEL_CACHE: dict[str, tuple] = {}


def _model_from_payload(payload: dict):
    """Once per Python worker: rebuild the model from the broadcast weights (weights_only load)."""
    key = payload["version"]
    if key not in _MODEL_CACHE:
        conf = payload["config"]
        model = build_model(conf["name"], conf["n_items"], conf["n_types"], conf["dim"], conf["max_len"])
        model.load_state_dict(torch.load(io.BytesIO(payload["weights"]), map_location="cpu", weights_only=True))
        model.eval()
        torch.set_num_threads(1)  # one thread per Spark task: the executor's cores are the parallelism
        with torch.no_grad():
            items = model.item_embeddings().detach().float().clone()
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = (model, items, conf)
    return _MODEL_CACHE[key]


def top_k(users: torch.Tensor, items: torch.Tensor, k: int, exclude: list[np.ndarray], block: int):
    """Top-k items per user by dot product, item blocks at a time, excluded items never returned."""
    best_scores = torch.full((len(users), 0), -torch.inf)
    best_items = torch.zeros((len(users), 0), dtype=torch.long)
    for start in range(0, len(items), block):
        scores = users @ items[start:start + block].T
        for row, consumed in enumerate(exclude):
            inside = consumed[(consumed >= start) & (consumed < start + block)] - start
            if len(inside):
                scores[row, torch.from_numpy(inside)] = -torch.inf
        cand_scores = torch.cat([best_scores, scores], dim=1)
        cand_items = torch.cat([best_items, torch.arange(start, start + scores.shape[1]).expand(len(users), -1)], 1)
        take = torch.topk(cand_scores, min(k, cand_scores.shape[1]), dim=1)
        best_scores, best_items = take.values, torch.gather(cand_items, 1, take.indices)
    return best_items, best_scores


def _infer(payload, t_query: float, k: int, block: int, batch_size: int, exclude_consumed: bool):
    """The mapInPandas function; `payload` is the broadcast of the model (read once per Python worker)."""
    def run(frames):
        model, item_table, conf = _model_from_payload(payload.value)
        n_items, max_len = conf["n_items"], conf["max_len"]
        has_state = hasattr(model, "final_state")
        for frame in frames:
            for start in range(0, len(frame), batch_size):
                yield _infer_batch(frame.iloc[start:start + batch_size], model, item_table, n_items, max_len,
                                   has_state, t_query, k, block, exclude_consumed)
    return run


def _infer_batch(frame: pd.DataFrame, model, item_table, n_items, max_len, has_state, t_query, k, block,
                 exclude_consumed) -> pd.DataFrame:
    n = len(frame)
    rescale = (frame["mode"] == "rescale").values if has_state else np.zeros(n, bool)
    histories, consumed = [], []
    for it, ts, ty, se in zip(frame["item_idx"], frame["ts"], frame["event_type"], frame["session_idx"]):
        it, ts = np.asarray(it, np.int64), np.asarray(ts, np.float64)
        keep = (ts < t_query) & (it < n_items)     # events up to the query time; items the model knows
        histories.append((it[keep], ts[keep], np.asarray(ty)[keep], np.asarray(se)[keep]))
        consumed.append(np.unique(it[keep]) if exclude_consumed else np.zeros(0, np.int64))
    with torch.no_grad():
        dim = item_table.shape[1]
        if has_state:
            K = model.log_tau.numel()
            states = torch.zeros(n, K, dim, dtype=torch.float64)
            masses = torch.zeros(n, K, dtype=torch.float64)
            enc = np.nonzero(~rescale)[0]
            if len(enc):
                batch = Batch.from_histories([histories[i] for i in enc], max_len)
                s, m = model.final_state(batch, torch.full((len(enc),), t_query, dtype=torch.float64))
                states[enc], masses[enc] = s, m
            res = np.nonzero(rescale)[0]
            if len(res):
                prev_s = torch.tensor(np.stack(frame["prev_state"].values[res]), dtype=torch.float64).view(-1, K, dim)
                prev_m = torch.tensor(np.stack(frame["prev_mass"].values[res]), dtype=torch.float64)
                elapsed = torch.tensor(t_query - frame["prev_state_ts"].values[res], dtype=torch.float64)
                factor = torch.exp(-(elapsed / 86_400.0).unsqueeze(-1) / model.log_tau.double().exp())
                states[res], masses[res] = prev_s * factor.unsqueeze(-1), prev_m * factor
            # Stored precision is float32; embeddings come from the stored values, so a re-run is identical.
            states32, masses32 = states.float(), masses.float()
            users = model.combine(states32, masses32)
            state_out = states32.reshape(n, -1).numpy()
            mass_out = masses32.numpy()
        else:
            batch = Batch.from_histories(histories, max_len)
            users = model.encode(batch, torch.full((n,), t_query, dtype=torch.float64)).float()
            state_out = np.zeros((n, 0), np.float32)
            mass_out = np.zeros((n, 0), np.float32)
        rec_items, rec_scores = top_k(users, item_table, k, consumed, block)
    finite = torch.isfinite(users).all(dim=1).numpy()
    return pd.DataFrame({
        "user_id": frame["user_id"].values, "user_bucket": frame["user_bucket"].values,
        "mode": np.where(rescale, "rescale", "encode"),
        "n_before": frame["n_before"].values, "last_before": frame["last_before"].values,
        "embedding": list(users.numpy()), "norm": users.norm(dim=1).numpy(),
        "decay_state": list(state_out), "decay_mass": list(mass_out),
        "rec_items": list(rec_items.numpy().astype(np.int32)), "rec_scores": list(rec_scores.numpy()),
        "expected_recs": np.array([min(k, n_items - len(c)) for c in consumed], np.int32), "finite": finite})


class Nightly:
    def __init__(self, spark: SparkSession, cfg: Config, storage: DeltaStorage):
        self.spark, self.cfg, self.storage = spark, cfg, storage
        self.specs = table_specs(cfg)
        for name in ("user_interest", "item_embeddings", "user_recommendations"):
            storage.ensure(self.specs[name])

    def resolve_model(self) -> Path:
        n = self.cfg.nightly
        return Path(n.model_version) if n.model_version else latest_artifact(self.cfg.train.output, n.model)

    @unit_of_work("nightly", writes=("item_embeddings", "user_recommendations", "user_interest"))
    def run(self, as_of: dt.date, full: bool = False) -> NightlyReport:
        started = time.time()
        n, specs, storage = self.cfg.nightly, self.specs, self.storage
        path = self.resolve_model()
        model, conf, meta = load_artifact(path)
        version = path.name
        seq_version = storage.version(specs["user_sequences"])
        vocab = storage.read(specs["item_vocab"])
        vocab_size = vocab.count()
        self._check_versions(conf, meta, seq_version, vocab_size, path)
        report = NightlyReport(as_of, version, seq_version)
        t_query = seconds(as_of + dt.timedelta(days=1))
        horizon = t_query - n.retention_days * 86_400

        seqs = storage.read(specs["user_sequences"], seq_version)
        before = F.filter("ts", lambda x: x < F.lit(t_query))
        seqs = (seqs.where(F.exists("ts", lambda x: (x >= F.lit(horizon)) & (x < F.lit(t_query))))
                .withColumn("n_before", F.col("n_events") - F.size(F.filter("ts", lambda x: x >= F.lit(t_query))))
                .withColumn("last_before", F.array_max(before).cast("double")))
        prev = storage.read(specs["user_interest"]).select(
            "user_id", F.col("as_of").alias("prev_as_of"), F.col("model_version").alias("prev_model"),
            F.col("n_events").alias("prev_n"), F.unix_seconds("last_event_ts").cast("double").alias("prev_last"),
            F.col("decay_state").alias("prev_state"), F.col("decay_mass").alias("prev_mass"),
            F.unix_seconds("updated_at").cast("double").alias("prev_state_ts"))
        unchanged = ((F.col("prev_model") == version) & (F.col("prev_as_of") <= F.lit(as_of))
                     & (F.col("prev_n") == F.col("n_before")) & (F.col("prev_last") == F.col("last_before")))
        use_state = n.incremental and not full and hasattr(model, "final_state")
        joined = seqs.join(prev, "user_id", "left").withColumn(
            "mode", F.when(F.lit(use_state) & F.coalesce(unchanged, F.lit(False)), "rescale").otherwise("encode"))

        weights = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
        payload = self.spark.sparkContext.broadcast({"version": version, "config": conf,
                                                     "weights": weights.getvalue()})
        results = joined.select(
            "user_id", "user_bucket", "item_idx", "ts", "event_type", "session_idx", "n_before", "last_before",
            "mode", "prev_state", "prev_mass", "prev_state_ts").mapInPandas(
            _infer(payload, t_query, n.top_k, n.item_block, n.batch_size, n.exclude_consumed),
            OUTPUT_SCHEMA)
        results = results.join(prev.select("user_id", "prev_as_of"), "user_id", "left").persist(
            StorageLevel.MEMORY_AND_DISK)
        try:
            self._check_results(results, report)
            txn = AppTxn(f"ebbtide.nightly.{as_of.isoformat()}", int(started))
            self._write(results, vocab, model, version, as_of, t_query, txn, report)
        finally:
            results.unpersist()
            payload.unpersist()
        report.seconds = time.time() - started
        log.info("%s", report.line())
        return report

    def _check_versions(self, conf: dict, meta: dict, seq_version: int, vocab_size: int, path: Path) -> None:
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
            F.sum(F.when(F.col("prev_as_of") > F.lit(report.as_of), 1).otherwise(0)).alias("newer"),
        ).collect()[0]
        report.active_users = stats["users"]
        report.rescaled = stats["rescaled"] or 0
        report.reencoded = report.active_users - report.rescaled
        report.recommendations = stats["recs"] or 0
        report.kept_newer = stats["newer"] or 0
        failures = []
        if stats["non_finite"]:
            failures.append(f"{stats['non_finite']} users have non-finite embeddings")
        if stats["short_recs"]:
            failures.append(f"{stats['short_recs']} users have fewer recommendations than expected")
        if failures:
            raise NightlyCheckError(f"nightly {report.as_of}: " + "; ".join(failures) + "; nothing was written")

    def _write(self, results: DataFrame, vocab: DataFrame, model, version: str, as_of: dt.date, t_query: float,
               txn: AppTxn, report: NightlyReport) -> None:
        specs, storage = self.specs, self.storage
        item_rows = [(int(i), e.tolist()) for i, e in enumerate(model.item_embeddings().detach().float().numpy())]
        items = self.spark.createDataFrame(item_rows, "item_idx int, embedding array<float>").join(
            vocab.select("item_id", "item_idx"), "item_idx").withColumn("model_version", F.lit(version))
        storage.replace_where(specs["item_embeddings"], items, {"model_version": [version]}, txn=txn)
        recs = (results.select("user_id", F.posexplode(F.arrays_zip("rec_items", "rec_scores")).alias("pos", "r"))
                .select("user_id", (F.col("pos") + 1).alias("rank"), F.col("r.rec_items").alias("item_idx"),
                        F.col("r.rec_scores").alias("score"))
                .join(F.broadcast(vocab.select("item_id", "item_idx")), "item_idx")
                .select("user_id", "rank", "item_id", "score", F.lit(version).alias("model_version"),
                        F.lit(as_of).alias("as_of")))
        storage.replace_where(specs["user_recommendations"], recs, {"as_of": [as_of]}, txn=txn)
        state_ts = dt.datetime.fromtimestamp(t_query, dt.timezone.utc)
        interest = (results.where(F.col("prev_as_of").isNull() | (F.col("prev_as_of") <= F.lit(as_of)))
                    .select("user_id", F.lit(as_of).alias("as_of"), F.lit(version).alias("model_version"),
                            "embedding", "norm", F.col("n_before").alias("n_events"),
                            F.timestamp_seconds("last_before").alias("last_event_ts"), "decay_state", "decay_mass",
                            F.lit(state_ts).alias("updated_at"), "user_bucket"))
        storage.merge(specs["user_interest"], interest, txn=txn)
