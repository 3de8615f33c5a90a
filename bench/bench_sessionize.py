"""Sessionize benchmark: ebbtide (Spark local[2] + Delta) vs DuckDB (2 threads) on the same generated files.

Both build per-user, session-indexed sequences (last max_len events) from the same raw Parquet logs with the same
validation, de-duplication and session rules; ebbtide also writes every Delta table (events, quarantine, sessions,
counts, vocab). Prints events/s for each, the ratio ebbtide/DuckDB, ebbtide's per-event cost across sizes, the Spark
jobs and stages of each run (from Spark's listener, as in the job's --report), and the steady state: a day of
--steady-size events run into tables that already hold --history-days such days, against the first day.

    make bench                                   # 1M / 10M / 30M, ratio at 10M, steady state 1M x 30 days
    python bench/bench_sessionize.py --sizes 1e6 --ratio-size 1e6 --history-days 0           # quick
    python bench/bench_sessionize.py --sizes 2e4 --ratio-size 2e4 --steady-size 2e4 --history-days 3   # jobs only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DAY = dt.date(2026, 11, 1)
EVENTS_PER_USER_DAY = 4.3  # what the generator's defaults yield on average (measured)


def generate_days(root: Path, n_events: int, days: int = 1) -> tuple[Path, list[int]]:
    """Parquet raw logs of `days` days from DAY on, ~n_events a day; returns the folder and each day's lines."""
    from ebbtide.config import load_config
    from ebbtide.generate import generate

    raw = root / (f"raw_{n_events}" if days == 1 else f"raw_{n_events}x{days}")
    marker = raw / "_ground_truth.json"
    if marker.exists():
        truth = json.loads(marker.read_text())
    else:
        cfg = load_config("local", {
            "generate.out": str(raw), "generate.format": "parquet", "generate.days": days,
            "generate.start_date": DAY.isoformat(), "generate.users": max(1, int(n_events / EVENTS_PER_USER_DAY)),
            "generate.items": 100_000, "generate.categories": 100, "generate.bad_record_rate": 0.001,
            "generate.duplicate_rate": 0.01, "generate.late_rate": 0.0, "generate.users_per_chunk": 200_000})
        truth = generate(cfg.generate, progress=False)
    return raw, [truth["per_day"][(DAY + dt.timedelta(days=d)).isoformat()]["lines"] for d in range(days)]


def generate_apart(root: Path, n_events: int, days: int = 1) -> tuple[Path, list[int]]:
    """generate_days in a child process, before Spark starts: 31 days of 1M events take ~15 GB in the generator,
    which next to a running 8 GB driver JVM ran a 24 GB host out of memory."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(generate_days, root, n_events, days).result()


def run_ebbtide(raw: Path, tables: Path, days: int = 1) -> list:
    """Sessionize DAY.. DAY+days-1 in order into fresh tables; the run reports (seconds, Spark jobs, stages)."""
    from ebbtide.config import load_config
    from ebbtide.sessionize import Sessionizer
    from ebbtide.spark import get_spark
    from ebbtide.storage import open_storage

    shutil.rmtree(tables, ignore_errors=True)
    cfg = load_config("local", {"spark.master": "local[2]", "spark.driver_memory": "8g", "spark.ui_enabled": False,
                                "sessionize.input": str(raw), "sessionize.format": "parquet",
                                "storage.root": str(tables), "storage.engine": "rs", "storage.user_buckets": 16})
    spark = get_spark(cfg.spark)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    reports = []
    for d in range(days):
        reports.append(job.run(DAY + dt.timedelta(days=d)))
        logging.info("ebbtide: %s", reports[-1].line())
    return reports


DUCKDB_SQL = """
WITH raw AS (SELECT * FROM read_parquet('{glob}')),
valid AS (
  SELECT coalesce(nullif(trim(event_id), ''),
                  substr(sha256(concat_ws(chr(1), trim(user_id), trim(item_id), lower(trim(event_type)),
                                          CAST(epoch_us(ts) AS VARCHAR))), 1, 32)) AS event_id,
         trim(user_id) AS user_id, trim(item_id) AS item_id, lower(trim(event_type)) AS event_type, ts
  FROM raw
  WHERE trim(user_id) <> '' AND trim(item_id) <> '' AND ts IS NOT NULL
    AND ts >= TIMESTAMPTZ '{floor}' AND ts < TIMESTAMPTZ '{ceiling}'
    AND lower(trim(event_type)) IN ('view', 'click', 'cart', 'purchase')
    AND length(user_id) <= 256 AND length(item_id) <= 256 AND length(event_type) <= 256),
