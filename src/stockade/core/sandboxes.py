"""What the core keeps per live sandbox and per create in flight, and the checks of what a caller hands in."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..artifacts import ArtifactError, ArtifactWriter
from ..audit import Redactor
from ..errors import PolicyError
from ..policy import Policy
from ..runtime.base import RuntimeSandbox, SandboxLayout
from ..runtime.channel import CommandPending
from ..sdk.models import SandboxMetrics

if TYPE_CHECKING:  # the broker (h11, ssl) is imported only by a sandbox with a network (core/egress.py)
    from ..broker.server import BrokerEndpoint

TOMBSTONES = 1024
METRICS_KEPT = 720          # samples per sandbox get_metrics keeps (an hour at one per 5 s)
ENV_NAME_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
Argv = list[str]  # spelled once here: a method named `list` shadows the builtin in class bodies


def new_sandbox_id() -> str:
    return "sbx-" + secrets.token_hex(8)


def check_envs(envs: Mapping[str, str] | None, field_name: str = "envs") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (envs or {}).items():
        if not isinstance(k, str) or not k or k[0].isdigit() or not set(k) <= ENV_NAME_OK:
            raise PolicyError(field_name, f"invalid environment variable name {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise PolicyError(f"{field_name}.{k}", "value must be a string without NUL bytes")
        out[k] = v
    return out


@dataclass
class CommandRecord:
    pid: int
    rid: int
    cmd: str
    pending: CommandPending
    background: bool
    timeout: float | None = None
    oom_before: int | None = None       # the sandbox's OOM-kill count when the command started


OUTPUT_RECORDED = 64 << 10   # per stream and command: what the audit log keeps of its output



@dataclass
class CodeContext:
    """A stateful interpreter inside a sandbox. ``alive`` is False after a crash or a kill: the next
    cell starts it afresh under the same id."""

    id: str
    language: str
    cwd: str
    backend: str = ""
    alive: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Reservation:
    """A create in flight: its owner's share of the quota until its sandbox is registered or the create fails."""

    tenant: str | None
    user_id: str | None
    memory: int
    cpus: float
    id: str = field(default_factory=lambda: "creating-" + secrets.token_hex(8))


@dataclass
class ManagedSandbox:
    id: str
    policy: Policy
    runtime: RuntimeSandbox
    metadata: dict[str, str]
    started_at: float                       # wall clock, for display
    deadline: float                         # loop time
    hard_deadline: float                    # loop time: creation + max_lifetime
    timer: asyncio.TimerHandle | None = None
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    uploads: dict[int, ArtifactWriter | ArtifactError] = field(default_factory=dict)  # artifacts arriving
    broker: BrokerEndpoint | None = None
    tenant: str | None = None
    user_id: str | None = None
    redact: Redactor = field(default_factory=Redactor)
    last_active: float = 0.0                # loop time of the last request or foreground work
    busy: int = 0                           # foreground commands and cells running now
    layout: SandboxLayout = field(default_factory=SandboxLayout)   # its runtime's paths and ports inside
    ready: bool = False     # its create returned it (a template's ready command succeeded): shown to its owner
    # the samples get_metrics took (the newest METRICS_KEPT), and the last (wall time, CPU seconds) reading
    metrics: deque[SandboxMetrics] = field(default_factory=lambda: deque(maxlen=METRICS_KEPT))
    cpu_mark: tuple[float, float] | None = None
    forwards: dict[int, asyncio.Server] = field(default_factory=dict)   # host listeners for ports inside

    @property
    def channel(self) -> Any:
        return self.runtime.channel


