"""One unprivileged host uid per sandbox, when stockade runs as root (or, for a build step, one block of
65536: ``UidAllocator(..., step=65536)``, whose first id is the step's root).

A uid is held by an flock on ``<state>/uids/<uid>.lock`` for the sandbox's life, so sandboxes started by
different processes never share one, and a crashed process's uids free themselves. A release removes the
file while still holding its lock; an acquirer that locked a file no longer at that path (removed, maybe
made anew by another) lets it go and tries again, so two holders never lock different files of one uid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path

from ...errors import SandboxUnavailableError


class UidLease:
    def __init__(self, uid: int, fd: int, path: Path) -> None:
        self.uid = uid
        self._fd = fd
        self._path = path

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()  # under the lock: see the module's docstring
            os.close(self._fd)
            self._fd = -1


class UidAllocator:
    def __init__(self, state_dir: Path, uid_range: tuple[int, int], step: int = 1) -> None:
        self.dir = state_dir / "uids"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.low, self.high = uid_range
        self.step = step

    def acquire(self) -> UidLease:
        size = (self.high - self.low) // self.step + 1
        start = secrets.randbelow(size)
        for i in range(min(size, 4096)):
            uid = self.low + (start + i) % size * self.step
            path = self.dir / f"{uid}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not _is_at(fd, path):  # removed under us: another acquirer's now
                os.close(fd)
                continue
            if _uid_has_processes(uid, self.step):  # left over (or still exiting): never share; leave no file
                UidLease(uid, fd, path).release()
                continue
            return UidLease(uid, fd, path)
        raise SandboxUnavailableError(
            f"no free sandbox uid in {self.low}-{self.high}",
            "fix: widen STOCKADE_UID_RANGE or kill idle sandboxes")


def _is_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _uid_has_processes(uid: int, count: int = 1) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if uid <= entry.stat().st_uid < uid + count:
                    return True
            except OSError:
                continue
    return False