dedup AS (SELECT * FROM valid QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY ts, user_id, item_id) = 1),
vocab AS (SELECT item_id, (row_number() OVER (ORDER BY item_id) - 1)::INT AS item_idx
          FROM (SELECT DISTINCT item_id FROM dedup)),
chained AS (
  SELECT *, CASE WHEN lag(ts) OVER w IS NULL OR epoch_us(ts) - epoch_us(lag(ts) OVER w) > {gap_us}
                 THEN 1 ELSE 0 END AS new_chain
  FROM dedup WINDOW w AS (PARTITION BY user_id ORDER BY ts, event_id)),
chain_start AS (
  SELECT *, max(CASE WHEN new_chain = 1 THEN ts END) OVER w AS chain_ts
  FROM chained WINDOW w AS (PARTITION BY user_id ORDER BY ts, event_id ROWS UNBOUNDED PRECEDING)),
sessioned AS (
  SELECT *, chain_ts::VARCHAR || '/' || ((epoch_us(ts) - epoch_us(chain_ts)) // {max_us})::VARCHAR AS skey
  FROM chain_start),
latest AS (
  SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, event_id DESC) AS rn FROM sessioned),
kept AS (
  SELECT l.*, v.item_idx,
         (dense_rank() OVER (PARTITION BY user_id ORDER BY min_ts, skey) - 1)::INT AS session_idx
  FROM (SELECT *, min(ts) OVER (PARTITION BY user_id, skey) AS min_ts FROM latest WHERE rn <= {max_len}) l
  JOIN vocab v USING (item_id))
SELECT user_id,
       list(item_idx ORDER BY ts, event_id) AS item_idx,
       list(epoch(ts)::BIGINT ORDER BY ts, event_id) AS ts,
       list(list_position(['view', 'click', 'cart', 'purchase'], event_type) - 1 ORDER BY ts, event_id) AS event_type,
       list(session_idx ORDER BY ts, event_id) AS session_idx,
       list(CASE event_type WHEN 'view' THEN 1.0 WHEN 'click' THEN 2.0 WHEN 'cart' THEN 3.0 ELSE 5.0 END::FLOAT
            ORDER BY ts, event_id) AS weight
