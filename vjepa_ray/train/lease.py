"""One driver per run folder: a lease file that names the driver holding the folder and when it last said so.

Two drivers on one run folder would resume the same checkpoint, write the same ``step_*`` names, rotate each
other's checkpoints and overwrite ``summary.json``. The driver therefore takes ``<run folder>/driver.lease``
before any worker starts and renews it every ``HEARTBEAT_S`` from a thread; a second driver that finds a live
lease stops with one line naming the owner and the age of its heartbeat (a ConfigError: exit 2). A lease is
stale, and taken over with a warning, when its heartbeat is older than ``STALE_AFTER_S`` or its owner is a
process of this machine that no longer exists (a killed driver restarted on the same machine goes on at once).

Creating the lease is atomic on local disk (``O_EXCL``). pyarrow's object stores offer no conditional write, so
there the lease is written, left to settle for ``SETTLE_S`` and read back: the driver whose lease is read back
holds it. Two drivers started within one request's latency of each other could still both pass; clocks of the
machines are assumed to agree within seconds of ``STALE_AFTER_S``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from vjepa_ray import runs
from vjepa_ray.config import ConfigError

log = logging.getLogger(__name__)

LEASE_FILE = "driver.lease"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
SETTLE_S = 2.0
# A lease read while its owner rewrites it can come back torn on an object store (pyarrow asks an object's size,
# then reads that many bytes of whatever object is there by then): such a read is tried again before the lease
# counts as unreadable, which would make a live driver's lease look stale.
READ_ATTEMPTS = 3
READ_RETRY_S = 0.1


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: the driver's user, host and process, a token of its own, and its times (unix s)."""

    user: str
    host: str
    pid: int
    token: str
    since: float
    heartbeat: float

    def describe(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid}"

    def is_gone(self, now: float, stale_after_s: float) -> bool:
        if now - self.heartbeat > stale_after_s:
            return True
        return self.host == socket.gethostname() and not _process_exists(self.pid)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLease:
    """The lease of run folder ``folder`` (a path or URI): ``acquire`` it (ConfigError when another driver holds
    it), ``release`` it when the run ends; a context manager does both."""

    def __init__(self, folder: str, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 settle_s: float = SETTLE_S):
        self.folder, self.path = folder, runs.join(folder, LEASE_FILE)
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        now = time.time()
        self.owner = Owner(getpass.getuser(), socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> Owner | None:
        """The lease's owner as the store has it now, or None when there is no lease (or one that stays
        unreadable over ``READ_ATTEMPTS`` reads)."""
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(READ_RETRY_S)
            try:
                return self._read()
            except (OSError, ValueError, TypeError) as err:
                problem = err
        log.warning("%s is unreadable (%s): treating it as stale", self.path, problem)
        return None

    def _read(self) -> Owner | None:
        try:
            if not runs.is_file(self.path):
                return None
            return Owner(**json.loads(runs.read_bytes(self.path)))
        except FileNotFoundError:  # released between the two calls
            return None

    def acquire(self) -> None:
        held = self.holder()
        if held is not None:
            now = time.time()
            if not held.is_gone(now, self.stale_after_s):
                raise self._busy(held, now)
            log.warning("taking over the lease of %s from %s (heartbeat %.0f s ago; that driver is gone)",
                        self.folder, held.describe(), now - held.heartbeat)
            runs.delete_file(self.path)
        self._create()
        self._thread = threading.Thread(target=self._renew, name="run-folder-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self.holder()
        if held is not None and held.token == self.owner.token:
            runs.delete_file(self.path)

    def _busy(self, held: Owner, now: float) -> ConfigError:
        return ConfigError("meta.name", f"run folder {self.folder} is in use by the driver {held.describe()} "
                           f"(started {now - held.since:.0f} s ago, heartbeat {now - held.heartbeat:.0f} s ago); "
                           f"wait for it to end or stop it, or use another meta.name")

    def _create(self) -> None:
        data = json.dumps(asdict(self.owner)).encode()
        if not runs.is_uri(self.path):
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise self._busy(self.holder() or self.owner, time.time()) from None
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return
        runs.write_bytes(self.path, data)
        time.sleep(self.settle_s)
        held = self.holder()
        if held is None or held.token != self.owner.token:
            raise self._busy(held or self.owner, time.time())

    def _write(self, owner: Owner) -> None:
        data = json.dumps(asdict(owner)).encode()
        if runs.is_uri(self.path):
            runs.write_bytes(self.path, data)
            return
        # Readers never see a half-written lease.
        partial = Path(f"{self.path}.{self.owner.token}")
        partial.write_bytes(data)
        os.replace(partial, self.path)

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.holder()
                if held is None or held.token != self.owner.token:
                    log.error("lost the lease of %s to %s: another driver took the run folder over", self.folder,
                              held.describe() if held else "nobody")
                    return
                self._write(Owner(**{**asdict(self.owner), "heartbeat": time.time()}))
            except OSError as err:  # the store may be away for a while: the next heartbeat tries again
                log.warning("could not renew the lease of %s: %s", self.folder, err)
