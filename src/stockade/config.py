"""Host-side settings, from the environment. The policy says what a sandbox may do; this says where
stockade keeps its state on this host and which runtime runs sandboxes. Each runtime reads its own part
(the jail's: ``runtime/jail/config.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import StockadeError


@dataclass(frozen=True)
class HostConfig:
    state_dir: Path         # what lives as long as the sandboxes: locks, sockets, the compiled agent
    data_dir: Path          # what outlives sandboxes and reboots: the sandbox environment, artifacts
    sandbox_env: Path       # the Python environment mounted read-only into every sandbox (if built)
    host_groups: dict[str, list[str]]   # named egress rule lists a policy refers to as "@name"
    database_url: str | None = None     # the audit log's store; None: SQLite in data_dir
    audit_retention: float = 30 * 86400 # seconds audit events are kept
    runtime: str = "jail"               # the runtime sandboxes get unless they ask for another

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
        return cls(state_dir=state, data_dir=data, sandbox_env=sandbox_env,
                   host_groups=_host_groups(env.get("STOCKADE_HOST_GROUPS")),
                   database_url=env.get("STOCKADE_DATABASE_URL") or None,
                   audit_retention=_duration("STOCKADE_AUDIT_RETENTION", env.get("STOCKADE_AUDIT_RETENTION"),
                                             30 * 86400),
                   runtime=env.get("STOCKADE_RUNTIME") or "jail")


def _duration(name: str, text: str | None, default: float) -> float:
    if not text:
        return default
    from .policy import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise StockadeError(f"{name}={text!r}: {exc}") from None


def _host_groups(path: str | None) -> dict[str, list[str]]:
    """``[groups]`` of a TOML file: ``name = ["host", "*.domain:443", ...]``. None are built in."""
    if not path:
        return {}
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StockadeError(f"STOCKADE_HOST_GROUPS={path}: cannot read the host groups: {exc}") from None
    groups = data.get("groups", {})
    if not isinstance(groups, dict) or not all(
            isinstance(v, list) and all(isinstance(r, str) for r in v) for v in groups.values()):
        raise StockadeError(f"{path}: [groups] must map names to lists of host rules")
    return {str(k): list(v) for k, v in groups.items()}
