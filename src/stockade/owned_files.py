"""Reading a file this host user wrote for itself (a cache, a stamp) only when nobody else could have: a
regular file, opened without following a symlink, owned by us, with none of the forbidden mode bits."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_own(path: Path, *, forbid: int, limit: int) -> bytes | None:
    """The first ``limit`` bytes, or None if the file is missing or anyone else could have written it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & forbid:
            return None
        return f.read(limit)
