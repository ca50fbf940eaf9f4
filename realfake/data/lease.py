"""The version lease: one build at a time writes a dataset version.

A :class:`VersionLease` is a small JSON object (``_lease.json`` in the version folder) created exclusively
(``O_EXCL`` on a local disk, ``If-None-Match: *`` on an object store), renewed by a heartbeat thread and taken over
when stale (expired, or left by a dead process on this host). Writers check it before every commit (fencing), so a
build that lost the version stops writing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from realfake.data.storage import Store, io_retry

__all__ = ["LEASE_FILE", "LeaseHeldError", "LeaseLostError", "VersionLease", "create_exclusive"]

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class LeaseHeldError(RuntimeError):
    """Another build holds the version's lease."""


class LeaseLostError(RuntimeError):
    """This build's lease was taken over (it expired or was broken); stop writing."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_exclusive(store: Store, data: bytes, *parts: str) -> bool:
    """Create an object only if absent; False if it exists. Local: O_EXCL; S3: ``If-None-Match: *``."""
    target = store.path(*parts)
    if store.local:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    try:
        io_retry(lambda: store.fs.pipe_file(target, data, mode="create"), f"create {store.uri(*parts)}")
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno == errno.EINVAL and "recondition" in str(e):
            return False
        raise
    except TypeError:
        # A filesystem without exclusive create: check, write, then confirm our token survived.
        if io_retry(lambda: store.fs.exists(target), f"stat {store.uri(*parts)}"):
            return False
        io_retry(lambda: store.fs.pipe_file(target, data), f"write {store.uri(*parts)}")
        return io_retry(lambda: store.fs.cat_file(target), f"read {store.uri(*parts)}") == data


class VersionLease:
    """An exclusive, expiring lease on a dataset version, held by one build (all of its workers).

    Workers of the same build pass the same ``owner`` and share the lease; any other owner gets
    :class:`LeaseHeldError` (after waiting up to ``wait_s``) naming who holds it. A background thread renews the
    lease every ``ttl_s / 3``; a lease is stale when it has expired, or when it was taken on this host by a
    process that no longer exists (a killed build), and a stale lease is taken over.

    Args:
        store: The version store.
        owner: Build id shared by the workers of one build; defaults to a fresh id.
        ttl_s: Seconds a lease stays valid without renewal.
        heartbeat: Renew in a background thread while held.
    """

    def __init__(self, store: Store, owner: str | None = None, ttl_s: float = 300.0, heartbeat: bool = True) -> None:
        self.store = store
        self.owner = owner or f"build-{uuid.uuid4().hex[:12]}"
        self.ttl_s = float(ttl_s)
        self.heartbeat = heartbeat
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held = False
        self._lost: str | None = None
        self._joined = False  # working under another process's hold: never removes the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri(LEASE_FILE)

    def _record(self) -> bytes:
        now = _now()
        rec = {"owner": self.owner, "host": self.host, "pid": self.pid, "renewed_at": now,
               "expires_at": now + self.ttl_s}
        return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def read(self) -> dict[str, Any] | None:
        """The current lease record, or None when the version is free."""
        try:
            return json.loads(io_retry(lambda: self.store.fs.cat_file(self.store.path(LEASE_FILE)), f"read {self.uri}"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {"owner": "?", "host": "?", "pid": -1, "expires_at": 0.0}  # torn local write: treat as stale

    def _stale(self, rec: dict[str, Any]) -> bool:
        if float(rec.get("expires_at", 0)) < _now():
            return True
        return rec.get("host") == self.host and rec.get("owner") != self.owner and not _pid_alive(int(rec["pid"]))

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> VersionLease:
        """Take (or join) the lease; wait up to ``wait_s`` for another build to release it."""
        deadline = _now() + wait_s
        while True:
            if create_exclusive(self.store, self._record(), LEASE_FILE):
                break
            rec = self.read()
            if rec is None:
                continue
            if rec.get("owner") == self.owner:
                io_retry(lambda: self.store.write_bytes(self._record(), LEASE_FILE), f"renew {self.uri}")
                break
            if self._stale(rec):
                log.warning(
                    "taking over stale lease %s of %s (host %s, pid %s)",
                    self.uri,
                    rec.get("owner"),
                    rec.get("host"),
                    rec.get("pid"),
                )
                io_retry(lambda: self.store.remove(LEASE_FILE), f"remove {self.uri}")
                continue
            if _now() >= deadline:
                raise LeaseHeldError(
                    f"dataset version {self.store.uri()} is being written by build {rec.get('owner')!r} "
                    f"(host {rec.get('host')}, pid {rec.get('pid')}, lease valid until "
                    f"{_iso(float(rec.get('expires_at', 0)))}). Wait for that build to finish, or, if it is dead "
                    f"on another host, delete {self.uri} and re-run."
                )
            time.sleep(poll_s)
        # Exclusive create plus a re-read closes most of the race between two builds breaking one stale lease.
        time.sleep(0.05)
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            raise LeaseHeldError(f"lost the race for {self.uri} to build {rec and rec.get('owner')!r}; re-run later")
        self.held, self._lost = True, None
        if self.heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name="realfake-lease", daemon=True)
            self._thread.start()
        return self

    def join(self) -> VersionLease:
        """Work under a lease that another process of the same build holds (same ``owner``): a shard-group
        worker or a child flow run. Takes nothing and renews nothing (the holder does); :meth:`check` before each
        commit then stops this worker as soon as the lease passes to another build.

        Raises:
            LeaseLostError: the version has no lease, or another build holds it.
        """
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            holder = f"build {rec.get('owner')!r}" if rec else "nobody"
            raise LeaseLostError(
                f"this worker belongs to build {self.owner!r}, but the lease {self.uri} is held by {holder}: the "
                "build that started it has ended or lost the version; re-run that build"
            )
        self.held, self._lost, self.heartbeat, self._joined = True, None, False, True
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as e:  # a failed renewal is retried at the next beat; check() reports a loss
                log.warning("lease renewal of %s failed: %s", self.uri, e)

    def renew(self) -> None:
        """Extend the lease; marks it lost if another build took it over."""
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            self._lost = f"lease {self.uri} now held by {rec and rec.get('owner')!r}"
            self._stop.set()
            return
        io_retry(lambda: self.store.write_bytes(self._record(), LEASE_FILE), f"renew {self.uri}")

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this build still holds the lease (called before each commit)."""
        if not self.held:
            raise LeaseLostError(f"lease {self.uri} is not held: acquire it before writing")
        if self._lost:
            raise LeaseLostError(self._lost)
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            self._lost = f"lease {self.uri} now held by {rec and rec.get('owner')!r}"
            raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Give the lease back (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held and not self._joined:
            rec = self.read()
            if rec is not None and rec.get("owner") == self.owner:
                io_retry(lambda: self.store.remove(LEASE_FILE), f"remove {self.uri}")
        self.held = False

    def __enter__(self) -> VersionLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
