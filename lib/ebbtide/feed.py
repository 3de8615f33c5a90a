"""Training data feed: Petastorm over the active files of a pinned `user_sequences` snapshot.

The Delta version is pinned when training starts and recorded in the model artifact; the reader gets exactly the
snapshot's active files (never a folder listing). Petastorm's batch reader wants fixed-shape columns, so a
TransformSpec pads/truncates the variable-length arrays and drops the string columns. Sharding is by Parquet row
group across (rank, world size); the reader's worker pool splits a shard further; row groups are shuffled with a
seed and rows go through a seeded shuffle buffer.

Splits (``train.split``):
* ``temporal``: training sees events before ``cutoff``; validation targets are the first event of each user in
  [cutoff, cutoff + val_days), test targets the first event in [cutoff + val_days, cutoff + val_days + test_days),
  each with all earlier events as history.
* ``leave_one_out``: the last event is the test target, the second-to-last the validation target.
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ebbtide.models.base import Batch, pad_arrays

log = logging.getLogger(__name__)
# petastorm 0.13 drives pyarrow's legacy ParquetDataset API (the reason pyarrow is pinned < 15): silence the
# per-row-group deprecation notices it triggers.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")

SEQUENCE_COLUMNS = ["item_idx", "ts", "event_type", "session_idx"]


@dataclass(frozen=True)
class Snapshot:
    """A pinned user_sequences version: what the model was trained on."""

    version: int
    files: tuple[str, ...]
    vocab_version: int
    n_items: int

    def row_groups(self) -> int:
        return sum(pq.ParquetFile(_local(f)).num_row_groups for f in self.files)


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _uri(path: str) -> str:
    return f"file://{path}" if path.startswith("/") else path


def pin_snapshot(storage, cfg, version: int | None = None) -> Snapshot:
    from ebbtide.tables import table_specs

    specs = table_specs(cfg)
    seq_spec, vocab_spec = specs["user_sequences"], specs["item_vocab"]
    version = storage.version(seq_spec) if version is None else version
    files = tuple(_uri(f.path) for f in storage.active_files(seq_spec, version))
    vocab_version = storage.version(vocab_spec)
    n_items = storage.read(vocab_spec, vocab_version).count()
    if not files:
        raise ValueError(f"user_sequences version {version} has no data files: run sessionize first")
    return Snapshot(version, files, vocab_version, n_items)


def seconds(day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc).timestamp()


# ------------------------------------------------------------------------------------------------------
# Fixed-shape rows (used by the petastorm TransformSpec and by evaluation)
# ------------------------------------------------------------------------------------------------------
def pad_histories(frame: pd.DataFrame, max_len: int, before: float | None = None,
                  drop_last: int = 0, min_events: int = 2) -> pd.DataFrame:
    """Variable-length arrays -> fixed (max_len,) arrays, right-padded, most recent events kept.

    `before` keeps events strictly before that time (seconds); `drop_last` removes the last n events
    (leave-one-out). Rows left with fewer than min_events events are dropped.
    """
    histories = []
    for it, t, ty, se in zip(*(frame[c].values for c in SEQUENCE_COLUMNS)):
        t = np.asarray(t, dtype=np.float64)
        end = len(t) if before is None else int(np.searchsorted(t, before, side="left"))
        end = max(0, end - drop_last)
        histories.append((np.asarray(it[:end]), t[:end], np.asarray(ty[:end]), np.asarray(se[:end])))
    items, ts, types, sessions, lengths = pad_arrays(histories, max_len)
    keep = lengths >= min_events
    return pd.DataFrame({"items": list(items[keep]), "ts": list(ts[keep]), "types": list(types[keep]),
                         "sessions": list(sessions[keep]), "length": lengths[keep]})


def make_transform_spec(max_len: int, before: float | None, drop_last: int):
    from petastorm import TransformSpec

    def transform(frame: pd.DataFrame) -> pd.DataFrame:
        return pad_histories(frame, max_len, before=before, drop_last=drop_last)

    fields = [("items", np.int64, (max_len,), False), ("ts", np.float64, (max_len,), False),
              ("types", np.int64, (max_len,), False), ("sessions", np.int64, (max_len,), False),
              ("length", np.int64, (), False)]
    return TransformSpec(transform, edit_fields=fields, selected_fields=[f[0] for f in fields])


def training_reader(snapshot: Snapshot, max_len: int, rank: int, world_size: int, epoch: int, seed: int,
                    before: float | None, drop_last: int, workers: int = 1, pool: str = "dummy"):
    """A petastorm batch reader over this rank's shard for one epoch (petastorm cannot resume mid-epoch, so a
    resumed run re-opens the epoch with the same seed and skips the batches it had consumed)."""
    from petastorm import make_batch_reader

    groups = snapshot.row_groups()
    if groups < world_size:
        raise ValueError(f"user_sequences v{snapshot.version} has {groups} row groups but {world_size} ranks: "
                         "petastorm shards by row group, so a rank would get no data. Use fewer ranks or more "
                         "buckets (storage.user_buckets) / smaller files (storage.max_rows_per_file).")
    return make_batch_reader(
        list(snapshot.files), schema_fields=SEQUENCE_COLUMNS,
        transform_spec=make_transform_spec(max_len, before, drop_last),
        shuffle_row_groups=True, seed=seed + epoch,
        cur_shard=rank if world_size > 1 else None, shard_count=world_size if world_size > 1 else None,
        num_epochs=1, reader_pool_type=pool, workers_count=workers)


def torch_batches(reader, batch_size: int, shuffle_buffer: int, seed: int):
    """petastorm's BatchedDataLoader (tensor batches, row-level shuffle buffer) -> Batch objects.

    The shuffle buffer draws from torch's global generator; it gets a private, seeded stream here so that the
    order of rows never depends on what the model draws (dropout) in between: a resumed run that replays the
    epoch sees exactly the batches of the original run.
    """
    import torch
    from petastorm.pytorch import BatchedDataLoader

    loader_state = torch.Generator().manual_seed(seed).get_state()
    batches = iter(BatchedDataLoader(reader, batch_size=batch_size, shuffling_queue_capacity=shuffle_buffer))
    while True:
        outer_state = torch.get_rng_state()
        torch.set_rng_state(loader_state)
        try:
            sample = next(batches)
        except StopIteration:
            return
        finally:
            loader_state = torch.get_rng_state()
            torch.set_rng_state(outer_state)
        yield Batch(sample["items"].long(), sample["ts"].to(torch.float64), sample["types"].long(),
                    sample["sessions"].long(), sample["length"].long())


def read_snapshot_frame(snapshot: Snapshot, columns: list[str] | None = None) -> pd.DataFrame:
    """The pinned snapshot as pandas (evaluation, baselines): the same active files, read with pyarrow."""
    cols = columns or ["user_id", *SEQUENCE_COLUMNS, "weight"]
    tables = [pq.read_table(_local(f), columns=cols) for f in snapshot.files]
    import pyarrow as pa

    return pa.concat_tables(tables).to_pandas()
