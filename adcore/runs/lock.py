"""One lock per run key, so that two runners on one runs directory never execute the same run at once.

The lock is the file ``<run_dir>/.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFS v3+),
holding who took it: host, pid, the pid's start time and a random token. While the run executes, a thread touches
the file every ``lease / 4`` seconds. A lock is stale, and the next runner takes it over, when

* its file has not been touched for ``lease`` seconds (the holder died, on any host, or lost the filesystem), or
* its holder ran on this host and that process is gone (a kill -9: no need to wait for the lease).

So a dead holder cannot keep a run forever, and a ``status.json`` left at "running" by a killed process reads as
"interrupted" (:func:`holder_alive` is what the runner asks).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
# Seconds without a heartbeat after which a lock is taken over; ADCORE_LOCK_LEASE changes it (tests shorten it).
LEASE_S = float(os.environ.get("ADCORE_LOCK_LEASE", "120"))


def _process_start(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), or None if no such process: tells a reused pid apart."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent: gone all the same
            return None
        return round(process.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def read_lock(run_dir) -> tuple[dict, float] | None:
    """``(holder, seconds since the last heartbeat)`` of the run's lock, or None when it is not locked."""
    path = Path(run_dir) / LOCK_NAME
    try:
        age = time.time() - path.stat().st_mtime
        return json.loads(path.read_text()), age
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}, 0.0  # being written this very moment: a live holder


def holder_alive(holder: dict, age: float, lease: float | None = None) -> bool:
    """Whether the process that wrote ``holder`` can still be running the run."""
    if age > (LEASE_S if lease is None else lease):
        return False
    if holder.get("host") == socket.gethostname() and "pid" in holder:
        return _process_start(holder["pid"]) == holder.get("pid_started")
    return True


def describe(holder: dict) -> str:
    return f"{holder.get('host', '?')}:{holder.get('pid', '?')}"


class RunLock:
    """``with RunLock(run_dir) as lock: if lock.acquired: ...`` — never blocks; ``holder`` names who has it."""

    def __init__(self, run_dir, lease: float | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.lease = LEASE_S if lease is None else lease
        self.token = secrets.token_hex(8)
        self.acquired = False
        self.holder: dict = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _create(self) -> bool:
        pid = os.getpid()
        me = {"host": socket.gethostname(), "pid": pid, "pid_started": _process_start(pid), "token": self.token,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        self.holder = me
        return True

    def _break_stale(self) -> bool:
        """Remove the lock if its holder is dead. Renaming first makes two breakers race safely: only one rename
        succeeds, and a breaker that finds it renamed a fresh lock (taken between its check and its rename) puts
        it back."""
        found = read_lock(self.path.parent)
        if found is None:
            return True
        holder, age = found
        if not holder or holder_alive(holder, age, self.lease):
            self.holder = holder
            return False
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # another runner broke it first
        try:
            if json.loads(aside.read_text()).get("token") != holder.get("token"):
                try:
                    os.link(aside, self.path)  # not the lock we judged dead: give it back
                except FileExistsError:
                    pass
                return False
        except (OSError, json.JSONDecodeError):
            pass
        finally:
            aside.unlink(missing_ok=True)
        return True

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.acquired = True
                self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path.parent.name}",
                                              daemon=True)
                self._beat.start()
                return True
            if not self._break_stale():
                return False
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the filesystem went away for a moment; the lease allows for it

    def release(self) -> None:
        if not self.acquired:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        found = read_lock(self.path.parent)
        if found and found[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.acquired = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
