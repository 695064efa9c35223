"""The jail's host settings, from the environment (the generic ones are ``stockade.config.HostConfig``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import StockadeError

DEFAULT_UID_RANGE = (1_200_000_000, 1_200_065_535)


@dataclass(frozen=True)
class JailConfig:
    uid_range: tuple[int, int]   # as root: one host uid per sandbox from this range
    bwrap: str | None            # STOCKADE_BWRAP: which bubblewrap (else the wheel's, else the system's)
    python: str | None           # STOCKADE_PYTHON: the sandbox's python3 (under /usr)
    cgroup_parent: str           # the cgroup under which each sandbox gets its own
    # STOCKADE_WORKSPACE: what backs /home/user and /tmp: "auto" (disk images as root where loop devices
    # work, else tmpfs), "disk" (or refuse to start) or "tmpfs" (memory, charged to the memory cgroup)
    workspace: str = "auto"

    @classmethod
    def from_env(cls) -> JailConfig:
        env = os.environ
        return cls(uid_range=_uid_range(env.get("STOCKADE_UID_RANGE")), bwrap=env.get("STOCKADE_BWRAP") or None,
                   python=env.get("STOCKADE_PYTHON") or None,
                   cgroup_parent=env.get("STOCKADE_CGROUP_PARENT", "stockade"),
                   workspace=workspace_choice(env.get("STOCKADE_WORKSPACE")))


WORKSPACE_CHOICES = ("auto", "disk", "tmpfs")


def workspace_choice(text: str | None) -> str:
    """STOCKADE_WORKSPACE, checked (every runtime with disk workspaces reads it)."""
    if not text:
        return "auto"
    if text not in WORKSPACE_CHOICES:
        raise StockadeError(f"STOCKADE_WORKSPACE={text!r}: use one of {', '.join(WORKSPACE_CHOICES)}")
    return text


def _uid_range(text: str | None) -> tuple[int, int]:
    if not text:
        return DEFAULT_UID_RANGE
    try:
        low, high = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise StockadeError(f"STOCKADE_UID_RANGE={text!r}: use FIRST-LAST, e.g. 1200000000-1200065535") \
            from None
    if not 1000 <= low <= high < 2**32 - 1:
        raise StockadeError(f"STOCKADE_UID_RANGE={text!r}: need 1000 <= FIRST <= LAST < 4294967295")
    return low, high
