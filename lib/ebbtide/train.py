"""Distributed training of the interest models: petastorm feed -> DDP (gloo on CPU, NCCL on GPU).

`train_models` pins the data snapshot and launches `train_worker` on every rank, through TorchDistributor
(local mode on one machine, barrier mode on a cluster) when num_processes > 1, or directly in-process. The worker
also runs under `torchrun` (python -m ebbtide.train ...): it reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment either way.

Objective: next-item prediction at every target of every training window (feed.py), each position queried at
the time of the event it predicts. Full softmax for small catalogs; sampled softmax with log-Q correction over
the batch's distinct targets above `train.full_softmax_max_items`.

Ranks run in lock-step: every rank takes every optimizer step, a rank whose shard ran out takes part with no
targets, and the loss is the mean over all ranks' targets (not a mean of per-rank means). So weights, Adam
state and learning rate stay identical across ranks, and a resumed run replays the interrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from ebbtide.artifacts import write_artifact
from ebbtide.config import Config, TrainConf
from ebbtide.feed import Snapshot, torch_batches, training_reader, window_fingerprints
from ebbtide.models import InterestModel, build_model
from ebbtide.models.base import Batch
from ebbtide.split import HOLDOUT, SplitPlan

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------
# Loss and optimizer
# ------------------------------------------------------------------------------------------------------
def next_item_loss(model, batch: Batch, full_softmax: bool, log_q: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of predicting each target from the events before it, queried at the target's
    time, and the number of targets. A batch without targets gives 0 (still connected to every parameter)."""
    t_next = torch.cat([batch.ts[:, 1:], batch.ts[:, -1:]], dim=1)
    valid = batch.target_mask()
    users = model(batch, t_next)[:, :-1][valid]                      # (n, d); DDP-aware forward
    targets = batch.items[:, 1:][valid] - 1
    inner = getattr(model, "module", model)
    if full_softmax:
        return F.cross_entropy((users @ inner.item_embeddings().T).float(), targets, reduction="sum"), len(targets)
    # Sampled softmax over the batch's distinct targets. Subtracting the log of each candidate's chance to be in
    # the candidate set corrects the popularity bias of in-batch sampling: with n draws of probability q an item
    # is among the distinct candidates with probability 1 - (1 - q)^n, not q.
    candidates, label = torch.unique(targets, return_inverse=True)
    logits = (users @ inner.item_emb(candidates + 1).T).float()
    if log_q is not None:
        inclusion = -torch.expm1(len(targets) * torch.log1p(-log_q[candidates].exp()))
        logits = logits - torch.log(inclusion.clamp(min=1e-30))
    return F.cross_entropy(logits, label, reduction="sum"), len(targets)


TIME_SCALE_PARAMETERS = ("log_tau", "mix_logits", "log_pseudo_count", "log_rate", "log_order", "type_weight")


def param_groups(model: InterestModel, t: TrainConf) -> list[dict]:
    """Weight decay on dense layers only: embeddings (most rows see few updates), biases, norms and the time-scale
    scalars are not shrunk. The time-scale scalars move on a log scale and get a larger learning rate."""
    groups: dict[str, list] = {"decayed": [], "plain": [], "time": []}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in TIME_SCALE_PARAMETERS:
            groups["time"].append(p)
        elif p.dim() >= 2 and "emb" not in name:
            groups["decayed"].append(p)
        else:
            groups["plain"].append(p)
    return [{"params": groups["decayed"], "weight_decay": t.weight_decay},
            {"params": groups["plain"], "weight_decay": 0.0},
            {"params": groups["time"], "weight_decay": 0.0, "lr": t.lr * t.decay_lr_multiplier}]


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return factor


# ------------------------------------------------------------------------------------------------------
# The per-rank worker
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WorkerArgs:
    cfg: dict
    model_name: str
    snapshot: dict
    split: dict
    n_types: int
    item_log_q: list[float] | None
    run_dir: str
    stop_after_steps: int = 0        # tests: simulate a killed run after this many steps
    record_rows: bool = False        # tests: report a fingerprint of every sequence each rank read


