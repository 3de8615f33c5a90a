"""Training data feed: Petastorm over the active files of a pinned `user_sequences` snapshot.

The Delta version is pinned when training starts and recorded in the model artifact; the reader gets exactly the
snapshot's active files (never a folder listing). Sharding is by Parquet row group across (rank, world size);
row groups are shuffled with a seed and rows go through a seeded shuffle buffer.

Petastorm's batch reader wants fixed-shape columns, so a TransformSpec turns each user's variable-length
history into **training windows** of `max_len` events: every training event of the history (split.py decides
which events are training events) is a target exactly once per epoch, predicted from up to `max_len - 1` earlier
events, at least `context` of them when the history has that many. Windows overlap by `context` events (context
only, not counted twice) and their boundaries move with a per-epoch phase, so a long history is seen through
different windows from epoch to epoch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ebbtide.models.base import Batch, pad_arrays
from ebbtide.split import SplitPlan

log = logging.getLogger(__name__)
# petastorm 0.13 drives pyarrow's legacy ParquetDataset API (the reason pyarrow is pinned < 15): silence the
# per-row-group deprecation notices it triggers.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")

SEQUENCE_COLUMNS = ["item_idx", "ts", "event_type", "session_idx"]
WINDOW_FIELDS = ("items", "ts", "types", "sessions")


@dataclass(frozen=True)
class Snapshot:
    """A pinned user_sequences version: what the model was trained on."""

    version: int
    files: tuple[str, ...]
    vocab_version: int
    n_items: int

    def row_groups(self) -> int:
        return sum(pq.ParquetFile(_local(f)).num_row_groups for f in self.files)

    def totals(self) -> tuple[int, int]:
        """(users, events) of the snapshot, from the Parquet footers alone."""
        users = events = 0
        for f in self.files:
            meta = pq.ParquetFile(_local(f)).metadata
            users += meta.num_rows
            for rg in range(meta.num_row_groups):
                group = meta.row_group(rg)
                leaf = next(i for i in range(group.num_columns)
                            if group.column(i).path_in_schema.split(".")[0] == "ts")
                events += group.column(leaf).num_values
        return users, events


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


# ------------------------------------------------------------------------------------------------------
# Training windows
# ------------------------------------------------------------------------------------------------------
def window_bounds(n_train: int, max_len: int, context: int, phase: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) of the windows covering targets 1..n_train-1 exactly once.

    Each window holds events [start, end) with end - start <= max_len and counts the targets in
    [first_target, end). The newest window ends at n_train and counts `phase + 1` targets (0 <= phase < stride);
    the others count `stride` targets each, stride = max_len - 1 - context, so every target but the first few
    of a history has at least `context` events of context."""
    stride = max_len - 1 - context
    bounds, end, count = [], n_train, phase % stride + 1
    while end > 1:
        # the rest of the history fits in one window: count all of it there
        first = 1 if end <= max_len else max(1, end - count)
        bounds.append((max(0, end - max_len), end, first))
        end, count = first, stride
    return bounds


def training_windows(frame: pd.DataFrame, max_len: int, split: SplitPlan, context: int,
                     seed: int) -> pd.DataFrame:
    """Each user's training events -> fixed-shape windows (see module doc); `seed` sets the epoch's phases."""
    stride = max_len - 1 - context
    histories, first_targets = [], []
    for it, t, ty, se in zip(*(frame[c].values for c in SEQUENCE_COLUMNS)):
        t = np.asarray(t, dtype=np.float64)
        n = split.train_end(t)
        if n < 2:
            continue
        # The phase depends on the epoch seed and the history, not on row order: replays are identical.
        phase = int(np.random.default_rng([seed, n, int(t[0]) & 0x7FFFFFFF]).integers(stride))
        for start, end, first in window_bounds(n, max_len, context, phase):
            histories.append((it[start:end], t[start:end], ty[start:end], se[start:end]))
            first_targets.append(first - start)
    items, ts, types, sessions, lengths = pad_arrays(histories, max_len)
    return pd.DataFrame({"items": list(items), "ts": list(ts), "types": list(types), "sessions": list(sessions),
                         "length": lengths, "first_target": np.asarray(first_targets, np.int64)})


def make_transform_spec(max_len: int, split: SplitPlan, context: int, seed: int):
    from petastorm import TransformSpec

    def transform(frame: pd.DataFrame) -> pd.DataFrame:
        return training_windows(frame, max_len, split, context, seed)

    fields = [(name, dtype, (max_len,), False) for name, dtype in
              zip(WINDOW_FIELDS, (np.int64, np.float64, np.int64, np.int64))]
    fields += [("length", np.int64, (), False), ("first_target", np.int64, (), False)]
    return TransformSpec(transform, edit_fields=fields, selected_fields=[f[0] for f in fields])


def training_reader(snapshot: Snapshot, max_len: int, rank: int, world_size: int, epoch: int, seed: int,
                    split: SplitPlan, context: int, workers: int = 1, pool: str = "dummy"):
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
        transform_spec=make_transform_spec(max_len, split, context, seed * 1_000_003 + epoch),
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
                    sample["sessions"].long(), sample["length"].long(), sample["first_target"].long())


def read_snapshot_frame(snapshot: Snapshot, columns: list[str] | None = None) -> pd.DataFrame:
    """The pinned snapshot as pandas (evaluation, baselines): the same active files, read with pyarrow."""
    import pyarrow as pa

    cols = columns or ["user_id", *SEQUENCE_COLUMNS, "weight"]
    return pa.concat_tables([pq.read_table(_local(f), columns=cols) for f in snapshot.files]).to_pandas()
