"""Feed, distributed training, checkpoints, artifacts and evaluation on a small sessionized dataset."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from ebbtide.artifacts import load_artifact, write_artifact
from ebbtide.config import load_config
from ebbtide.evaluate import BASELINES, EvalSet, evaluate_all, evaluate_model, rank_metrics
from ebbtide.feed import SEQUENCE_COLUMNS, pin_snapshot, read_snapshot_frame, torch_batches, training_reader
from ebbtide.generate import generate
from ebbtide.models import build_model
from ebbtide.sessionize import Sessionizer
from ebbtide.split import SplitPlan, spark_training_events
from ebbtide.storage import open_storage
from ebbtide.tables import table_specs
from ebbtide.train import WorkerArgs, launch, train_models, train_worker

START = dt.date(2026, 11, 1)
LOO = SplitPlan("leave_one_out")


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = load_config("local", {
        "generate.out": str(root / "raw"), "generate.users": 400, "generate.items": 150, "generate.days": 4,
        "generate.start_date": START.isoformat(), "generate.users_per_chunk": 200,
        "generate.sessions_per_user_day": 1.0,
        "sessionize.input": str(root / "raw"), "storage.root": str(root / "tables"), "storage.engine": "rs",
        "storage.user_buckets": 4, "train.output": str(root / "models"), "evaluate.output": str(root / "report"),
        "train.max_len": 30, "train.window_context": 6, "train.dim": 16, "train.batch_size": 32,
        "train.epochs": 2, "train.log_every": 5, "train.reader_workers": 1, "train.shuffle_buffer": 64,
        "train.checkpoint_every": 4})
    generate(cfg.generate, progress=False)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    for i in range(4):
        job.run(START + dt.timedelta(days=i))
    return cfg, storage


def _worker_args(cfg, storage, name, split=LOO, **extra) -> WorkerArgs:
    snap = pin_snapshot(storage, cfg)
    return WorkerArgs(cfg=cfg.model_dump(mode="json"), model_name=name, snapshot=dataclasses.asdict(snap),
                      split=split.as_dict(), n_types=4, item_log_q=None, **extra)


def _windows(snap, rank, world, epoch=0, max_len=30, context=6):
    with training_reader(snap, max_len, rank, world, epoch, 1, LOO, context) as reader:
        return [b for b in torch_batches(reader, 16, 0, seed=0)]


def test_every_training_event_is_a_target_once_per_epoch_and_nothing_else_leaks(pipeline):
    """Windows from both ranks' shards: each is a slice of one user's *training* events, the shards are
    disjoint, and together they make every training event but the first of each history a target exactly once.
    No validation or test event is ever read (the split-leakage test)."""
    cfg, storage = pipeline
    snap = pin_snapshot(storage, cfg)
    frame = read_snapshot_frame(snap, SEQUENCE_COLUMNS)
    by_first, expected = {}, Counter()
    for it, ts in zip(frame["item_idx"], frame["ts"]):
        it, ts = np.asarray(it) + 1, np.asarray(ts, dtype=np.float64)
        end = LOO.train_end(ts)
        for j in range(end):
            by_first.setdefault((int(it[j]), ts[j]), []).append((it, ts, end, j))
        expected.update((int(i), t) for i, t in zip(it[1:end], ts[1:end]))
    for epoch in (0, 1):
        targets, per_rank = Counter(), []
        for rank in range(2):
            rows = set()
            for batch in _windows(snap, rank, 2, epoch):
                mask = batch.target_mask()
                for r in range(len(batch.lengths)):
                    n = int(batch.lengths[r])
                    items, ts = batch.items[r, :n].numpy(), batch.ts[r, :n].numpy()
                    assert any(end - start >= n and np.array_equal(it[start:start + n], items)
                               and np.array_equal(uts[start:start + n], ts)
                               for it, uts, end, start in by_first[(int(items[0]), ts[0])]), \
                        "a window is not a slice of one user's training events"
                    rows.add(hash(ts.tobytes()))
                    targets.update((int(batch.items[r, p + 1]), float(batch.ts[r, p + 1]))
                                   for p in np.nonzero(mask[r].numpy())[0])
            per_rank.append(rows)
        assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1], "shards are disjoint"
        assert targets == expected, f"epoch {epoch}: targets != the training events"


def test_spark_and_python_split_rules_agree(pipeline, spark):
    cfg, storage = pipeline
    snap = pin_snapshot(storage, cfg)
    sequences = storage.read(table_specs(cfg)["user_sequences"], snap.version)
    last = max(max(t) for t in read_snapshot_frame(snap, ["ts"])["ts"])
    temporal = SplitPlan.from_config(cfg.train.model_copy(update={"split": "temporal"}),
                                     dt.datetime.fromtimestamp(last, dt.timezone.utc).date())
    frame = read_snapshot_frame(snap, SEQUENCE_COLUMNS)
    for split in (LOO, temporal):
        python = Counter()
        for it, ts in zip(frame["item_idx"], frame["ts"]):
            end = split.train_end(np.asarray(ts, dtype=np.float64))
            python.update(zip(np.asarray(it[:end]).tolist(), np.asarray(ts[:end]).tolist()))
        rows = spark_training_events(sequences, split).collect()
        assert Counter((r.item_idx, r.ts) for r in rows) == python, split.kind


def test_ddp_ranks_stay_in_lock_step_and_resume_exactly(pipeline, tmp_path):
    """Two processes through TorchDistributor on uneven shards: identical weights on both ranks (same optimizer
    steps, same LR), and a run killed mid-epoch then resumed ends with the weights of the uninterrupted run."""
    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.num_processes, cfg.train.epochs = 2, 2
    args = _worker_args(cfg, storage, "gru", run_dir=str(tmp_path / "full"), record_rows=True)
    full = launch(args, cfg)
    ranks = full["per_rank"]
    assert ranks[0]["rows"] and ranks[1]["rows"] and not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
    assert len(ranks[0]["rows"]) != len(ranks[1]["rows"]), "the fixture should give uneven shards"
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "parameters identical on every rank"
    killed = dataclasses.replace(args, run_dir=str(tmp_path / "killed"), stop_after_steps=full["steps"] // 2 + 1,
                                 record_rows=False)
    assert launch(killed, cfg) == {"killed_at_step": full["steps"] // 2 + 1}
    resumed = launch(dataclasses.replace(killed, stop_after_steps=0), cfg)
    assert resumed["steps"] == full["steps"]
    assert resumed["final_params_checksum"] == pytest.approx(full["final_params_checksum"], rel=1e-12)


def test_killed_run_resumes_to_the_same_weights(pipeline, tmp_path):
    cfg, storage = pipeline
    full = train_worker(dataclasses.asdict(_worker_args(cfg, storage, "decay_transformer",
                                                        run_dir=str(tmp_path / "full"))))
    assert full["steps"] > 6
    killed = _worker_args(cfg, storage, "decay_transformer", run_dir=str(tmp_path / "killed"), stop_after_steps=6)
    assert train_worker(dataclasses.asdict(killed)) == {"killed_at_step": 6}
    resumed = train_worker(dataclasses.asdict(dataclasses.replace(killed, stop_after_steps=0)))
    assert resumed["steps"] == full["steps"]
    assert resumed["final_params_checksum"] == pytest.approx(full["final_params_checksum"], rel=1e-12)


def test_a_briefly_trained_model_beats_popularity_on_structured_data(pipeline, tmp_path):
    """The generator plants per-user tastes and short-lived interests: a model that learns anything must clearly
    beat most_popular on the test split."""
    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs, cfg.train.patience = 8, 8
    summary = train_worker(dataclasses.asdict(_worker_args(cfg, storage, "decay_pool", run_dir=str(tmp_path))))
    model = build_model("decay_pool", pin_snapshot(storage, cfg).n_items, 4, cfg.train.dim, cfg.train.max_len)
    model.load_state_dict(torch.load(summary["model_state_path"], weights_only=True))
    test = EvalSet.build(pin_snapshot(storage, cfg), LOO, "test", cfg.train.max_len)
    learned = evaluate_model(model, test, ks=(10,))["ndcg@10"]
    popular = rank_metrics(BASELINES["most_popular"][0](test), test, ks=(10,))["ndcg@10"]
    assert learned > 1.5 * popular, (learned, popular)


def test_artifact_roundtrip_and_tamper_check(tmp_path):
    model = build_model("decay_transformer", 10, 4, 8, 6, heads=4)
    path = write_artifact(tmp_path, model, {"name": "decay_transformer", "n_items": 10, "n_types": 4, "dim": 8,
                                            "max_len": 6, "options": {"heads": 4}}, {"data_snapshot_version": 3})
    loaded, conf, meta = load_artifact(path)
    assert meta["data_snapshot_version"] == 3 and len(meta["content_hash"]) == 64
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    (path / "config.json").write_text((path / "config.json").read_text().replace('"dim": 8', '"dim": 8 '))
    with pytest.raises(ValueError, match="content hash"):
        load_artifact(path)


def test_train_and_evaluate_end_to_end(pipeline):
    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.models = ["decay_pool", "long_short"]
    artifacts = train_models(cfg, storage)
    assert set(artifacts) == {"decay_pool", "long_short"}
    _, conf, meta = load_artifact(artifacts["decay_pool"])
    assert meta["data_snapshot_version"] == storage.version(table_specs(cfg)["user_sequences"])
    assert meta["decay"]["half_life_days"] > 0 and len(meta["decay"]["part_half_life_days"]) == 3
    assert meta["metrics"]["seconds_to_best"] <= meta["metrics"]["train_seconds"]
    import mlflow  # a dev dependency: training logs each model to the local store beside the artifacts

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) >= 2 and runs["metrics.best_val_ndcg_at_10"].notna().all()
    result = evaluate_all(cfg, storage, artifacts)
    assert set(result["results"]) == set(BASELINES) | {"decay_pool", "long_short"}
    assert result["users"] > 20
    for scores in result["results"].values():
        assert 0 <= scores["ndcg@10"] <= scores["hr@10"] <= 1
    report = Path(result["report"]).read_text()
    assert "| sar |" in report and "ties count against the target" in report and "trained to best" in report
    for png in ("metrics.png", "ndcg_at_k.png", "decay.png"):
        assert (Path(result["report"]).parent / png).stat().st_size > 1000


def test_worker_runs_under_torchrun(pipeline, tmp_path):
    import json
    import subprocess
    import sys

    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.models, cfg.train.epochs = ["gru"], 1
    exported = train_models(cfg, storage, export_worker_args=tmp_path)
    args = json.loads(exported["gru"].read_text())
    args["run_dir"] = str(tmp_path / "run")
    exported["gru"].write_text(json.dumps(args))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
                           "-m", "ebbtide.train", str(exported["gru"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] > 0
