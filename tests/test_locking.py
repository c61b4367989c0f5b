"""Tests for prefork.common.locking: exclusion between processes, and the re-open when the
lock file was deleted or replaced while we waited for it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import procfs
import pytest
from harness import REPO, scaled, wait_for

from prefork.common.locking import lock_file, try_lock_file

DEADLINE = scaled(10.0)  # for waits on a subprocess or a thread

TRY_IN_OTHER_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
from prefork.common.locking import try_lock_file
print("busy" if try_lock_file(sys.argv[2]) is None else "locked")
"""


def _try_in_other_process(path: Path) -> str:
    return subprocess.run(
        [sys.executable, "-c", TRY_IN_OTHER_PROCESS, str(REPO), str(path)],
        check=True, capture_output=True, text=True, timeout=DEADLINE,
    ).stdout.strip()


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    fd = lock_file(str(path))
    try:
        assert _try_in_other_process(path) == "busy"
    finally:
        os.close(fd)
    assert _try_in_other_process(path) == "locked"


def test_lock_file_is_created_private_and_fd_not_inherited(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    old = os.umask(0o022)
    try:
        fd = lock_file(str(path))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not os.get_inheritable(fd)
        assert os.fstat(fd).st_ino == path.stat().st_ino
    finally:
        os.close(fd)


def test_try_lock_file(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    first = try_lock_file(path)
    assert first is not None
    try:
        assert try_lock_file(path) is None  # flock is per open file, even in one process
    finally:
        os.close(first)
    again = try_lock_file(path)
    assert again is not None
    os.close(again)


def _wait_for_flock_waiter(path: Path) -> None:
    """Wait until some process waits for a flock on ``path``'s inode (/proc/locks)."""
    wait_for(lambda: procfs.flock_waited_for(str(path)),
             what=f"somebody to wait for the lock on {path}")


@pytest.mark.parametrize("replace", [True, False], ids=["replaced", "deleted"])
def test_lock_reopens_when_the_file_changed_while_waiting(tmp_path: Path, replace: bool) -> None:
    path = tmp_path / "lock"
    held = lock_file(str(path))
    old_ino = os.fstat(held).st_ino
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(lock_file(str(path))))
    try:
        waiter.start()
        _wait_for_flock_waiter(path)  # the waiter has opened the old inode and blocks on it
        path.unlink()  # what a cleanup does, holding the lock
        if replace:
            path.write_bytes(b"new")  # another party made a new lock file
    finally:
        os.close(held)
        waiter.join(DEADLINE)
    assert not waiter.is_alive()
    (fd,) = got
    try:
        locked = os.fstat(fd)
        assert locked.st_nlink == 1  # not the deleted file
        assert (locked.st_dev, locked.st_ino) == (path.stat().st_dev, path.stat().st_ino)
        if replace:
            assert locked.st_ino != old_ino
            assert os.pread(fd, 3, 0) == b"new"
        assert _try_in_other_process(path) == "busy"
    finally:
        os.close(fd)
