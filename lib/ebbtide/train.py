"""Distributed training of the interest models: petastorm feed -> DDP (gloo on CPU, NCCL on GPU).

`train_models` pins the data snapshot and launches `train_worker` on every rank, through TorchDistributor
(local mode on one machine, barrier mode on a cluster) when num_processes > 1, or directly in-process. The worker
also runs under `torchrun` (python -m ebbtide.train ...): it reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment either way.

Objective: next-item prediction at every position (causal), each position queried at the time of the event it
predicts. Full softmax for small catalogs; sampled softmax with log-Q correction over in-batch negatives above
`train.full_softmax_max_items`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
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

from ebbtide.config import Config
from ebbtide.feed import Snapshot, seconds, torch_batches, training_reader
from ebbtide.models import InterestModel, build_model
from ebbtide.models.base import Batch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------
# Split boundaries
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitPlan:
    kind: str
    train_before: float | None        # seconds; temporal split only
    val_window: tuple[float, float] | None
    test_window: tuple[float, float] | None
    drop_last: int                    # leave-one-out: events held out at the end of each sequence

    @staticmethod
    def from_config(cfg: Config, last_day: dt.date | None) -> SplitPlan:
        t = cfg.train
        if t.split == "leave_one_out":
            return SplitPlan("leave_one_out", None, None, None, drop_last=2)
        if t.cutoff is None and last_day is None:
            raise ValueError("temporal split needs train.cutoff or data to infer it from")
        cutoff = t.cutoff or last_day - dt.timedelta(days=t.val_days + t.test_days - 1)
        c = seconds(cutoff)
        v_end = c + t.val_days * 86_400
        return SplitPlan("temporal", c, (c, v_end), (v_end, v_end + t.test_days * 86_400), drop_last=0)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------
def next_item_loss(model: InterestModel, batch: Batch, full_softmax: bool,
                   log_q: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of predicting event i+1 from events 0..i, queried at t_(i+1)."""
    t_next = torch.cat([batch.ts[:, 1:], batch.ts[:, -1:]], dim=1)
    users = model(batch, t_next)[:, :-1]                             # (B, L-1, d); DDP-aware forward
    targets = batch.items[:, 1:]                                     # vocab index + 1, 0 = padding
    valid = targets > 0
    users, targets = users[valid], targets[valid] - 1
    if targets.numel() == 0:
        return users.sum() * 0.0, 0
    inner = getattr(model, "module", model)
    if full_softmax:
        logits = users @ inner.item_embeddings().T
        return F.cross_entropy(logits.float(), targets), int(targets.numel())
    # Sampled softmax: the batch's distinct targets are the candidates; subtracting log Q(item) corrects the
    # popularity bias of in-batch sampling. Unique candidates mean no accidental hits to mask.
    candidates, label = torch.unique(targets, return_inverse=True)
    logits = users @ inner.item_emb(candidates + 1).T
    if log_q is not None:
        logits = logits - log_q[candidates]
    return F.cross_entropy(logits.float(), label), int(targets.numel())


DECAY_PARAMETERS = ("log_tau", "mix_logits", "log_pseudo_count", "log_rate", "type_weight")


def param_groups(model: InterestModel, lr: float, decay_multiplier: float) -> list[dict]:
    """The few scalar time-scale parameters get a larger learning rate and no weight decay: they move on a log
    scale and would otherwise barely leave their initial values in a short run."""
    scalars = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in DECAY_PARAMETERS]
    ids = {id(p) for p in scalars}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest}]
    if scalars:
        groups.append({"params": scalars, "lr": lr * decay_multiplier, "weight_decay": 0.0})
    return groups


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return factor


# ------------------------------------------------------------------------------------------------------
# Checkpoints and artifacts
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


