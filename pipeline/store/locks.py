"""Exclusive file locks that leave no lock file behind.

A plain ``flock`` lock file must stay on disk forever: deleting it while another process
waits on it lets a third process lock a fresh file of the same name, and two then hold
"the" lock. Here the holder deletes the file before releasing, and a process that wins the
lock checks that the file it locked is still the one at the path (same inode); if not it
retries. So locks are removed on exit and never shared. POSIX only (``fcntl``).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockedError(RuntimeError):
    """Another process holds the lock (non-blocking mode); the message names the lock file."""


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def exclusive_lock(path: Path, wait: bool = True, what: str = "") -> Iterator[None]:
    """Hold ``path`` exclusively. ``wait=False`` raises ``LockedError`` at once instead of
    waiting; ``what`` names the work in that message (e.g. ``pipeline train``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(
                    f"{path}: locked by process {_owner(path)}: another {what or 'run'} is "
                    "using this directory; wait for it to finish (or stop it) and retry"
                ) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: nobody can lock this inode after
        os.close(fd)