@dataclasses.dataclass
class Run:
    """What a rank sets up once: model, optimizer, data and the evaluation set."""

    args: WorkerArgs
    cfg: Config
    t: TrainConf                      # this model's training settings
    rank: int
    world: int
    device: torch.device
    model: InterestModel
    ddp: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    snapshot: Snapshot
    split: SplitPlan
    full_softmax: bool
    log_q: torch.Tensor | None
    val_set: Any
    run_dir: Path
    total_steps: int


@dataclasses.dataclass
class Progress:
    """Where training stands: what a checkpoint carries besides weights, optimizer and RNG states."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best: float = -1.0
    best_epoch: int = -1
    train_seconds: float = 0.0        # time in the data loop only (validation excluded)
    seconds_to_best: float = 0.0      # train_seconds when the best validation epoch ended
    history: list = dataclasses.field(default_factory=list)
    stop: bool = False


def train_worker(args_dict: dict) -> dict:
    """Runs on every rank; returns the training summary (rank 0's is the one callers use)."""
    run = setup(WorkerArgs(**args_dict))
    state = resume(run)
    seen: list[str] = []
    while state.epoch < run.t.epochs and not state.stop:
        if not train_epoch(run, state, seen):
            return {"killed_at_step": state.step}
        validate(run, state)
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        checkpoint(run, state)
    return finish(run, state, seen)


def setup(args: WorkerArgs) -> Run:
    from torch.nn.parallel import DistributedDataParallel

    from ebbtide.evaluate import EvalSet

    cfg = Config.model_validate(args.cfg)
    t, options = cfg.train.for_model(args.model_name)
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() and (t.use_gpu or os.environ.get("EBBTIDE_FORCE_CUDA") == "1")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")

    snapshot = Snapshot(**{**args.snapshot, "files": tuple(args.snapshot["files"])})
    split = SplitPlan.from_dict(args.split)
    torch.manual_seed(t.seed)                   # identical initial weights on every rank
    model = build_model(args.model_name, snapshot.n_items, args.n_types, t.dim, t.max_len, **options).to(device)
    torch.manual_seed(t.seed + 1 + rank)        # then each rank its own dropout stream
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None) if world > 1 else model
    optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr)
    total_steps = t.max_steps or t.epochs * estimate_steps_per_epoch(snapshot, split, t, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total_steps))
    log_q = torch.tensor(args.item_log_q, device=device) if args.item_log_q else None
    val_set = (EvalSet.build(snapshot, split, "val", t.max_len, novel_only=cfg.evaluate.exclude_seen)
               if rank == 0 else None)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Run(args, cfg, t, rank, world, device, model, ddp, optimizer, scheduler, snapshot, split,
               snapshot.n_items <= t.full_softmax_max_items, log_q, val_set, run_dir, total_steps)


def estimate_steps_per_epoch(snapshot: Snapshot, split: SplitPlan, t: TrainConf, world: int) -> int:
    """Steps per epoch from the Parquet footers (users, events): only the LR schedule's length depends on it.
    With a temporal split the footers cannot tell training events from later ones, so it over-counts by the
    validation and test events (the cosine then ends a little above its floor)."""
    users, events = snapshot.totals()
    targets = max(0, events - users * (1 + HOLDOUT[split.kind]))
    windows = users + targets / (t.max_len - 1 - t.window_context)
    return max(1, math.ceil(windows / world / t.batch_size))


def train_epoch(run: Run, state: Progress, seen: list[str]) -> bool:
    """One pass over this rank's shard, in lock-step with the other ranks. False if stopped by a test kill."""
    t = run.t
    reader = training_reader(run.snapshot, t.max_len, run.rank, run.world, state.epoch, t.seed, run.split,
                             t.window_context, workers=t.reader_workers, pool=t.reader_pool)
    run.model.train()
    started = time.perf_counter()
    with reader:
        batches = torch_batches(reader, t.batch_size, t.shuffle_buffer, seed=t.seed + 1000 * state.epoch + run.rank)
        for i, (batch, global_targets) in enumerate(lockstep(batches, run)):
            if i < state.batches_in_epoch:       # a resumed epoch: replay up to the checkpoint
                continue
            if run.args.record_rows and batch is not None:
                seen += window_fingerprints(batch)
            loss = train_step(run, batch, global_targets)
            state.step, state.batches_in_epoch = state.step + 1, state.batches_in_epoch + 1
            log_progress(run, state, loss, started)
            if state.step % t.checkpoint_every == 0:
                checkpoint(run, state, time.perf_counter() - started)
            if run.args.stop_after_steps and state.step >= run.args.stop_after_steps:
                return False
            if t.max_steps and state.step >= t.max_steps:
                state.stop = True
                break
    state.train_seconds += time.perf_counter() - started
    return True


