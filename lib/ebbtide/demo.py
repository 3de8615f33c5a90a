"""`make demo`: generate several days of logs (bad records, duplicates, late events) and sessionize them day by
day into Delta tables on the embedded engine, printing the reconciliation and per-table row counts."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import sys
from pathlib import Path

from ebbtide.cli import configure_logging, open_pipeline, table_summary
from ebbtide.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebbtide-demo", description=__doc__)
    parser.add_argument("--conf", default="local")
    parser.add_argument("--out", default="data/demo", help="demo folder (wiped first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    configure_logging(False)
    logging.getLogger("ebbtide").setLevel(logging.WARNING)  # the demo prints its own summary lines
    out = Path(args.out).resolve()
    cfg = load_config(args.conf, [f"generate.out={out / 'raw'}", f"sessionize.input={out / 'raw'}",
                                  f"sessionize.format={'json'}", f"storage.root={out / 'tables'}",
                                  f"train.output={out / 'models'}", f"evaluate.output={out / 'report'}",
                                  # the demo serves its newest model and scores idle nights after the last day
                                  # on purpose; production follows `ebbtide promote` and refuses missing data
                                  "nightly.follow=latest", "nightly.require_fresh=false",
                                  *args.overrides])
    shutil.rmtree(out, ignore_errors=True)

    from ebbtide.generate import generate
    from ebbtide.sessionize import Sessionizer
    from ebbtide.tables import table_specs

    g = cfg.generate
    truth = generate(g)
    print(f"\n== generated {truth['total_events']:,} events, {g.users:,} users, {g.items:,} items, {g.days} days "
          f"(planted interest half-life {g.interest_half_life_days} days) into {g.out}")
    spark, storage = open_pipeline(cfg)
    job = Sessionizer(spark, cfg, storage)
    print("\n== sessionize, day by day (read = kept + quarantined + duplicates)")
    for i in range(g.days):
        report = job.run(g.start_date + dt.timedelta(days=i))
        print(report.line())
    print(f"\n== tables ({storage.engine} engine) under {cfg.storage.root}")
    for t in table_summary(cfg, storage):
        if not t["exists"]:       # the nightly's outputs appear with its first night
            continue
        print(f"  {t['table']:<18} version {t['version']:<3} {t['rows']:>10,} rows  {t['files']:>4} files  "
              f"protocol {tuple(t['protocol'])}")
    specs = table_specs(cfg)
    seq = storage.read(specs["user_sequences"]).orderBy("n_events", ascending=False).first()
    print(f"\n== sample user {seq.user_id}: {seq.n_events} events, {max(seq.session_idx) + 1} sessions in the "
          f"last {len(seq.ts)} events, from {seq.first_ts:%Y-%m-%d %H:%M} to {seq.last_ts:%Y-%m-%d %H:%M} UTC")
    sessions = storage.read(specs["sessions"]).where(f"user_id = '{seq.user_id}'").orderBy("start_ts").collect()
    for s in sessions[-3:]:
        print(f"  session {s.session_id[:10]}.. {s.start_ts:%m-%d %H:%M}-{s.end_ts:%H:%M}  {s.n_events:>3} events  "
              f"items {', '.join(s.item_ids[:6])}{' ...' if len(s.item_ids) > 6 else ''}")
    q = storage.read(specs["quarantine"]).first()
    if q is not None:
        print(f"\n== a quarantined record ({q.reason}): {q.message}\n  raw: {q.raw[:120]}")

    from ebbtide.evaluate import evaluate_all
    from ebbtide.train import train_models

    print(f"\n== train {', '.join(cfg.train.models)} (CPU, {cfg.train.epochs} epochs max, "
          f"{cfg.train.num_processes} process(es))")
    artifacts = train_models(cfg, storage)
    result = evaluate_all(cfg, storage, artifacts)
    print(f"\n== evaluation on the test split ({result['users']:,} users, full ranking) -> {result['report']}")
    ks = cfg.evaluate.ks
    print(f"  {'scorer':<24}" + "".join(f"{f'HR@{k}':>9}{f'NDCG@{k}':>9}{f'MRR@{k}':>9}" for k in ks))
    for name, r in result["results"].items():
        print(f"  {name:<24}" + "".join(f"{r[f'hr@{k}']:>9.4f}{r[f'ndcg@{k}']:>9.4f}{r[f'mrr@{k}']:>9.4f}"
                                        for k in ks))
    print(f"  planted half-life {g.interest_half_life_days} days; reported (decaying part of each kernel): "
          + "; ".join(f"{n} {d['half_life_days']:.3g} d" for n, d in result["decay"].items() if d))
    print("  " + best_model_line(result["results"]))

    from ebbtide.nightly import Nightly

    nightly = Nightly(spark, cfg, storage)
    last_day = g.start_date + dt.timedelta(days=g.days - 1)
    nights = [last_day + dt.timedelta(days=i) for i in range(4)]
    print(f"\n== nightly {cfg.nightly.model}: {nights[0]} (full encode), then {len(nights) - 1} idle nights "
          "(decay states rescaled, no re-encoding)")
    user = seq.user_id
    parts = (result["decay"].get(cfg.nightly.model) or {}).get("part_half_life_days")
    timescales = "long-term, " + ", ".join(f"{h:.2f}d" for h in parts) if parts else "n/a"
    for night in nights:
        print("  " + nightly.run(night).line())
        row = storage.read(specs["user_interest"]).where(f"user_id = '{user}'").first()
        recs = storage.read(specs["user_recommendations"], where={"as_of": [night]}) \
            .where(f"user_id = '{user}'").orderBy("rank").limit(5).collect()
        masses = ", ".join(f"{m:.3f}" for m in row.decay_mass) if row.decay_mass else "n/a"
        print(f"    {user} as of {night}: interest mass per timescale ({timescales})"
              f" = [{masses}], |u| = {row.norm:.3f}; top items: {', '.join(r.item_id for r in recs)}")
    return 0


def best_model_line(results: dict) -> str:
    """The model best on validation against the strongest baseline, on test NDCG@10."""
    models = {n: r for n, r in results.items() if r.get("training")}
    baselines = {n: r for n, r in results.items() if not r.get("training")}
    best = max(models, key=lambda n: models[n]["training"]["best_val_ndcg@10"])
    rival = max(baselines, key=lambda n: baselines[n]["ndcg@10"])
    ratio = models[best]["ndcg@10"] / max(baselines[rival]["ndcg@10"], 1e-12)
    return (f"best model on validation: {best}, test NDCG@10 {models[best]['ndcg@10']:.4f} = {ratio:.2f}x the "
            f"strongest baseline ({rival}, {baselines[rival]['ndcg@10']:.4f})")


if __name__ == "__main__":
    sys.exit(main())
