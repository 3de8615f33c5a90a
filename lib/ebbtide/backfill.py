"""`ebbtide backfill --from D1 --to D2`: sessionize then nightly for each date, in date order, resumable.

A date's stage is skipped when its commit is already in the tables (judged from the run markers in the Delta
log, see runs.py): sessionize when `events` holds `ebbtide.sessionize.D`, nightly when
`user_recommendations` holds `ebbtide.nightly.D` (each job's last commit). A killed backfill re-run with the same range
therefore resumes at the first unfinished stage. Dates run in order and the backfill stops at the first failure:
later nights depend on earlier data.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from tqdm import tqdm

from ebbtide.config import Config
from ebbtide.runs import NIGHTLY_DONE_TABLE, SESSIONIZE_DONE_TABLE, committed_dates, nightly_app_id
from ebbtide.storage import DeltaStorage
from ebbtide.tables import table_specs

log = logging.getLogger(__name__)


@dataclass
class BackfillSummary:
    first: dt.date
    last: dt.date
    sessionized: list[dt.date] = field(default_factory=list)
    sessionize_skipped: list[dt.date] = field(default_factory=list)
    nightly_written: list[dt.date] = field(default_factory=list)
    nightly_skipped: list[dt.date] = field(default_factory=list)
    failed: tuple[dt.date, str, str] | None = None      # (date, stage, error)

    def lines(self) -> list[str]:
        days = (self.last - self.first).days + 1
        out = [f"backfill {self.first} .. {self.last} ({days} dates)",
               f"  sessionize: {len(self.sessionized)} run, {len(self.sessionize_skipped)} already committed",
               f"  nightly:    {len(self.nightly_written)} run, {len(self.nightly_skipped)} already committed"]
        if self.failed:
            date, stage, error = self.failed
            out.append(f"  FAILED at {date} ({stage}): {error}")
            out.append(f"  re-run the same command to resume from {date}")
        return out


def backfill(spark, cfg: Config, storage: DeltaStorage, first: dt.date, last: dt.date, force: bool = False,
             with_nightly: bool = True, full: bool = False) -> BackfillSummary:
    from ebbtide.nightly import Nightly
    from ebbtide.sessionize import Sessionizer

    if last < first:
        raise ValueError(f"--to {last} is before --from {first}")
    specs = table_specs(cfg)
    dates = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    sessionizer = Sessionizer(spark, cfg, storage)
    nightly = Nightly(spark, cfg, storage) if with_nightly else None
    done_sessionize = set() if force else committed_dates(storage, specs[SESSIONIZE_DONE_TABLE], dates)
    done_nightly = set() if force or not with_nightly else committed_dates(
        storage, specs[NIGHTLY_DONE_TABLE], dates, app_id=nightly_app_id)
    summary = BackfillSummary(first, last)
    stages = len(dates) * (2 if with_nightly else 1)
    with tqdm(total=stages, desc="backfill", unit="stage", disable=None) as bar:
        for date in dates:
            for stage in ("sessionize", "nightly") if with_nightly else ("sessionize",):
                bar.set_postfix_str(f"{date} {stage}")
                done = done_sessionize if stage == "sessionize" else done_nightly
                if date in done:
                    (summary.sessionize_skipped if stage == "sessionize" else summary.nightly_skipped).append(date)
                    bar.update(1)
                    continue
                try:
                    if stage == "sessionize":
                        log.info("%s", sessionizer.run(date).line())
                        summary.sessionized.append(date)
                    else:
                        log.info("%s", nightly.run(date, full=full).line())
                        summary.nightly_written.append(date)
                except Exception as err:  # noqa: BLE001 - reported in the summary, with the date to resume from
                    log.exception("backfill %s: %s failed", date, stage)
                    summary.failed = (date, stage, str(err).splitlines()[0] if str(err) else type(err).__name__)
                    return summary
                bar.update(1)
    return summary
