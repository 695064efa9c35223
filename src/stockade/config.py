"""Host-side settings, from the environment. The policy says what a sandbox may do; this says where
stockade keeps its state on this host and which resources it may hand out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import StockadeError

DEFAULT_UID_RANGE = (1_200_000_000, 1_200_065_535)


@dataclass(frozen=True)
class HostConfig:
    state_dir: Path
    uid_range: tuple[int, int]
    bwrap: str | None
    python: str | None
    cgroup_parent: str
    data_dir: Path          # what outlives sandboxes and reboots: the sandbox environment, artifacts
    sandbox_env: Path       # the Python environment mounted read-only into every sandbox (if built)

    @classmethod
    def from_env(cls) -> HostConfig:
        env = os.environ
        if "STOCKADE_STATE_DIR" in env:
            state = Path(env["STOCKADE_STATE_DIR"])
        elif os.geteuid() == 0:
            state = Path("/run/stockade")
        else:
            runtime = env.get("XDG_RUNTIME_DIR")
            if runtime and os.access(runtime, os.W_OK):
                state = Path(runtime) / "stockade"
            else:
                state = Path(f"/tmp/stockade-{os.geteuid()}")
        if "STOCKADE_DATA_DIR" in env:
            data = Path(env["STOCKADE_DATA_DIR"])
        elif os.geteuid() == 0:
            data = Path("/var/lib/stockade")
        else:
            data = Path(env.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "stockade"
        sandbox_env = Path(env["STOCKADE_SANDBOX_ENV"]) if env.get("STOCKADE_SANDBOX_ENV") else data / "envs/default"
        return cls(state_dir=state, uid_range=_uid_range(env.get("STOCKADE_UID_RANGE")),
                   bwrap=env.get("STOCKADE_BWRAP") or None, python=env.get("STOCKADE_PYTHON") or None,
                   cgroup_parent=env.get("STOCKADE_CGROUP_PARENT", "stockade"), data_dir=data,
                   sandbox_env=sandbox_env)


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
