"""What has run, judged from the tables' own metadata: the application-transaction markers every job commits.

Sessionize of run date D commits to each table it writes with the marker ``ebbtide.sessionize.D`` (a table it
does not change gets a marker-only commit), `events` last; nightly of D commits ``ebbtide.nightly.D``,
`user_recommendations` last. A marker in a table's snapshot means that run's commit to that table landed. From
the markers follow:
* whether a date is done, judged from the run's last table (backfill resumes, nightly's freshness guard): a run
  killed before its last commit is not done and is re-run;
* the table version a *timely* run of D read: the last version before any sessionize run of a later date
  committed. Nightly as of a past date time-travels to it, so a backfill or a re-run of an old date computes from
  exactly the events that were known at the end of D.
"""

from __future__ import annotations

import datetime as dt
import logging

from ebbtide.storage import DeltaStorage
from ebbtide.tables import TableSpec

log = logging.getLogger(__name__)


def sessionize_app_id(run_date: dt.date) -> str:
    return f"ebbtide.sessionize.{run_date.isoformat()}"


def nightly_app_id(as_of: dt.date) -> str:
    return f"ebbtide.nightly.{as_of.isoformat()}"


# The table each job commits last (sessionize.WRITES, nightly.OUTPUTS): its marker means the whole run landed.
SESSIONIZE_DONE_TABLE = "events"
NIGHTLY_DONE_TABLE = "user_recommendations"


class AsOfUnavailableError(RuntimeError):
    """No version of a table holds exactly the data known at the end of the date (dates after it were loaded
    before it)."""


def committed(storage: DeltaStorage, spec: TableSpec, app_id: str) -> bool:
    return storage.exists(spec) and storage.txn_versions(spec, [app_id])[app_id] is not None


def committed_dates(storage: DeltaStorage, spec: TableSpec, dates: list[dt.date], app_id=sessionize_app_id,
                    version: int | None = None) -> set[dt.date]:
    """Which of `dates` have a committed run (marker) in the table's snapshot at `version`."""
    if not dates or not storage.exists(spec):
        return set()
    found = storage.txn_versions(spec, [app_id(d) for d in dates], version)
    return {d for d in dates if found[app_id(d)] is not None}


def version_as_of(storage: DeltaStorage, spec: TableSpec, as_of: dt.date, later: list[dt.date]) -> int:
    """The version of `spec` that a nightly run right after sessionize(as_of) read.

    `later` are the candidate run dates after as_of (any superset of the sessionized ones). If none of them has
    committed, that is the latest version. Otherwise it is the version just before the first commit of a later
    run (binary search over versions: markers, once committed, stay), which must hold as_of's own marker;
    if it does not, the later dates were loaded first and no version holds the data as of as_of.
    """
    latest = storage.version(spec)
    later_ids = [sessionize_app_id(d) for d in later]
    if not later_ids:
        return latest
    has_later = lambda v: any(x is not None for x in storage.txn_versions(spec, later_ids, v).values())  # noqa: E731
    if not has_later(latest):
        return latest
    lo, hi = 0, latest            # invariant: has_later(hi); find the smallest such version
    while lo < hi:
        mid = (lo + hi) // 2
        if has_later(mid):
            hi = mid
        else:
            lo = mid + 1
    version = hi - 1
    own = sessionize_app_id(as_of)
    if version < 0 or storage.txn_versions(spec, [own], version)[own] is None:
        raise AsOfUnavailableError(
            f"{spec.name}: run dates after {as_of} were sessionized before {as_of}, so no version holds exactly the "
            f"events known at the end of {as_of}")
    return version
