"""Nightly benchmark: a night in which 1% of users have new events (incremental: the rest only rescale their
stored decay state) vs a full recompute of the same night, on copies of the same tables in the same run.
Prints both wall times, their ratio (target <= 0.1) and users/s of the full recompute on local[2].

    python bench/bench_nightly.py [--users 200000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import START, build_tables, dataset_arguments, quiet_logging  # noqa: E402  (same folder, shared fixture data)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(parser)
    args = parser.parse_args()
    quiet_logging()
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from ebbtide.nightly import Nightly
    from ebbtide.sessionize import Sessionizer
    from ebbtide.storage import open_storage
    from ebbtide.train import train_models

    cfg, storage = build_tables(Path(args.work), args.users, args.days)
    spark = storage.spark
    root = Path(cfg.storage.root).parent / "nightly"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(cfg.storage.root, root / "base")
    cfg.storage.root = str(root / "base")
    cfg.train.output = str(root / "models")
    cfg.train.models, cfg.train.max_steps, cfg.train.split = ["decay_pool"], 20, "leave_one_out"
    storage = open_storage(spark, cfg.storage)
    cfg.nightly.model_version = str(train_models(cfg, storage)["decay_pool"])
    last = START + dt.timedelta(days=args.days - 1)
    started = time.perf_counter()
    Nightly(spark, cfg, storage).run(last)
    first_night = time.perf_counter() - started

    # Day last+1: 1% of users come back (their events of the first day, shifted), everyone else idle.
    raw = Path(cfg.sessionize.input)
    nxt = last + dt.timedelta(days=1)
    table = ds.dataset(str(raw / f"date={START}"), format="parquet").to_table()
    pick = pc.equal(pc.utf8_slice_codeunits(table["user_id"], 6, 8), "00")   # u#####00: 1 in 100 users
    back = table.filter(pick)
    shift = pc.add(back["ts"], pa.scalar(dt.timedelta(days=args.days), pa.duration("us")))
    back = back.set_column(back.schema.get_field_index("ts"), "ts", shift)
    out = raw / f"date={nxt}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    pq.write_table(back, out / "part-0.parquet")
    Sessionizer(spark, cfg, storage).run(nxt)
    shutil.copytree(root / "base", root / "full")

    started = time.perf_counter()
    inc = Nightly(spark, cfg, storage).run(nxt)
    incremental_s = time.perf_counter() - started
    full_cfg = cfg.model_copy(deep=True)
    full_cfg.storage.root = str(root / "full")
    full_storage = open_storage(spark, full_cfg.storage)
    started = time.perf_counter()
    full = Nightly(spark, full_cfg, full_storage).run(nxt, full=True)
    full_s = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)

    print(f"\n== nightly benchmark (local[2], {full.active_users:,} active users, top-{cfg.nightly.top_k} of "
          f"{cfg.generate.items:,} items, model decay_pool)")
    print(f"  first night (everyone encoded)          {first_night:8.1f}s")
    print(f"  incremental night ({inc.reencoded:,} re-encoded, {inc.rescaled:,} rescaled) {incremental_s:8.1f}s")
    print(f"  full recompute of the same night        {full_s:8.1f}s  = {full.active_users / full_s:,.0f} users/s")
    print(f"  wall ratio incremental/full: {incremental_s / full_s:.2f} (target <= 0.1)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nightly.json").write_text(
        f'{{"incremental_s": {incremental_s}, "full_s": {full_s}, "active_users": {full.active_users}, '
        f'"reencoded": {inc.reencoded}, "rescaled": {inc.rescaled}, "ratio": {incremental_s / full_s}}}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
