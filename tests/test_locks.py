"""The cache's training lock on shared filesystems: atomic create, heartbeat, breaking stale locks."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import Timeout

from posttrain.artifacts import Area
from posttrain.cache import Cache, is_locked
from posttrain.locks import SharedFileLock, read_owner

REPO = Path(__file__).resolve().parent.parent

CONTENDER = """
import sys, time
from pathlib import Path
from posttrain.artifacts import Area
from posttrain.locks import SharedFileLock
root, rounds = Path(sys.argv[1]), int(sys.argv[2])
lock = SharedFileLock(root / "k.lock", Area(root), poll_s=0.005)
for _ in range(rounds):
    with lock:
        inside = root / "inside"
        if inside.exists():
            sys.exit("two holders at once")
        inside.write_text("x")
        value = int((root / "counter").read_text())
        time.sleep(0.002)  # a read-modify-write that loses updates without mutual exclusion
        (root / "counter").write_text(str(value + 1))
        inside.unlink()
"""


def plant(path: Path, host: str, pid: int, age_s: float = 0.0, token: str = "theirs") -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "token": token, "time": time.time() - age_s}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_two_processes_never_hold_it_at_once(tmp_path):
    (tmp_path / "counter").write_text("0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), "40"], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert (tmp_path / "counter").read_text() == "80"   # no update lost
    assert not (tmp_path / "k.lock").exists()            # released by the last holder


def test_a_dead_pid_on_this_host_is_broken(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(tmp_path / "k.lock", socket.gethostname(), dead.pid)
    lock = SharedFileLock(tmp_path / "k.lock", Area(tmp_path))
    lock.acquire(timeout=0)
    assert read_owner(tmp_path / "k.lock")["token"] == lock.token
    lock.release()
    assert not list(tmp_path.iterdir())   # neither the lock nor the broken one's aside copy remains


def test_a_stale_heartbeat_from_another_host_is_broken(tmp_path):
    plant(tmp_path / "k.lock", "another-node", 1, age_s=10 * 60)
    with SharedFileLock(tmp_path / "k.lock", Area(tmp_path)) as lock:
        assert read_owner(tmp_path / "k.lock")["token"] == lock.token


@pytest.mark.parametrize("host,pid", [("another-node", 1), (socket.gethostname(), os.getpid())],
                         ids=["another-host", "this-process"])
def test_a_live_lock_is_not_broken(tmp_path, host, pid):
    plant(tmp_path / "k.lock", host, pid, age_s=60)   # heartbeat a minute old: alive
    lock = SharedFileLock(tmp_path / "k.lock", Area(tmp_path), poll_s=0.01)
    with pytest.raises(Timeout):
        lock.acquire(timeout=0)
    with pytest.raises(Timeout):
        lock.acquire(timeout=0.05)   # blocking with a deadline polls, then gives up
    assert read_owner(tmp_path / "k.lock")["token"] == "theirs"


def test_release_leaves_a_lock_someone_else_now_holds(tmp_path):
    lock = SharedFileLock(tmp_path / "k.lock", Area(tmp_path)).acquire()
    # Meanwhile a waiter judged us gone, broke the lock and took it.
    os.unlink(tmp_path / "k.lock")
    plant(tmp_path / "k.lock", "another-node", 7)
    lock.release()
    assert read_owner(tmp_path / "k.lock")["token"] == "theirs"


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    lock = SharedFileLock(tmp_path / "k.lock", Area(tmp_path), heartbeat_s=0.02, stale_after_s=0.5).acquire()
    try:
        os.utime(tmp_path / "k.lock", (time.time() - 3600, time.time() - 3600))
        time.sleep(0.2)
        assert time.time() - (tmp_path / "k.lock").stat().st_mtime < 0.5
        with pytest.raises(Timeout):  # so a waiter with a short threshold still sees it alive
            SharedFileLock(tmp_path / "k.lock", Area(tmp_path), stale_after_s=0.5).acquire(timeout=0)
    finally:
        lock.release()


def test_cache_lock_and_is_locked(tmp_path):
    cache = Cache(tmp_path / "cache")
    key = "c" * 64
    with cache.lock(key):
        assert is_locked(Cache(cache.root), key)
        with pytest.raises(Timeout):
            cache.lock(key).acquire(timeout=0)
    assert not is_locked(cache, key)


def test_an_empty_lock_file_left_by_filelock_is_taken_over(tmp_path):
    """Earlier versions locked with filelock, which leaves an empty file behind; one being
    created right now (no owner record yet) is waited for."""
    (tmp_path / "k.lock").write_text("")
    with pytest.raises(Timeout):
        SharedFileLock(tmp_path / "k.lock", Area(tmp_path)).acquire(timeout=0)
    os.utime(tmp_path / "k.lock", (time.time() - 60, time.time() - 60))
    with SharedFileLock(tmp_path / "k.lock", Area(tmp_path)) as lock:
        assert read_owner(tmp_path / "k.lock")["token"] == lock.token


def test_a_waiter_that_renamed_a_lock_taken_afresh_puts_it_back(tmp_path):
    """Between a waiter's look (stale) and its rename, another waiter broke the lock and took
    it: the rename catches the new, live lock, which must be restored, not destroyed."""
    path = tmp_path / "k.lock"
    plant(path, "another-node", 1, age_s=3600)
    stale = read_owner(path)
    waiter = SharedFileLock(path, Area(tmp_path))
    assert waiter._stale(stale)
    os.unlink(path)
    plant(path, "another-node", 2, token="fresh")   # broken and retaken meanwhile
    waiter._break(stale)
    assert read_owner(path)["token"] == "fresh" and [p.name for p in tmp_path.iterdir()] == ["k.lock"]
    with pytest.raises(Timeout):
        waiter.acquire(timeout=0)
