"""One run per workdir: a lock file naming the host and process that holds it.

A training run holds ``<workdir>/train.lock`` from start to end. The file is created
atomically (written under a private name, then hard-linked into place, which fails if the
lock exists), so of two runs started together exactly one gets it; the other fails at once
naming the holder. A lock whose process is gone on this host (killed, crashed) is stale and
taken over with a warning; a lock held from another host cannot be checked and is never
taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock."""


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), so that a
    recycled process id is not mistaken for the lock's holder; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _start_time(pid),
        "since": time.time(),
    }


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: written by no version of this module


def _is_stale(holder: dict[str, Any]) -> bool:
    """Whether the holder's process is gone (only decidable on its own host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return holder.get("start") is not None and _start_time(pid) not in (None, holder["start"])


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown run (the lock file is unreadable)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"process {holder.get('pid')} on host {holder.get('host')} (since {since})"


def _remove_if_unchanged(path: str, holder: dict[str, Any]) -> None:
    """Removes the lock file if it still holds ``holder``: moved aside first (atomic), and put
    back if another run took it over in the meantime."""
    aside = f"{path}.{os.getpid()}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != holder:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.unlink(aside)


def acquire(workdir: str) -> dict[str, Any]:
    """Takes ``workdir``'s lock (creating the directory); returns the record written.

    Raises:
      WorkdirLockedError: another live run holds it (one line, naming the holder).
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    record = _this_process()
    private = f"{path}.{record['host']}.{record['pid']}.tmp"
    with open(private, "w") as f:
        json.dump(record, f)
    try:
        for _ in range(3):
            try:
                os.link(private, path)
                return record
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    continue  # released just now
                if not _is_stale(holder):
                    raise WorkdirLockedError(
                        f"{workdir} is in use by another run: {_describe(holder)}. Wait for it "
                        f"to finish or use another --workdir; if no run uses it, delete {path}."
                    ) from None
                logging.warning(
                    "taking over the stale lock %s of %s, which no longer runs.",
                    path,
                    _describe(holder),
                )
                _remove_if_unchanged(path, holder)
        raise WorkdirLockedError(f"could not take the lock {path}: other runs keep taking it.")
    finally:
        os.unlink(private)


def release(workdir: str, record: dict[str, Any]) -> None:
    """Removes the lock if it is still ``record`` (never another run's)."""
    path = os.path.join(workdir, LOCK_FILE)
    if _read(path) == record:
        _remove_if_unchanged(path, record)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``workdir``'s lock for the ``with`` block (`acquire`, then `release`)."""
    record = acquire(workdir)
    try:
        yield
    finally:
        release(workdir, record)
