"""Fault points at storage and job boundaries, for the reliability suite.

Every storage write passes named points; a job (a `storage.job(...)` scope) passes one more when it ends:

* ``read:<table>``    a snapshot of <table> was read (the job has read its input)
* ``write:<table>``   Parquet files for <table> are written but not committed (mid-write)
* ``commit:<table>``  <table> was committed (between the commits of different tables)
* ``end:<job>``       the job's last commit is done, its bookkeeping (report, logs) is not

``EBBTIDE_FAULTS`` arms points: a comma-separated list of ``<point>[#n][=action]``, e.g.
``commit:events`` (SIGKILL this process the first time events is committed), ``write:sessions#2=raise``
(raise InjectedFault the second time), ``write:quarantine=wait:/tmp/go`` (block until that file exists, to line up
concurrent writers in tests). Unset, every point costs one dictionary lookup. Tests may also register in-process
hooks with `on()`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)

ENV = "EBBTIDE_FAULTS"

_seen: Counter = Counter()
_hooks: dict[str, list[Callable[[], None]]] = {}


class InjectedFault(BaseException):
    """Raised at an armed point with action `raise`; a BaseException so no `except Exception` swallows it."""


def _armed() -> dict[str, tuple[int, str]]:
    spec = os.environ.get(ENV, "").strip()
    armed = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition("=")
        point, _, nth = point.partition("#")
        armed[point] = (int(nth or 1), action or "kill")
    return armed


def point(name: str) -> None:
    """Pass the fault point `name` (e.g. ``commit:events``)."""
    for hook in list(_hooks.get(name, ())):
        hook()
    armed = _armed()
    if name not in armed:
        return
    _seen[name] += 1
    nth, action = armed[name]
    if _seen[name] != nth:
        return
    if action.startswith("wait:"):
        flag = action[len("wait:"):]
        log.warning("fault point %s: waiting for %s", name, flag)
        while not os.path.exists(flag):
            time.sleep(0.05)
        return
    log.warning("fault point %s: injecting %s", name, action)
    if action == "raise":
        raise InjectedFault(name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on(name: str, hook: Callable[[], None], once: bool = True) -> None:
    """Run `hook` when `name` is passed (tests: a concurrent writer's commit at an exact moment); a `once` hook
    is removed before it runs, so it may pass the same point itself."""
    def run() -> None:
        if once:
            _hooks[name].remove(run)
        hook()
    _hooks.setdefault(name, []).append(run)


def reset() -> None:
    _seen.clear()
    _hooks.clear()
