"""Training-side benchmark: the petastorm feed vs plain pyarrow on the same pinned files, and model training
throughput (sequences/s) on this machine's CPU (or a GPU where there is one).

Both loaders read the active files of the same user_sequences snapshot and apply the same padding transform;
the ratio petastorm/pyarrow is the feed's overhead (target >= 0.8).

    python bench/bench_train.py [--users 200000] [--steps 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START = dt.date(2026, 11, 1)


def build_tables(work: Path, users: int, days: int):
    from ebbtide.config import load_config
    from ebbtide.generate import generate
    from ebbtide.sessionize import Sessionizer
    from ebbtide.spark import get_spark
    from ebbtide.storage import open_storage

    root = work / f"train_{users}"
    cfg = load_config("local", {
        "spark.master": "local[2]", "spark.ui_enabled": False, "spark.driver_memory": "6g",
        "generate.out": str(root / "raw"), "generate.format": "parquet", "generate.users": users,
        "generate.items": 20_000, "generate.days": days, "generate.start_date": START.isoformat(),
        "generate.users_per_chunk": 50_000, "sessionize.input": str(root / "raw"),
        "sessionize.format": "parquet", "storage.root": str(root / "tables"), "storage.user_buckets": 16,
        "train.max_len": 50, "train.full_softmax_max_items": 5000})
    spark = get_spark(cfg.spark)
    storage = open_storage(spark, cfg.storage)
    done = root / "_sessionized"
    if not done.exists():
        generate(cfg.generate, progress=False)
        job = Sessionizer(spark, cfg, storage)
        for i in range(days):
            job.run(START + dt.timedelta(days=i))
        done.write_text("ok")
    return cfg, storage


def loader_throughput(snapshot, max_len: int, batch_size: int, workers: int, repeats: int = 2) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from ebbtide.feed import SEQUENCE_COLUMNS, torch_batches, training_reader, training_windows
    from ebbtide.split import SplitPlan

    split, context = SplitPlan("leave_one_out"), max_len // 4

    def run_petastorm() -> int:
        n = 0
        with training_reader(snapshot, max_len, 0, 1, 0, 1, split, context, workers=workers) as reader:
            for batch in torch_batches(reader, batch_size, shuffle_buffer=0, seed=0):
                n += len(batch.lengths)
        return n

    def run_pyarrow() -> int:
        n = 0
        for uri in snapshot.files:
            f = pq.ParquetFile(uri[len("file://"):] if uri.startswith("file://") else uri)
            for record_batch in f.iter_batches(batch_size=batch_size, columns=SEQUENCE_COLUMNS):
                padded = training_windows(record_batch.to_pandas(), max_len, split, context, seed=1)
                tensors = {c: torch.from_numpy(np.stack(padded[c].values)) for c in ("items", "ts", "types", "sessions")}
                n += len(tensors["items"])
        return n

    out = {}
    for name, fn in (("pyarrow", run_pyarrow), ("petastorm", run_petastorm)):
        best = None
        for _ in range(repeats):
            started = time.perf_counter()
            rows = fn()
            elapsed = time.perf_counter() - started
            best = elapsed if best is None else min(best, elapsed)
        out[name] = {"sequences": rows, "seconds": best, "sequences_per_s": rows / best}
    out["ratio_petastorm_over_pyarrow"] = out["petastorm"]["sequences_per_s"] / out["pyarrow"]["sequences_per_s"]
    return out


def training_throughput(cfg, storage, steps: int) -> dict:
    import dataclasses

    from ebbtide.feed import pin_snapshot
    from ebbtide.split import SplitPlan
    from ebbtide.train import WorkerArgs, item_log_q, train_worker

    snap = pin_snapshot(storage, cfg)
    split = SplitPlan("leave_one_out")
    # A 20k-item catalog: sampled softmax with log-Q (what a large catalog uses), as configured below.
    log_q = item_log_q(storage, cfg, snap, split) if snap.n_items > cfg.train.full_softmax_max_items else None
    out = {}
    for name in ("decay_pool", "gru", "decay_transformer", "long_short"):
        c = cfg.model_copy(deep=True)
        c.train.max_steps, c.train.epochs, c.train.resume = steps, 1, False
        args = WorkerArgs(cfg=c.model_dump(mode="json"), model_name=name, snapshot=dataclasses.asdict(snap),
                          split=split.as_dict(), n_types=4, item_log_q=log_q,
                          run_dir=f"/tmp/ebbtide-bench/run-{name}-{os.getpid()}")
        summary = train_worker(dataclasses.asdict(args))
        rate = summary["steps"] * c.train.batch_size / max(summary["train_seconds"], 1e-9)
        out[name] = {"steps": summary["steps"], "windows_per_s": rate, "device": summary["device"]}
        logging.info("%s: %.0f windows/s on %s", name, rate, summary["device"])
    return out


def dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared benchmark data set (also used by bench_nightly.py)."""
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--work", default=os.environ.get("EBBTIDE_BENCH_DIR", "/tmp/ebbtide-bench"))


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "petastorm", "ebbtide.storage", "ebbtide.sessionize", "ebbtide.train", "ebbtide.evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(parser)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    quiet_logging()
    cfg, storage = build_tables(Path(args.work), args.users, args.days)
    cfg.train.batch_size = args.batch_size
    from ebbtide.feed import pin_snapshot

    snap = pin_snapshot(storage, cfg)
    loader = loader_throughput(snap, cfg.train.max_len, args.batch_size, cfg.train.reader_workers)
    training = training_throughput(cfg, storage, args.steps)
    print(f"\n== loader: user_sequences v{snap.version}, {len(snap.files)} files, {snap.row_groups()} row groups, "
          f"max_len {cfg.train.max_len}, batch {args.batch_size}")
    for name in ("pyarrow", "petastorm"):
        r = loader[name]
        print(f"  {name:<10} {r['sequences']:>9,} sequences in {r['seconds']:.2f}s = {r['sequences_per_s']:>10,.0f} seq/s")
    print(f"  ratio petastorm/pyarrow: {loader['ratio_petastorm_over_pyarrow']:.2f} (target >= 0.8)")
    loss = "full softmax" if snap.n_items <= cfg.train.full_softmax_max_items else "sampled softmax (in-batch, log-Q)"
    print(f"== training throughput ({args.steps} steps, batch {args.batch_size}, dim {cfg.train.dim}, "
          f"{snap.n_items:,} items, {loss})")
    for name, r in training.items():
        print(f"  {name:<18} {r['windows_per_s']:>8,.0f} windows/s on {r['device']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps({"loader": loader, "training": training}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
