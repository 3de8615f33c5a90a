"""Models, feed, distributed training, checkpoints, artifacts and evaluation on a small sessionized dataset."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
import pytest
import torch
from ebbtide.config import load_config
from ebbtide.evaluate import BASELINES, EvalSet, evaluate_all, rank_metrics
from ebbtide.feed import pin_snapshot, torch_batches, training_reader
from ebbtide.generate import generate
from ebbtide.models import MODELS, Batch, build_model
from ebbtide.models.base import DAY_SECONDS
from ebbtide.sessionize import Sessionizer
from ebbtide.storage import open_storage
from ebbtide.train import (
    SplitPlan,
    WorkerArgs,
    launch,
    load_artifact,
    next_item_loss,
    train_models,
    train_worker,
    write_artifact,
)

START = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = load_config("local", {
        "generate.out": str(root / "raw"), "generate.users": 400, "generate.items": 150, "generate.days": 4,
        "generate.start_date": START.isoformat(), "generate.users_per_chunk": 200,
        "generate.sessions_per_user_day": 1.0,
        "sessionize.input": str(root / "raw"), "storage.root": str(root / "tables"), "storage.engine": "rs",
        "storage.user_buckets": 4, "train.output": str(root / "models"), "evaluate.output": str(root / "report"),
        "train.max_len": 30, "train.dim": 16, "train.batch_size": 32, "train.epochs": 2, "train.log_every": 5,
        "train.reader_workers": 1, "train.shuffle_buffer": 64, "train.checkpoint_every": 4})
    generate(cfg.generate, progress=False)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    for i in range(4):
        job.run(START + dt.timedelta(days=i))
    return cfg, storage


def _toy_batch(n_items=20, batch=3, length=6, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (batch, length), generator=g)
    lengths = torch.tensor([length, length - 2, 2][:batch])
    items[1, length - 2:] = 0
    items[2, 2:] = 0
    ts = torch.cumsum(torch.rand(batch, length, generator=g, dtype=torch.float64) * DAY_SECONDS, dim=1)
    return Batch(items, ts, torch.randint(0, 4, (batch, length), generator=g), torch.zeros(batch, length, dtype=torch.long),
                 lengths)


@pytest.mark.parametrize("name", MODELS)
def test_models_share_one_interface(name):
    torch.manual_seed(0)
    model = build_model(name, n_items=20, n_types=4, dim=8, max_len=6).eval()
    batch = _toy_batch()
    now = batch.ts.max(dim=1).values + 3600
    user = model.encode(batch, now)
    assert user.shape == (3, 8) and torch.isfinite(user).all()
    assert model.score(user).shape == (3, 20)
    assert model.item_embeddings().shape == (20, 8)
    week_later = model.encode(batch, now + 7 * DAY_SECONDS)
    assert not torch.allclose(user, week_later), "the query time must change the embedding"
    # causal: position 2 must not see events 3.. of the same row
    positions = model(batch, batch.ts)
    changed = dataclasses.replace(batch, items=batch.items.clone())
    changed.items[0, 4] = (changed.items[0, 4] % 20) + 1
    assert torch.allclose(positions[0, :4], model(changed, batch.ts)[0, :4], atol=1e-5)


def test_decay_pool_reports_half_lives_in_days():
    model = build_model("decay_pool", 10, 4, 8, 6)
    report = model.decay_report()
    assert [round(h, 3) for h in report["half_life_days"]] == [0.1, 1.0, 10.0]
    assert math.isclose(sum(report["mix"]), 1.0, rel_tol=1e-6)


def test_full_and_sampled_softmax_losses():
    model = build_model("gru", 20, 4, 8, 6)
    batch = _toy_batch()
    full, n = next_item_loss(model, batch, full_softmax=True, log_q=None)
    sampled, _ = next_item_loss(model, batch, full_softmax=False, log_q=torch.log(torch.full((20,), 1 / 20)))
    assert n == int((batch.items[:, 1:] > 0).sum()) and torch.isfinite(full) and torch.isfinite(sampled)
    sampled.backward()
    assert model.item_emb.weight.grad is not None


def test_feed_reads_the_pinned_snapshot_and_shards_disjointly(pipeline):
    cfg, storage = pipeline
    snap = pin_snapshot(storage, cfg)
    from ebbtide.tables import table_specs

    spec = table_specs(cfg)["user_sequences"]
    assert {f.split("/")[-1] for f in snap.files} == {f.path.split("/")[-1] for f in storage.active_files(spec)}
    shards = []
    for rank in range(2):
        with training_reader(snap, 30, rank, 2, epoch=0, seed=1, before=None, drop_last=0, workers=1) as reader:
            rows = [hash(r.tobytes()) for b in torch_batches(reader, 16, 0, seed=0) for r in b.ts.numpy()]
        shards.append(rows)
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    total = storage.read(spec, snap.version).where("size(ts) >= 2").count()
    assert len(shards[0]) + len(shards[1]) == total


def _worker_args(cfg, storage, name, **extra) -> tuple[WorkerArgs, object]:
    snap = pin_snapshot(storage, cfg)
    split = SplitPlan.from_config(cfg, START + dt.timedelta(days=3))
    return WorkerArgs(cfg=cfg.model_dump(mode="json"), model_name=name, snapshot=dataclasses.asdict(snap),
                      split=split.as_dict(), n_types=4, item_log_q=None, **extra), snap


def test_ddp_two_processes_through_torch_distributor(pipeline, tmp_path):
    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.num_processes = 2
    cfg.train.epochs = 2
    args, _ = _worker_args(cfg, storage, "decay_pool", run_dir=str(tmp_path / "ddp"), record_rows=True)
    summary = launch(args, cfg)
    ranks = summary["per_rank"]
    assert summary["world_size"] == 2 and len(ranks) == 2
    assert ranks[0]["rows"] and ranks[1]["rows"], "each rank read a shard"
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"]), "shards are disjoint"
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9), "parameters equal on all ranks"
    losses = ranks[0]["losses"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), "loss falls"


def test_killed_run_resumes_to_the_same_weights(pipeline, tmp_path):
    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = 2
    full_args, _ = _worker_args(cfg, storage, "gru", run_dir=str(tmp_path / "full"))
    full = train_worker(dataclasses.asdict(full_args))
    assert full["steps"] > 6
    killed_args, _ = _worker_args(cfg, storage, "gru", run_dir=str(tmp_path / "killed"), stop_after_steps=6)
    assert train_worker(dataclasses.asdict(killed_args)) == {"killed_at_step": 6}
    resumed = train_worker(dataclasses.asdict(dataclasses.replace(killed_args, stop_after_steps=0)))
    assert resumed["steps"] == full["steps"]
    assert resumed["final_params_checksum"] == pytest.approx(full["final_params_checksum"], rel=1e-9)


def test_artifact_roundtrip_and_tamper_check(tmp_path):
    model = build_model("decay_transformer", 10, 4, 8, 6)
    path = write_artifact(tmp_path, model, {"name": "decay_transformer", "n_items": 10, "n_types": 4, "dim": 8,
                                            "max_len": 6}, {"data_snapshot_version": 3})
    loaded, conf, meta = load_artifact(path)
    assert meta["data_snapshot_version"] == 3 and len(meta["content_hash"]) == 64
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    (path / "config.json").write_text((path / "config.json").read_text().replace('"dim": 8', '"dim": 8 '))
    with pytest.raises(ValueError, match="content hash"):
        load_artifact(path)


def test_rank_metrics_on_known_ranks():
    n_items = 5
    eval_set = EvalSet(batch=None, t_query=torch.zeros(3), targets=np.array([0, 1, 2]),
                       seen=[np.array([4]), np.array([], dtype=np.int64), np.array([], dtype=np.int64)],
                       full=None, train=None, n_items=n_items)
    scores = torch.tensor([[5.0, 1, 1, 1, 9],     # target 0 ranks first once item 4 (seen) is masked
                           [5.0, 4, 1, 1, 1],     # target 1 ranks second
                           [1.0, 2, 0, 3, 4]])    # target 2 ranks last (5th)
    m = rank_metrics([(0, scores)], eval_set, ks=(1, 2), exclude_seen=True)
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["mrr@2"] == pytest.approx((1 + 0.5) / 3)


def test_train_and_evaluate_end_to_end(pipeline):
    cfg, storage = pipeline
    cfg = cfg.model_copy(deep=True)
    cfg.train.models = ["decay_pool", "long_short"]
    artifacts = train_models(cfg, storage)
    assert set(artifacts) == {"decay_pool", "long_short"}
    _, _, meta = load_artifact(artifacts["decay_pool"])
    assert meta["data_snapshot_version"] == storage.version(__import__("ebbtide.tables", fromlist=["x"])
                                                            .table_specs(cfg)["user_sequences"])
    assert len(meta["decay"]["half_life_days"]) == 3
    import mlflow  # a dev dependency: training logs each model to the local store beside the artifacts

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) >= 2 and runs["metrics.best_val_ndcg_at_10"].notna().all()
    result = evaluate_all(cfg, storage, artifacts)
    assert set(result["results"]) == set(BASELINES) | {"decay_pool", "long_short"}
    assert result["users"] > 20
    for scores in result["results"].values():
        assert 0 <= scores["ndcg@10"] <= scores["hr@10"] <= 1
    from pathlib import Path

    report = Path(result["report"])
    assert report.exists() and "| sar |" in report.read_text()
    for png in ("metrics.png", "ndcg_at_k.png", "decay.png"):
        assert (report.parent / png).stat().st_size > 1000


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