def lockstep(batches, run: Run):
    """Yields (batch or None, targets over all ranks) while any rank still has a batch."""
    for batch in _with_sentinel(batches):
        mine = 0 if batch is None else int(batch.target_mask().sum())
        if run.world > 1:
            flags = torch.tensor([0 if batch is None else 1, mine], dtype=torch.float64, device=run.device)
            torch_dist.all_reduce(flags)
            has_data, total = int(flags[0].item()), int(flags[1].item())
        else:
            has_data, total = int(batch is not None), mine
        if not has_data:
            return
        yield batch, total


def _with_sentinel(batches):
    yield from batches
    while True:
        yield None


def train_step(run: Run, batch: Batch | None, global_targets: int) -> float:
    """One optimizer step on every rank. The summed loss is scaled by world / global targets because DDP averages
    gradients over ranks: the result is the gradient of the mean loss over all ranks' targets."""
    batch = (batch if batch is not None else idle_batch(run)).to(run.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with autocast:
        loss_sum, _ = next_item_loss(run.ddp, batch, run.full_softmax, run.log_q)
    run.optimizer.zero_grad(set_to_none=True)
    (loss_sum * run.world / max(global_targets, 1)).backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.t.clip_norm)
    run.optimizer.step()
    run.scheduler.step()
    return float(loss_sum.detach()) / max(global_targets, 1) * run.world


def idle_batch(run: Run) -> Batch:
    """A one-row, all-padding batch with no targets: how a rank without data takes part in a step."""
    zeros = torch.zeros((1, run.t.max_len), dtype=torch.long)
    return Batch(zeros, zeros.double(), zeros, zeros, torch.ones(1, dtype=torch.long))


def validate(run: Run, state: Progress) -> None:
    """Rank 0 scores the validation split (NDCG@10, full ranking); every rank learns whether to stop."""
    from ebbtide.evaluate import evaluate_model

    if run.rank == 0:
        metrics = evaluate_model(run.model, run.val_set, ks=(10,), exclude_seen=run.cfg.evaluate.exclude_seen,
                                 device=run.device)
        state.history.append({"epoch": state.epoch, "step": state.step, "train_seconds": state.train_seconds,
                              **metrics})
        log.info("%s epoch %d: val %s (%.0fs of training)", run.args.model_name, state.epoch,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), state.train_seconds)
        if metrics["ndcg@10"] > state.best:
            state.best, state.best_epoch, state.seconds_to_best = metrics["ndcg@10"], state.epoch, state.train_seconds
            torch.save(run.model.state_dict(), run.run_dir / "best.pt")
        state.stop = state.stop or state.epoch - state.best_epoch >= run.t.patience
    state.stop = _broadcast_flag(state.stop, run)


def log_progress(run: Run, state: Progress, loss: float, started: float) -> None:
    if run.rank == 0 and state.step % run.t.log_every == 0:
        elapsed = state.train_seconds + time.perf_counter() - started
        log.info("%s epoch %d step %d/%d loss %.4f lr %.2e (%.0fs)", run.args.model_name, state.epoch, state.step,
                 run.total_steps, loss, run.scheduler.get_last_lr()[0], elapsed)


# ------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint(run: Run, state: Progress, seconds_in_epoch: float = 0.0) -> None:
    """Every rank reaches each step together (lock-step), so this may gather: rank 0 writes model, optimizer,
    scheduler, progress and every rank's RNG state, atomically (a kill mid-write keeps the previous file)."""
    rng = [None] * run.world
    if run.world > 1:
        torch_dist.all_gather_object(rng, _rng_state())
    else:
        rng = [_rng_state()]
    if run.rank == 0:
        progress = dataclasses.asdict(state)
        progress["train_seconds"] += seconds_in_epoch
        path = run.run_dir / "last.pt"
        torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "progress": progress, "rng": rng,
                    "world": run.world}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)


