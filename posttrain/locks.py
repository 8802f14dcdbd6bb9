"""A lock file that holds on shared filesystems (NFS, Lustre), where fcntl/flock locks
are unreliable: the stage cache's training lock, taken by runs on different nodes.

Taking it is one atomic create (O_CREAT|O_EXCL); the file records its owner (host,
pid, a unique token, time). While held, a heartbeat thread sets the file's mtime every
HEARTBEAT_S seconds. A waiter breaks a lock whose holder is gone: on the same host a
pid that no longer runs, on any host a heartbeat older than STALE_AFTER_S (so the
nodes' clocks must agree within a few minutes, as NTP keeps them). Breaking is an
atomic rename to a name of the waiter's own, so of several waiters only one wins; a
waiter that finds it renamed a lock other than the stale one it judged (taken afresh
in between) puts it back. Release removes the file only while it still holds our
token: a lock broken and retaken by another process is never deleted by its old holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from posttrain.artifacts import Area

HEARTBEAT_S = 30.0      # the holder refreshes the lock's mtime this often
STALE_AFTER_S = 300.0   # a heartbeat older than this (10 missed beats) means the holder is gone; well
                        # above the minute NFS clients may cache a file's attributes (acregmax)
POLL_S = 1.0            # a blocked waiter looks again this often
# A lock file without an owner record is either being written (for microseconds after its
# create) or an empty file left by posttrain versions that locked with filelock (which
# never removed it, so every key trained before has one): gone once this old.
UNOWNED_AFTER_S = 10.0


def lock_timeout():
    """filelock's Timeout: what callers of the old FileLock catch (imported lazily, as before)."""
    from filelock import Timeout

    return Timeout


class SharedFileLock:
    """The interface training.py used of filelock.FileLock: acquire(timeout) raising
    filelock.Timeout, release(), a context manager. Not re-entrant: one holder per object."""

    def __init__(self, path: Path | str, area: Area, poll_s: float = POLL_S,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(path)
        self.area = area
        self.poll_s, self.heartbeat_s, self.stale_after_s = poll_s, heartbeat_s, stale_after_s
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def is_locked(self) -> bool:
        """Whether this object holds the lock."""
        return self.token is not None

    def acquire(self, timeout: float = -1, poll_interval: float | None = None) -> "SharedFileLock":
        """Take the lock; wait at most `timeout` seconds (0: one try, negative: forever)."""
        if self.token is not None:
            return self
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            if self._try_take():
                return self
            owner = read_owner(self.path)
            if owner is not None and self._stale(owner):
                self._break(owner)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise lock_timeout()(str(self.path))
            time.sleep(self.poll_s if poll_interval is None else poll_interval)

    def _try_take(self) -> bool:
        token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "time": time.time()}
        if not self.area.create_new(self.path, (json.dumps(record) + "\n").encode()):
            return False
        # Believe the file, not the create's return (a retried NFS create may report wrongly).
        if (read_owner(self.path) or {}).get("token") != token:
            return False
        self.token = token
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock heartbeat {self.path.name}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (read_owner(self.path) or {}).get("token") != self.token:
                return  # broken by a waiter (this process looked dead or frozen): nothing to refresh
            try:
                self.area.touch(self.path)
            except OSError:
                pass  # a filesystem hiccup: the next beat tries again

    def _stale(self, owner: dict) -> bool:
        """The holder is gone: its pid no longer runs on this host, or its heartbeat stopped
        (a file with no owner record: see UNOWNED_AFTER_S)."""
        if "token" not in owner:
            return time.time() - owner["mtime"] > min(UNOWNED_AFTER_S, self.stale_after_s)
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
                and not pid_alive(owner["pid"]):
            return True
        return time.time() - owner["mtime"] > self.stale_after_s

    def _break(self, owner: dict) -> None:
        """Rename the stale lock aside (one waiter wins the rename); put back one that was
        taken afresh between our look and our rename."""
        aside = self.path.with_name(f"{self.path.name}.broken-{uuid.uuid4().hex}")
        try:
            self.area.replace(self.path, aside)
        except FileNotFoundError:
            return  # another waiter broke it first
        moved = read_owner(aside)
        if moved is not None and moved.get("token") != owner.get("token") and not self._stale(moved):
            self.area.create_new(self.path, aside.read_bytes())  # a live lock: restore it (unless retaken)
        self.area.unlink(aside)

    def release(self, force: bool = False) -> None:
        """Drop the lock: the file is removed only while it still holds our token."""
        if self.token is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if (read_owner(self.path) or {}).get("token") == self.token:
            self.area.unlink(self.path)
        self.token, self._beat = None, None

    def __enter__(self) -> "SharedFileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "token", None) is not None:
            self.release()


def read_owner(path: Path) -> dict | None:
    """The lock file's owner record plus its mtime; None when there is no lock file. A file
    caught between its create and its write (empty, or torn) counts as owned by nobody
    known, so only its heartbeat age can make it stale."""
    try:
        mtime = path.stat(follow_symlinks=False).st_mtime
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return {"mtime": time.time()}  # unreadable now (NFS): not stale
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    record["mtime"] = mtime
    return record


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks, sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process: alive
    return True