FROM kept GROUP BY user_id
"""


def run_duckdb(raw: Path, out: Path, threads: int = 2) -> tuple[float, int]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET TimeZone = 'UTC'")
    sql = DUCKDB_SQL.format(glob=f"{raw}/date=*/*.parquet", floor="2000-01-01 00:00:00+00",
                            ceiling=f"{DAY + dt.timedelta(days=2)} 00:00:00+00", gap_us=30 * 60_000_000,
                            max_us=240 * 60_000_000, max_len=200)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    con.execute(f"COPY ({sql}) TO '{out}' (FORMAT PARQUET)")
    elapsed = time.perf_counter() - started
    users = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
    return elapsed, users


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,3e7", help="event counts for the per-event cost curve")
    parser.add_argument("--ratio-size", default="1e7", help="event count for the ebbtide/DuckDB ratio")
    parser.add_argument("--steady-size", default="1e6", help="events a day for the steady-state run")
    parser.add_argument("--history-days", type=int, default=30, help="days already in the tables (0: skip)")
    parser.add_argument("--work", default=os.environ.get("EBBTIDE_BENCH_DIR", "/tmp/ebbtide-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger("ebbtide.storage").setLevel(logging.WARNING)
    work = Path(args.work)
    sizes = sorted({int(float(s)) for s in args.sizes.split(",")} | {int(float(args.ratio_size))})
    inputs = {n: generate_apart(work, n) for n in sizes}
    if args.history_days:
        generate_apart(work, int(float(args.steady_size)), args.history_days + 1)
    rows = []
    for n in sizes:
        raw, (lines,) = inputs[n]
        logging.info("size %s: %s raw records in %s", f"{n:,}", f"{lines:,}", raw)
        report, = run_ebbtide(raw, work / f"tables_{n}")
        ebb = report.seconds
        row = {"events": lines, "ebbtide_s": ebb, "ebbtide_events_per_s": lines / ebb,
               "ebbtide_us_per_event": ebb / lines * 1e6, "spark_jobs": report.spark_jobs,
               "spark_stages": report.spark_stages}
        if n == int(float(args.ratio_size)):
            duck, users = run_duckdb(raw, work / f"duckdb_{n}.parquet")
            row.update(duckdb_s=duck, duckdb_events_per_s=lines / duck, users=users,
                       ratio=(lines / ebb) / (lines / duck))
        rows.append(row)
        logging.info("%s", row)

    steady = run_steady_state(work, int(float(args.steady_size)), args.history_days) if args.history_days else None

    print("\n== sessionize benchmark (ebbtide: Spark local[2] + delta-rs; DuckDB: 2 threads), same files")
    print(f"{'events':>12} {'ebbtide s':>10} {'ebbtide ev/s':>13} {'us/event':>9} {'jobs/stages':>12} "
          f"{'duckdb s':>9} {'duckdb ev/s':>12} {'ratio':>6}")
    for r in rows:
        duck = (f"{r['duckdb_s']:>9.1f} {r['duckdb_events_per_s']:>12,.0f} {r['ratio']:>6.2f}"
                if "ratio" in r else f"{'':>9} {'':>12} {'':>6}")
        print(f"{r['events']:>12,} {r['ebbtide_s']:>10.1f} {r['ebbtide_events_per_s']:>13,.0f} "
              f"{r['ebbtide_us_per_event']:>9.2f} {r['spark_jobs']!s:>5}/{r['spark_stages']!s:<6} {duck}")
    costs = [r["ebbtide_us_per_event"] for r in rows]
    if len(costs) > 1:
        spread = max(costs) / min(costs) - 1
        print(f"per-event cost spread across sizes: {spread:.0%} (target <= 20%)")
    ratio = next(r["ratio"] for r in rows if "ratio" in r)
    print(f"ebbtide/DuckDB throughput ratio: {ratio:.2f} (target >= 0.5 at 10M, issue #11)")
    if steady:
        print(f"steady state ({steady['events_per_day']:,} events a day): day {steady['history_days'] + 1} into "
              f"{steady['history_days']} days of history took {steady['last_s']:.1f}s vs {steady['first_s']:.1f}s "
              f"for the first day: {steady['ratio']:.2f}x (target <= 1.3x)")
        print(f"Spark jobs / stages: first day {steady['first_jobs']} / {steady['first_stages']}, later days at "
              f"most {steady['later_jobs_max']} / {steady['later_stages_max']} (target <= 25 jobs for a later day)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sessionize.json").write_text(json.dumps({"sizes": rows, "steady_state": steady}, indent=2))
    return 0


def run_steady_state(work: Path, per_day: int, history_days: int) -> dict:
    """history_days days of per_day events, then one more: the last day's cost against the first day's."""
    raw, lines = generate_days(work, per_day, history_days + 1)
    reports = run_ebbtide(raw, work / f"tables_{per_day}x{history_days + 1}", history_days + 1)
    later = reports[1:]
    out = {"events_per_day": lines[-1], "history_days": history_days, "first_s": reports[0].seconds,
           "last_s": reports[-1].seconds, "ratio": reports[-1].seconds / reports[0].seconds,
           "first_jobs": reports[0].spark_jobs, "first_stages": reports[0].spark_stages,
           "later_jobs_max": max((r.spark_jobs or 0) for r in later),
           "later_stages_max": max((r.spark_stages or 0) for r in later),
           "days": [{"seconds": r.seconds, "spark_jobs": r.spark_jobs, "spark_stages": r.spark_stages}
                    for r in reports]}
    logging.info("steady state: %s", out)
    return out


if __name__ == "__main__":
    sys.exit(main())