def resume(run: Run) -> Progress:
    path = run.run_dir / "last.pt"
    if not run.t.resume or not path.exists():
        return Progress()
    saved = torch.load(path, map_location="cpu", weights_only=False)   # our own file: it holds RNG states
    if saved["world"] != run.world:
        log.warning("checkpoint %s was written by %d rank(s), this run has %d: starting over", path,
                    saved["world"], run.world)
        return Progress()
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"][run.rank])
    state = Progress(**saved["progress"])
    if run.rank == 0:
        log.info("resumed %s from %s: epoch %d, step %d (%d batches into the epoch)", run.args.model_name, path,
                 state.epoch, state.step, state.batches_in_epoch)
    return state


def _broadcast_flag(flag: bool, run: Run) -> bool:
    if run.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=run.device)
    torch_dist.broadcast(value, src=0)
    return bool(value.item())


def finish(run: Run, state: Progress, seen: list[str]) -> dict:
    checksum = float(sum(p.detach().double().sum() for p in run.model.parameters()))
    summary = {"rank": run.rank, "world_size": run.world, "steps": state.step, "epochs": state.epoch,
               "best_val_ndcg@10": state.best, "best_epoch": state.best_epoch, "history": state.history,
               "train_seconds": state.train_seconds, "seconds_to_best": state.seconds_to_best,
               "device": str(run.device), "final_params_checksum": checksum}
    mine = {"checksum": checksum, "rows": seen}
    if run.world > 1:              # every rank reaches this point: gather what each one saw, for the caller
        gathered: list = [None] * run.world
        torch_dist.all_gather_object(gathered, mine)
        summary["per_rank"] = gathered
    elif run.args.record_rows:
        summary["per_rank"] = [mine]
    if run.rank == 0 and (run.run_dir / "best.pt").exists():
        summary["model_state_path"] = str(run.run_dir / "best.pt")
    if run.world > 1:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return summary


# ------------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------------
def item_log_q(storage, cfg: Config, snapshot: Snapshot, split: SplitPlan) -> list[float]:
    """log of each item's share of the *training* events of the snapshot (validation and test events never
    count): the sampling probability of in-batch candidates. Counted with Spark from the pinned snapshot."""
    from pyspark.sql import functions as F

    from ebbtide.split import spark_training_events
    from ebbtide.tables import table_specs

    sequences = storage.read(table_specs(cfg)["user_sequences"], snapshot.version)
    counts = np.ones(snapshot.n_items)          # +1 smoothing: every item can be a candidate
    rows = spark_training_events(sequences, split).groupBy("item_idx").agg(F.count("*").alias("n")).collect()
    for row in rows:
        if row.item_idx < snapshot.n_items:
            counts[row.item_idx] += row.n
    return np.log(counts / counts.sum()).tolist()


def launch(worker_args: WorkerArgs, cfg: Config) -> dict:
    t = cfg.train
    payload = dataclasses.asdict(worker_args)
    if t.num_processes == 1:
        return train_worker(payload)
    from pyspark.ml.torch.distributor import TorchDistributor

    from ebbtide.spark import get_spark, master_of

    spark = get_spark(cfg.spark)
    local = master_of(spark).startswith("local")
    return TorchDistributor(num_processes=t.num_processes, local_mode=local, use_gpu=t.use_gpu).run(
        train_worker, payload)


