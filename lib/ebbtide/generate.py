"""Synthetic raw event logs with a planted ground truth (demo, tests and benchmarks).

Each user has a long-term category taste (Dirichlet) and short-term interest that every event excites in its
category and that fades with a planted half-life (see _interest_categories: a self-exciting process whose kernel
is exactly the decay the models assume); the item is drawn from the category by Zipf popularity. Sessions are bursts of events
separated by long gaps; a session can cross midnight. Users are simulated in chunks across all days, so memory
is bounded by a chunk, and every chunk has its own seed: the output depends only on the configuration.

Layout: ``<out>/date=YYYY-MM-DD/part-NNNNN.{jsonl,parquet}`` plus ``<out>/_ground_truth.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ebbtide.config import GenerateConf

log = logging.getLogger(__name__)

DAY = 86_400
EVENT_TYPES = np.array(["view", "click", "cart", "purchase"])
EVENT_TYPE_P = np.array([0.80, 0.12, 0.05, 0.03])
# Every quarantine reason the sessionize job knows; parquet (typed columns) cannot carry the first two.
BAD_KINDS_JSON = ("unparseable_record", "wrong_type", "missing_user_id", "missing_item_id",
                  "unparseable_timestamp", "timestamp_too_old", "timestamp_in_future", "unknown_event_type",
                  "oversize_field")
BAD_KINDS_PARQUET = BAD_KINDS_JSON[2:]


def day_folder(root: str, day: dt.date) -> str:
    return os.path.join(root, f"date={day.isoformat()}")


@dataclass
class DayTruth:
    events: int = 0          # distinct valid events delivered this day (late arrivals included)
    late: int = 0            # of which belong to the previous day
    duplicates: int = 0      # extra copies of events delivered this day or earlier
    bad: Counter = field(default_factory=Counter)

    @property
    def lines(self) -> int:
        return self.events + self.duplicates + sum(self.bad.values())


def _item_sampler(conf: GenerateConf):
    """Item i belongs to category i % C with popularity rank i // C; ranks follow a Zipf law."""
    n_ranks = math.ceil(conf.items / conf.categories)
    weights = 1.0 / np.arange(1, n_ranks + 1) ** conf.zipf_exponent
    cdf = np.cumsum(weights) / weights.sum()

    def sample(rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        rank = np.searchsorted(cdf, rng.random(len(categories)))
        max_rank = (conf.items - 1 - categories) // conf.categories
        return np.minimum(rank, max_rank) * conf.categories + categories

    return sample


def _simulate_chunk(conf: GenerateConf, chunk: int, first_user: int, n_users: int, sample_items) -> pd.DataFrame:
    """All events of users [first_user, first_user + n_users) over the whole period, one row per event."""
    rng = np.random.default_rng([conf.seed, chunk])
    start = dt.datetime.combine(conf.start_date, dt.time(), tzinfo=dt.timezone.utc).timestamp()
    horizon = conf.days * DAY
    rate = conf.sessions_per_user_day * rng.lognormal(0.0, 0.6, n_users)
    n_sessions = rng.poisson(rate * conf.days)
    s_user = np.repeat(np.arange(n_users), n_sessions)
    s_start = rng.uniform(0, horizon, len(s_user))
    s_len = rng.geometric(1.0 / conf.events_per_session, len(s_user))
    e_session = np.repeat(np.arange(len(s_user)), s_len)
    gaps = rng.exponential(conf.seconds_between_events, len(e_session))
    first_of_session = np.r_[0, np.cumsum(s_len)[:-1]]
    gaps[first_of_session] = 0.0
    csum = np.cumsum(gaps)
    e_t = s_start[e_session] + csum - csum[first_of_session][e_session]
    e_user = s_user[e_session]
    inside = e_t < horizon
    order = np.lexsort((e_t[inside], e_user[inside]))
    e_user, e_t = e_user[inside][order], e_t[inside][order]
    n = len(e_t)
    category = _interest_categories(conf, rng, n_users, e_user, e_t)
    items = sample_items(rng, category)

    ts_us = ((start + e_t) * 1e6).astype(np.int64)
    event_ids = np.char.mod("%016x", rng.integers(0, 2**62, n, dtype=np.int64))
    has_id = rng.random(n) >= conf.missing_event_id_rate
    day = (e_t // DAY).astype(np.int64)
    late = (rng.random(n) < conf.late_rate) & (day + 1 < conf.days)
    return pd.DataFrame({
        "event_id": np.where(has_id, event_ids, None),
        "user_id": np.char.mod("u%07d", first_user + e_user),
        "item_id": np.char.mod("i%06d", items),
        "event_type": rng.choice(EVENT_TYPES, n, p=EVENT_TYPE_P),
        "ts_us": ts_us,
        "ts_style": rng.integers(0, 5, n),
        "arrival_day": day + late,
        "late": late,
    })


def _interest_categories(conf: GenerateConf, rng: np.random.Generator, n_users: int, e_user: np.ndarray,
                         e_t: np.ndarray) -> np.ndarray:
    """The planted interest process: the category of a user's next event is drawn with probability

        p(c) ∝ taste_c + excitation * sum over the user's earlier events j in c of 2^(-(t - t_j) / half_life)
                 + novelty / C

    a long-term taste (Dirichlet), plus interest excited by every event and decaying with the planted half-life
    (a self-exciting, Hawkes-type process), plus a small chance of a new interest. The weight an earlier event
    carries for the next one is exactly `floor + 2^(-age / half_life)`: the decay the models assume and should
    recover. Events must come sorted by (user, time); users are simulated side by side, one event at a time."""
    hl = conf.interest_half_life_days * DAY
    n_cat = conf.categories
    taste = rng.dirichlet(np.full(n_cat, conf.long_term_concentration), n_users)
    counts = np.bincount(e_user, minlength=n_users)
    position = np.arange(len(e_user)) - np.r_[0, np.cumsum(counts)[:-1]][e_user]
    excited = np.zeros((n_users, n_cat))
    last_t = np.zeros(n_users)
    category = np.zeros(len(e_user), np.int64)
    by_position = np.argsort(position, kind="stable")
    bounds = np.searchsorted(position[by_position], np.arange(int(counts.max(initial=0)) + 1))
    for k in range(len(bounds) - 1):
        rows = by_position[bounds[k]:bounds[k + 1]]   # every user's k-th event
        users, t = e_user[rows], e_t[rows]
        excited[users] *= np.exp2(-(t - last_t[users]) / hl)[:, None]
        p = taste[users] + conf.interest_excitation * excited[users] + conf.novelty / n_cat
        c = np.minimum((np.cumsum(p, axis=1) < (rng.random(len(users)) * p.sum(1))[:, None]).sum(1), n_cat - 1)
        category[rows] = c
        excited[users, c] += 1.0
        last_t[users] = t
    return category


def _ts_json_values(ts_us: np.ndarray, style: np.ndarray) -> np.ndarray:
    """Mixed timestamp spellings seen in real logs: ISO with Z / offset / no zone, epoch s and ms."""
    t = ts_us.astype("datetime64[us]")
    out = np.empty(len(ts_us), dtype=object)
    iso_z = np.char.add(np.datetime_as_string(t, unit="ms"), "Z")
    iso_naive = np.char.replace(np.datetime_as_string(t, unit="s"), "T", " ")
    iso_off = np.char.add(np.datetime_as_string(t + np.timedelta64(2, "h"), unit="s"), "+02:00")
    for code, values in ((0, iso_z), (1, iso_naive), (2, iso_off)):
        mask = style == code
        out[mask] = values[mask]
    out[style == 3] = (ts_us[style == 3] // 1_000_000).tolist()
    out[style == 4] = (ts_us[style == 4] // 1_000).tolist()
    return out


def _bad_json_line(kind: str, ev: dict, day: dt.date) -> str:
    rec = dict(ev)
    if kind == "unparseable_record":
        return json.dumps(rec)[: 25]
    if kind == "wrong_type":
        rec["user_id"] = {"id": rec["user_id"]}
    elif kind == "missing_user_id":
        rec["user_id"] = ""
    elif kind == "missing_item_id":
        rec.pop("item_id")
    elif kind == "unparseable_timestamp":
        rec["ts"] = "last tuesday"
    elif kind == "timestamp_too_old":
        rec["ts"] = "1999-12-31T23:00:00Z"
    elif kind == "timestamp_in_future":
        rec["ts"] = f"{(day + dt.timedelta(days=10)).isoformat()}T00:00:00Z"
    elif kind == "unknown_event_type":
        rec["event_type"] = "hover"
    elif kind == "oversize_field":
        rec["item_id"] = "i" * 5000
    return json.dumps(rec)


def _bad_parquet_row(kind: str, ev: dict, day: dt.date) -> dict:
    rec = dict(ev)
    if kind == "missing_user_id":
        rec["user_id"] = ""
    elif kind == "missing_item_id":
        rec["item_id"] = None
    elif kind == "unparseable_timestamp":
        rec["ts"] = None  # typed column: a missing instant is the only unusable one
    elif kind == "timestamp_too_old":
        rec["ts"] = pd.Timestamp("1999-12-31T23:00:00Z")
    elif kind == "timestamp_in_future":
        rec["ts"] = pd.Timestamp(day + dt.timedelta(days=10), tz="UTC")
    elif kind == "unknown_event_type":
        rec["event_type"] = "hover"
    elif kind == "oversize_field":
        rec["item_id"] = "i" * 5000
    return rec


def generate(conf: GenerateConf, progress: bool = True) -> dict:
    """Write the logs and the ground truth; returns the ground truth."""
    os.makedirs(conf.out, exist_ok=True)
    days = [conf.start_date + dt.timedelta(days=d) for d in range(conf.days)]
    for day in days:
        os.makedirs(day_folder(conf.out, day), exist_ok=True)
    truth = {d: DayTruth() for d in days}
    sample_items = _item_sampler(conf)
    bad_kinds = BAD_KINDS_JSON if conf.format == "json" else BAD_KINDS_PARQUET
    chunks = range(math.ceil(conf.users / conf.users_per_chunk))
    total = 0
    for chunk in tqdm(chunks, desc="generate", disable=not progress, unit="chunk"):
        first = chunk * conf.users_per_chunk
        events = _simulate_chunk(conf, chunk, first, min(conf.users_per_chunk, conf.users - first), sample_items)
        rng = np.random.default_rng([conf.seed, chunk, 1])
        total += len(events)
        for d_idx, day in enumerate(days):
            todays = events[events.arrival_day == d_idx]
            t = truth[day]
            t.events += len(todays)
            t.late += int(todays.late.sum())
            # Redeliveries: copies of today's events, plus copies of yesterday's arriving again today.
            n_dup = rng.binomial(len(todays), conf.duplicate_rate) if len(todays) else 0
            dup_pool = events[events.arrival_day.isin([d_idx, d_idx - 1])]
            dups = dup_pool.iloc[rng.integers(0, len(dup_pool), n_dup)] if n_dup else dup_pool.iloc[:0]
            t.duplicates += len(dups)
            n_bad = rng.binomial(len(todays), conf.bad_record_rate) if len(todays) else 0
            kinds = [bad_kinds[(chunk + i) % len(bad_kinds)] for i in range(n_bad)]
            t.bad.update(kinds)
            _write_day_part(conf, day, chunk, pd.concat([todays, dups]), kinds, rng)
    gt = {
        "interest_half_life_days": conf.interest_half_life_days,
        "seed": conf.seed, "users": conf.users, "items": conf.items, "categories": conf.categories,
        "start_date": conf.start_date.isoformat(), "days": conf.days, "format": conf.format,
        "total_events": total,
        "per_day": {d.isoformat(): {"events": t.events, "late": t.late, "duplicates": t.duplicates,
                                    "bad": dict(sorted(t.bad.items())), "lines": t.lines}
                    for d, t in truth.items()},
    }
    with open(os.path.join(conf.out, "_ground_truth.json"), "w") as fh:
        json.dump(gt, fh, indent=2)
    log.info("generated %d events for %d users over %d days into %s", total, conf.users, conf.days, conf.out)
    return gt


def _write_day_part(conf: GenerateConf, day: dt.date, chunk: int, rows: pd.DataFrame, bad_kinds: list[str],
                    rng: np.random.Generator) -> None:
    # Shuffle: logs are not in time order, and duplicates should not sit next to their originals.
    rows = rows.iloc[rng.permutation(len(rows))]
    path = os.path.join(day_folder(conf.out, day), f"part-{chunk:05d}")
    if conf.format == "json":
        frame = pd.DataFrame({"event_id": rows.event_id.values, "user_id": rows.user_id.values,
                              "item_id": rows.item_id.values, "event_type": rows.event_type.values,
                              "ts": _ts_json_values(rows.ts_us.values, rows.ts_style.values)})
        body = frame.to_json(orient="records", lines=True) if len(frame) else ""
        bad = [_bad_json_line(kind, {k: v for k, v in frame.iloc[i % len(frame)].items() if v is not None}, day)
               for i, kind in enumerate(bad_kinds)] if len(frame) else []
        with open(path + ".jsonl", "w") as fh:
            fh.write(body if body.endswith("\n") or not body else body + "\n")
            fh.writelines(line + "\n" for line in bad)
        return
    frame = pd.DataFrame({"event_id": rows.event_id.values, "user_id": rows.user_id.values,
                          "item_id": rows.item_id.values, "event_type": rows.event_type.values,
                          "ts": pd.to_datetime(rows.ts_us.values, unit="us", utc=True)})
    if bad_kinds and len(frame):
        bad = [_bad_parquet_row(kind, frame.iloc[i % len(frame)].to_dict(), day) for i, kind in enumerate(bad_kinds)]
        frame = pd.concat([frame, pd.DataFrame(bad)], ignore_index=True)
    schema = pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
                        ("event_type", pa.string()), ("ts", pa.timestamp("us", tz="UTC"))])
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path + ".parquet",
                   row_group_size=1_000_000)


def clustered_embeddings(n_users: int, n_items: int, dim: int = 64, clusters: int = 1000, seed: int = 0,
                         chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) float32 vectors shaped like a trained two-tower / factorisation model's, for top-K
    benchmarks and tests (isotropic Gaussian noise makes every item about equally far from every user, which no
    trained model does): items sit around `clusters` unit-norm category centres (noise of norm ~0.8, i.e. cosine
    ~0.78 to their centre), category sizes follow a Zipf law, and norms are log-normal (popular items get longer
    vectors in dot-product models); a user mixes 1-3 categories with Dirichlet weights plus noise of norm ~0.5."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, clusters + 1) ** 0.8
    items = np.empty((n_items, dim), np.float32)
    for start in range(0, n_items, chunk):     # bounded temporaries at 10M items
        m = min(chunk, n_items - start)
        cat = rng.choice(clusters, m, p=sizes / sizes.sum())
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.8 / math.sqrt(dim))
        norm = rng.lognormal(0.0, 0.25, (m, 1)).astype(np.float32)
        items[start:start + m] = (centres[cat] + noise) * norm
    n_mix = rng.integers(1, 4, n_users)
    weights = np.zeros((n_users, clusters), np.float32)
    for r, m in enumerate(n_mix):
        weights[r, rng.choice(clusters, m, replace=False, p=sizes / sizes.sum())] = rng.dirichlet(np.ones(m))
    users = weights @ centres + rng.standard_normal((n_users, dim), dtype=np.float32) * np.float32(
        0.5 / math.sqrt(dim))
    return users.astype(np.float32), items
