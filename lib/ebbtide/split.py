"""The train / validation / test split rule, in one place for every caller: the training feed (which events are
targets), evaluation (which event is each user's validation or test target) and the item frequencies that
training may use (log-Q). Nothing from the validation or test period reaches training.

Two kinds (``train.split``):
* ``temporal``: training uses events before ``cutoff``; the validation target of a user is their first event in
  [cutoff, cutoff + val_days), the test target their first event in the following test_days window; each target
  is predicted from all earlier events.
* ``leave_one_out``: the last event of each user is the test target, the second-to-last the validation target;
  training uses the rest. This is the protocol of most sequential-recommendation papers (and RecBole's).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np

DAY_SECONDS = 86_400.0
HOLDOUT = {"leave_one_out": 2, "temporal": 0}


def day_start_seconds(day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc).timestamp()


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    kind: str                                   # "temporal" | "leave_one_out"
    train_before: float | None = None           # temporal: epoch seconds
    val_window: tuple[float, float] | None = None
    test_window: tuple[float, float] | None = None

    @staticmethod
    def from_config(train_conf, last_day: dt.date | None) -> SplitPlan:
        if train_conf.split == "leave_one_out":
            return SplitPlan("leave_one_out")
        if train_conf.cutoff is None and last_day is None:
            raise ValueError("temporal split needs train.cutoff or data to infer it from")
        cutoff = train_conf.cutoff or last_day - dt.timedelta(days=train_conf.val_days + train_conf.test_days - 1)
        c = day_start_seconds(cutoff)
        v_end = c + train_conf.val_days * DAY_SECONDS
        return SplitPlan("temporal", c, (c, v_end), (v_end, v_end + train_conf.test_days * DAY_SECONDS))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SplitPlan:
        fields = {f.name for f in dataclasses.fields(SplitPlan)}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return SplitPlan(**data)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- the rule -----------------------------------------------------------------------------------------
    def train_end(self, ts: np.ndarray) -> int:
        """How many leading events of one time-ordered history belong to training."""
        if self.kind == "leave_one_out":
            return max(0, len(ts) - HOLDOUT[self.kind])
        return int(np.searchsorted(ts, self.train_before, side="left"))

    def target(self, ts: np.ndarray, which: str) -> int:
        """Index of the user's validation ("val") or test ("test") target, or -1 when the user has none or has no
        history before it."""
        if self.kind == "leave_one_out":
            pos = len(ts) - (1 if which == "test" else 2)
        else:
            lo, hi = self.test_window if which == "test" else self.val_window
            inside = np.nonzero((ts >= lo) & (ts < hi))[0]
            pos = int(inside[0]) if len(inside) else -1
        return pos if pos >= 1 else -1

    def describe(self) -> str:
        if self.kind == "leave_one_out":
            return ("leave-one-out: each user's last event is the test target and the second-to-last the "
                    "validation target; training uses the events before them")
        cut = dt.datetime.fromtimestamp(self.train_before, dt.timezone.utc)
        return (f"temporal: training uses events before {cut:%Y-%m-%d %H:%M} UTC; validation and test targets "
                "are each user's first event in the following windows")


def spark_training_events(sequences, split: SplitPlan):
    """The training events of a user_sequences DataFrame, one row per event (item_idx, ts): the same rule as
    SplitPlan.train_end, for item frequencies counted with Spark (tests check the two agree)."""
    from pyspark.sql import functions as F

    events = sequences.select(F.posexplode(F.arrays_zip("item_idx", "ts")).alias("pos", "e"),
                              F.size("ts").alias("n"))
    if split.kind == "leave_one_out":
        kept = events.where(F.col("pos") < F.col("n") - HOLDOUT[split.kind])
    else:
        kept = events.where(F.col("e.ts") < F.lit(split.train_before))
    return kept.select(F.col("e.item_idx").alias("item_idx"), F.col("e.ts").alias("ts"))