def save_checkpoint(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def write_artifact(out_root: Path, model: InterestModel, model_conf: dict, meta: dict) -> Path:
    """models/<name>/<version>/: weights.pt (state dict), config.json, meta.json with a content hash."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    staging = out_root / model.name / f".staging-{os.getpid()}-{time.time_ns()}"
    staging.mkdir(parents=True)
    torch.save(weights, staging / "weights.pt")
    (staging / "config.json").write_text(json.dumps(model_conf, indent=2, sort_keys=True, default=str))
    digest = hashlib.sha256((staging / "weights.pt").read_bytes())
    digest.update((staging / "config.json").read_bytes())
    meta = dict(meta, content_hash=digest.hexdigest())
    (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    version = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{meta['content_hash'][:8]}"
    final = out_root / model.name / version
    os.replace(staging, final)
    return final


def load_artifact(path: str | Path) -> tuple[InterestModel, dict, dict]:
    """Rebuild a model from its artifact; weights load with weights_only=True (no pickled code)."""
    path = Path(path)
    model_conf = json.loads((path / "config.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    digest = hashlib.sha256((path / "weights.pt").read_bytes())
    digest.update((path / "config.json").read_bytes())
    if digest.hexdigest() != meta["content_hash"]:
        raise ValueError(f"artifact {path} does not match its content hash: refusing to load")
    model = build_model(model_conf["name"], model_conf["n_items"], model_conf["n_types"], model_conf["dim"],
                        model_conf["max_len"])
    model.load_state_dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, model_conf, meta


def latest_artifact(out_root: str | Path, name: str) -> Path:
    versions = sorted(p for p in (Path(out_root) / name).glob("*") if p.is_dir() and not p.name.startswith("."))
    if not versions:
        raise FileNotFoundError(f"no trained {name} model under {out_root}")
    return versions[-1]


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


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def train_worker(args_dict: dict) -> dict:
    """Runs on every rank. Returns (on rank 0) the training summary; other ranks return theirs too."""
    from torch.nn.parallel import DistributedDataParallel

    from ebbtide.config import Config
    from ebbtide.evaluate import EvalSet, evaluate_model

    args = WorkerArgs(**args_dict)
    cfg = Config.model_validate(args.cfg)
    t = cfg.train
    rank, world, local_rank = _dist_env()
    use_cuda = torch.cuda.is_available() and (t.use_gpu or os.environ.get("EBBTIDE_FORCE_CUDA") == "1")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")

    snapshot = Snapshot(**{**args.snapshot, "files": tuple(args.snapshot["files"])})
    split = SplitPlan(**args.split)
    torch.manual_seed(t.seed)           # identical initial weights on every rank (DDP also broadcasts them)
    model = build_model(args.model_name, snapshot.n_items, args.n_types, t.dim, t.max_len).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None) if world > 1 else model
    optimizer = torch.optim.AdamW(param_groups(model, t.lr, t.decay_lr_multiplier), lr=t.lr,
                                  weight_decay=t.weight_decay)
    rows = sum(_num_rows(f) for f in snapshot.files)
    steps_per_epoch = max(1, math.ceil(rows / world / t.batch_size))
    total_steps = t.epochs * steps_per_epoch if not t.max_steps else min(t.max_steps, t.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total_steps))
    full_softmax = snapshot.n_items <= t.full_softmax_max_items
    log_q = torch.tensor(args.item_log_q, device=device) if args.item_log_q else None

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    step, epoch, skip, best, best_epoch, history = 0, 0, 0, -1.0, -1, []
    rng_after_skip = None
    if t.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file: RNG states
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        best, best_epoch, history = state["best"], state["best_epoch"], state["history"]
        # Rank 0's RNG state is restored exactly; other ranks reseed deterministically from the step.
        rng_after_skip = state["rng"] if rank == 0 else None
        if rank != 0:
            torch.manual_seed(t.seed + 7919 * rank + step)
        if skip == 0 and rng_after_skip is not None:
            _set_rng_state(rng_after_skip)
            rng_after_skip = None
        if rank == 0:
            log.info("resumed %s from %s: epoch %d, step %d (%d batches into the epoch)", args.model_name,
                     ckpt_path, epoch, step, skip)

    val_set = (EvalSet.build(snapshot, split, "val", t.max_len, novel_only=cfg.evaluate.exclude_seen)
               if rank == 0 else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else torch.autocast("cpu", enabled=False)
    progress = _progress(rank, total_steps, step, args.model_name)
    seen_sequences, train_seconds = 0, 0.0    # time in the data loop only: validation is not training throughput
    losses: list[float] = []
    fingerprints: list[int] = []
    stop = False
    while epoch < t.epochs and not stop:
        reader = training_reader(snapshot, t.max_len, rank, world, epoch, t.seed, split.train_before,
                                 split.drop_last, workers=t.reader_workers, pool=t.reader_pool)
        model.train()
        batches_in_epoch, last_loss = 0, float("nan")
        from torch.distributed.algorithms.join import Join

        join = Join([ddp]) if world > 1 else _NullContext()
        loop_started = time.perf_counter()
        with reader, join:
            for batch in torch_batches(reader, t.batch_size, t.shuffle_buffer, seed=t.seed + 1000 * epoch + rank):
                if batches_in_epoch < skip:      # replaying the epoch up to where the checkpoint was taken
                    batches_in_epoch += 1
                    if batches_in_epoch == skip and rng_after_skip is not None:
                        _set_rng_state(rng_after_skip)
                    continue
                if args.record_rows:
                    fingerprints += [hash(row.tobytes()) for row in batch.ts.numpy()]
                batch = batch.to(device)
                with autocast:
                    loss, n_targets = next_item_loss(ddp, batch, full_softmax, log_q)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                batches_in_epoch += 1
                seen_sequences += len(batch.lengths)
                last_loss = float(loss.detach())
                losses.append(last_loss)
                progress.update(1, last_loss)
                if rank == 0 and step % t.log_every == 0:
                    rate = seen_sequences * world / (train_seconds + time.perf_counter() - loop_started)
                    eta = (total_steps - step) * t.batch_size * world / max(rate, 1e-9)
                    log.info("%s epoch %d step %d/%d loss %.4f lr %.2e %.0f seq/s ETA %.0fs", args.model_name,
                             epoch, step, total_steps, last_loss, scheduler.get_last_lr()[0], rate, eta)
                if step % t.checkpoint_every == 0:
                    _checkpoint(ckpt_path, rank, model, optimizer, scheduler, step, epoch, batches_in_epoch,
                                best, best_epoch, history)
                if args.stop_after_steps and step >= args.stop_after_steps:
                    return {"killed_at_step": step}
                if t.max_steps and step >= t.max_steps:
                    stop = True
                    break
        train_seconds += time.perf_counter() - loop_started
        skip, rng_after_skip = 0, None
        # Epoch end: validation NDCG@10 on rank 0, early-stop decision shared with every rank.
        metrics = {}
        if rank == 0:
            metrics = evaluate_model(model, val_set, ks=(10,), exclude_seen=cfg.evaluate.exclude_seen, device=device)
            history.append({"epoch": epoch, "step": step, "loss": last_loss, **metrics})
            log.info("%s epoch %d done: val %s", args.model_name,
                     epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if metrics["ndcg@10"] > best:
                best, best_epoch = metrics["ndcg@10"], epoch
                torch.save(model.state_dict(), run_dir / "best.pt")
            stop = stop or epoch - best_epoch >= t.patience
        stop = _broadcast_flag(stop, world, device)
        epoch += 1
        _checkpoint(ckpt_path, rank, model, optimizer, scheduler, step, epoch, 0, best, best_epoch, history)
        if world > 1:
            torch_dist.barrier()
    progress.close()
    elapsed = train_seconds
    summary = {"rank": rank, "world_size": world, "steps": step, "epochs": epoch, "best_val_ndcg@10": best,
               "best_epoch": best_epoch, "history": history, "train_seconds": elapsed,
               "sequences_per_s": seen_sequences * world / max(elapsed, 1e-9), "device": str(device),
               "final_params_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
               "losses": losses}
    if world > 1:  # every rank reaches this point: gather what each one saw, for the caller (rank 0's return)
        gathered: list = [None] * world
        torch_dist.all_gather_object(gathered, {"checksum": summary["final_params_checksum"],
                                                "rows": fingerprints, "losses": losses})
        summary["per_rank"] = gathered
    elif args.record_rows:
        summary["per_rank"] = [{"checksum": summary["final_params_checksum"], "rows": fingerprints,
                                "losses": losses}]
    if rank == 0 and (run_dir / "best.pt").exists():
        model.load_state_dict(torch.load(run_dir / "best.pt", map_location=device, weights_only=True))
        summary["model_state_path"] = str(run_dir / "best.pt")
    if world > 1:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return summary


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _num_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(uri[len("file://"):] if uri.startswith("file://") else uri).metadata.num_rows


def _broadcast_flag(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.broadcast(value, src=0)
    return bool(value.item())


def _checkpoint(path, rank, model, optimizer, scheduler, step, epoch, batches_in_epoch, best, best_epoch,
                history) -> None:
    """Rank 0 writes; model and optimizer are identical on every rank after each DDP step. No collective here:
    with uneven shards (DDP Join) ranks reach a given step at different times."""
    if rank == 0:
        save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), step=step, epoch=epoch,
                        batches_in_epoch=batches_in_epoch, best=best, best_epoch=best_epoch, history=history,
                        rng=_rng_state())


class _progress:
    """tqdm on a terminal (rank 0), silent otherwise; the log lines carry progress for batch jobs."""

    def __init__(self, rank: int, total: int, initial: int, name: str):
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit="step")

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------------
def item_log_q(storage, cfg: Config, snapshot: Snapshot) -> list[float]:
    """log of each item's share of events (vocab counts): the sampling probability of in-batch negatives."""
    from ebbtide.tables import table_specs

    vocab = storage.read(table_specs(cfg)["item_vocab"], snapshot.vocab_version).select("item_idx", "n_events")
    counts = np.ones(snapshot.n_items)
    for row in vocab.toLocalIterator():
        counts[row.item_idx] += row.n_events
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
    from ebbtide.feed import pin_snapshot
    from ebbtide.tables import table_specs

    snapshot = pin_snapshot(storage, cfg, snapshot_version)
    seq_spec = table_specs(cfg)["user_sequences"]
    last_ts = storage.read(seq_spec, snapshot.version).agg({"last_ts": "max"}).collect()[0][0]
    split = SplitPlan.from_config(cfg, last_ts.date() if last_ts else None)
    n_types = len(cfg.sessionize.event_types)
    log_q = item_log_q(storage, cfg, snapshot) if snapshot.n_items > cfg.train.full_softmax_max_items else None
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
        summary = launch(args, cfg)
        model = build_model(name, snapshot.n_items, n_types, cfg.train.dim, cfg.train.max_len)
        model.load_state_dict(torch.load(summary["model_state_path"], map_location="cpu", weights_only=True))
        model_conf = {"name": name, "n_items": snapshot.n_items, "n_types": n_types, "dim": cfg.train.dim,
                      "max_len": cfg.train.max_len, "event_types": list(cfg.sessionize.event_types),
                      "train": cfg.train.model_dump(mode="json")}
        meta = {"data_snapshot_version": snapshot.version, "vocab_version": snapshot.vocab_version,
                "split": split.as_dict(), "decay": model.decay_report(),
                "metrics": {k: v for k, v in summary.items() if k not in ("model_state_path", "per_rank")}}
        path = write_artifact(Path(cfg.train.output), model, model_conf, meta)
        _log_mlflow(cfg, name, model_conf, meta, path)
        artifacts[name] = path
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished run needs no resume state
        log.info("%s: best val NDCG@10 %.4f at epoch %d, %.0f seq/s -> %s", name, summary["best_val_ndcg@10"],
                 summary["best_epoch"], summary["sequences_per_s"], path)
    return artifacts


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
        mlflow.log_metric("best_val_ndcg_at_10", meta["metrics"]["best_val_ndcg@10"])
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