def train_models(cfg: Config, storage, snapshot_version: int | None = None,
                 export_worker_args: str | Path | None = None) -> dict[str, Path]:
    """Train every configured model on one pinned snapshot; returns the artifact folder of each.

    With export_worker_args, only write one `<model>.json` per model there, for `torchrun -m ebbtide.train`."""
    from pyspark.sql import functions as sf

    from ebbtide.feed import pin_snapshot
    from ebbtide.tables import table_specs

    snapshot = pin_snapshot(storage, cfg, snapshot_version)
    seq_spec = table_specs(cfg)["user_sequences"]
    # the date in Spark's session zone (UTC), not the driver's local one
    last_day = storage.read(seq_spec, snapshot.version).agg(sf.to_date(sf.max("last_ts"))).collect()[0][0]
    split = SplitPlan.from_config(cfg.train, last_day)
    n_types = len(cfg.sessionize.event_types)
    log_q = (item_log_q(storage, cfg, snapshot, split) if snapshot.n_items > cfg.train.full_softmax_max_items
             else None)
    artifacts = {}
    for name in cfg.train.models:
        run_dir = Path(cfg.train.output) / "_runs" / f"{name}-v{snapshot.version}"
        if not cfg.train.resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        args = WorkerArgs(cfg=cfg.model_dump(mode="json"), model_name=name,
                          snapshot=dataclasses.asdict(snapshot), split=split.as_dict(), n_types=n_types,
                          item_log_q=log_q, run_dir=str(run_dir))
        if export_worker_args:
            out = Path(export_worker_args) / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(dataclasses.asdict(args)))
            artifacts[name] = out
            continue
        log.info("training %s on user_sequences v%d (%d items, %s split, %d process(es))", name, snapshot.version,
                 snapshot.n_items, split.kind, cfg.train.num_processes)
        artifacts[name] = save_trained(cfg, name, snapshot, split, n_types, launch(args, cfg))
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished run needs no resume state
    return artifacts


def save_trained(cfg: Config, name: str, snapshot: Snapshot, split: SplitPlan, n_types: int, summary: dict) -> Path:
    """The best validation epoch's weights -> a versioned artifact (and an MLflow run when MLflow is there)."""
    t, options = cfg.train.for_model(name)
    model_conf = {"name": name, "n_items": snapshot.n_items, "n_types": n_types, "dim": t.dim,
                  "max_len": t.max_len, "options": options, "event_types": list(cfg.sessionize.event_types),
                  "train": t.model_dump(mode="json")}
    from ebbtide.artifacts import build_from_config

    model = build_from_config(model_conf)
    model.load_state_dict(torch.load(summary["model_state_path"], map_location="cpu", weights_only=True))
    meta = {"data_snapshot_version": snapshot.version, "vocab_version": snapshot.vocab_version,
            "split": split.as_dict(), "decay": model.decay_report(),
            "metrics": {k: v for k, v in summary.items() if k not in ("model_state_path", "per_rank")}}
    path = write_artifact(cfg.train.output, model, model_conf, meta)
    _log_mlflow(cfg, name, model_conf, meta, path)
    log.info("%s: best val NDCG@10 %.4f at epoch %d after %.0fs of training -> %s", name,
             summary["best_val_ndcg@10"], summary["best_epoch"], summary["seconds_to_best"], path)
    return path


def _log_mlflow(cfg: Config, name: str, model_conf: dict, meta: dict, path: Path) -> None:
    try:
        import mlflow
    except ImportError:
        return
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # The default: a local file store beside the models. MLflow 3 keeps that backend behind an opt-in;
        # a real deployment sets MLFLOW_TRACKING_URI (a server, Databricks, or sqlite:///...).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(f"file://{Path(cfg.train.output).resolve() / 'mlruns'}")
    with mlflow.start_run(run_name=f"{name}-{path.name}"):
        mlflow.log_params({k: v for k, v in model_conf["train"].items() if not isinstance(v, (list, dict))})
        mlflow.log_params({f"option.{k}": v for k, v in model_conf["options"].items()})
        mlflow.log_metric("best_val_ndcg_at_10", meta["metrics"]["best_val_ndcg@10"])
        mlflow.log_metric("seconds_to_best", meta["metrics"]["seconds_to_best"])
        mlflow.log_artifacts(str(path))


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: `torchrun --nproc_per_node N -m ebbtide.train WORKER_ARGS.json` (written by
    `ebbtide train --export-worker-args DIR`). Prints rank 0's summary as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ebbtide.train", description=main.__doc__)
    parser.add_argument("worker_args", help="a JSON file of WorkerArgs")
    args = parser.parse_args(argv)
    summary = train_worker(json.loads(Path(args.worker_args).read_text()))
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_rank"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
