"""The lease: the right to write one store, held by one run and renewed by a heartbeat thread.

    lease = Lease(path, ttl=60.0)
    lease.acquire()       # or StoreError naming the live run that holds it
    ...
    lease.release()

The lease lives in the store itself (the ``lease`` subgroup's attributes), so it works on a local
folder, a shared file system and an object store alike, without POSIX locks. Its record is a
``LeaseRecord``, read through one parser (``parse_lease``): a malformed one is refused in one
``StoreError`` line naming the store, as a malformed provenance is (``pipeline.store.format``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, FiniteFloat, ValidationError

from pipeline.errors import StoreError, brief
from pipeline.store.format import first_error
from pipeline.store.layout import LEASE, open_group


class LeaseRecord(BaseModel):
    """The ``lease`` node's attributes: which run holds the store, where, and how fresh its heartbeat is.

    Typed and strict (a pid that is a string is malformed, not converted); unknown keys are kept. What a
    reader may trust: nothing but its shape; the record is data, written by whoever last held the store.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="allow")

    owner: str  # the holding run's token (uuid4 hex)
    host: str
    pid: int
    ttl: FiniteFloat  # seconds after ``heartbeat`` at which the lease expires
    started: FiniteFloat  # when the holding run started (time.time())
    heartbeat: FiniteFloat  # when it last renewed the lease (time.time())
    released: bool = False  # set by the run when it lets the store go


def parse_lease(attrs: Mapping[str, Any], path: str) -> LeaseRecord | None:
    """The lease of the store at ``path`` from its ``lease`` node's attributes (the one parser); None for
    no attributes (no run has held it).

    Raises:
      StoreError: naming ``path`` and the first key that is wrong.
    """
    if not attrs:
        return None
    try:
        return LeaseRecord.model_validate(dict(attrs))
    except ValidationError as err:
        raise StoreError(path, f"its lease is malformed: {first_error(err)}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_holder(path: str, options: dict[str, Any] | None = None) -> LeaseRecord | None:
    """The lease of a store as its holder last wrote it, or None.

    Raises:
      StoreError: naming ``path``: the lease is malformed (``parse_lease``).
    """
    group = open_group(path, "r", options)
    if LEASE not in group:
        return None
    return parse_lease(group[LEASE].attrs, path)


def lease_alive(lease: LeaseRecord | None, now: float | None = None) -> bool:
    """Whether a lease still binds: not released, its heartbeat younger than its ttl, and (on this
    host) its process still running. A run that died on another host is known by its expiry alone."""
    if lease is None or lease.released:
        return False
    if lease.host == socket.gethostname() and not _pid_alive(lease.pid):
        return False
    return (time.time() if now is None else now) - lease.heartbeat < lease.ttl


# Why a reader shows "interrupted" for a store whose record still says "running" (run_status).
STOPPED = "the run writing it stopped without recording its end: its lease is free"


def run_status(recorded: str, lease: LeaseRecord | None) -> tuple[str, str | None]:
    """The status to show for a store: the recorded one and None, but ("interrupted", STOPPED) when the
    record says "running" and no live run holds the lease (a run killed by SIGKILL or with its machine)."""
    if recorded == "running" and not lease_alive(lease):
        return "interrupted", STOPPED
    return recorded, None


def describe_lease(lease: LeaseRecord) -> str:
    age = time.time() - lease.heartbeat
    return f"run {lease.owner[:8]} on {lease.host} (pid {lease.pid}), last heartbeat {age:.0f} s ago"


class Lease:
    """The right to write one store, held by one run and renewed by a heartbeat thread.

    Kept in the store itself (a subgroup's attributes), so it works on a local folder, a shared
    file system and an object store alike, without POSIX locks. Taking it: write our token, wait
    ``SETTLE`` seconds, read it back: of two runs that raced, only the last writer finds its own.
    """

    SETTLE = 0.3

    def __init__(self, path: str, ttl: float, options: dict[str, Any] | None = None) -> None:
        self.path, self.ttl, self.options = path, ttl, options
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, **extra: Any) -> None:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "ttl": self.ttl,
                  "started": self.started, "heartbeat": time.time(), **extra}
        group = open_group(self.path, "r+", self.options)
        node = group[LEASE] if LEASE in group else group.create_group(LEASE)
        node.attrs.put(record)

    def acquire(self) -> None:
        """Take the lease, or raise StoreError naming the live run that holds it."""
        current = lease_holder(self.path, self.options)
        if current is not None and lease_alive(current):
            raise StoreError("output.path", f"another run is writing {self.path}: {describe_lease(current)}; "
                             f"a lease expires {current.ttl:g} s after its last heartbeat")
        try:
            self._write()
            time.sleep(self.SETTLE)
            ours = self._holds()
        except OSError as err:
            raise StoreError("output.path", f"cannot take the lease of {self.path}: {brief(err)}") from None
        if not ours:
            raise StoreError("output.path", f"another run took the lease of {self.path} at the same moment")
        self._thread = threading.Thread(target=self._beat, name="ntk-lease", daemon=True)
        self._thread.start()

    def _holds(self) -> bool:
        """Whether the store's lease is still this run's; a malformed one is not (another writer wrote it)."""
        try:
            current = lease_holder(self.path, self.options)
        except StoreError:
            return False
        return current is not None and current.owner == self.owner

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self._holds():
                    self.lost = True
                    return
                self._write()
            except Exception:  # a flaky store: try again at the next beat; expiry is the backstop
                continue

    def check(self, read: bool = False) -> None:
        """Raise if another run took the lease over (this run's heartbeat stalled past the ttl);
        ``read``: look at the store now rather than trust the heartbeat thread's last look."""
        if read and not self.lost:
            self.lost = not self._holds()
        if self.lost:
            raise StoreError("output.path", f"this run lost the lease of {self.path} to another run; stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._holds():
                self._write(released=True)
        except Exception:  # an unreleased lease expires by itself
            pass
