"""The interface every runtime implements: the jail now; gVisor, a microVM and pods next.

A runtime starts a sandbox from a spec and hands back a channel to the agent inside. Whatever crosses the
boundary besides the channel is the runtime's to carry and to place: the egress (connections from inside,
handed to the broker), read-only files such as the trust bundle, and the paths and ports they appear at
inside (``SandboxLayout``). The core asks the runtime for these and hard-codes none of them.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import HostConfig
from ..policy import Policy
from .agent_client import AgentClient
from .channel import AgentChannel

if TYPE_CHECKING:
    from ..templates import TemplateConfig
    from ..templates.snapshot import SnapshotSource

# One connection from inside the sandbox to the broker: a connected stream socket on the host and the
# one-byte selector the sandbox sent first (b"H": HTTP proxy, b"S": SOCKS5). The runtime carries it (a
# descriptor passed over a bind-mounted socket for the jail, a vsock stream for a VM); the broker serves it.
EgressHandler = Callable[[socket.socket, bytes], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class SandboxLayout:
    """Where things are inside a sandbox of this runtime."""

    home: str = "/home/user"
    broker: str = "/run/stockade/broker.sock"   # what the agent's proxy bridge connects to
    trust_bundle: str = "/etc/ssl/certs/ca-certificates.crt"   # the host's bundle plus the sandbox's CA
    sandbox_ca: str = "/opt/stockade/ca.pem"
    http_proxy_port: int = 3128                  # where clients inside find the broker (127.0.0.1)
    socks_port: int = 1080
    # False: the bridge passes each connection's descriptor to the broker (a kernel shared with the host);
    # True: it relays the bytes over a stream of its own (a runtime with a kernel of its own)
    egress_relay: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """What a runtime needs to start one sandbox."""

    id: str
    policy: Policy
    envs: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)   # read-only files to place (path -> content)
    egress: EgressHandler | None = None   # None: no way out at all (network.mode = "none")
    template: str | None = None   # the template whose layers are the root (None: the runtime's default root)
    # A build step (templates/build.py, in-process only): commands run as the template's USER as the image
    # means it, its root included, in a private block of host ids (runtimes that cannot: UnenforceableError)
    build_step: bool = False


class RuntimeSandbox(ABC):
    """One running sandbox as its runtime sees it."""

    id: str
    channel: AgentChannel
    python: list[str]  # the argv that starts the interpreter code contexts run on, inside the sandbox
    # what that python runs: the bytecode compiled by the host's python, or (a template's own python, of
    # whatever version) the source
    python_script: str = "interpreter.pyc"
    layout: SandboxLayout = SandboxLayout()  # where things are inside it: its runtime's layout
    # a template sandbox's config (its start and ready commands run before it is handed out)
    template_config: TemplateConfig | None = None

    @property
    def agent(self) -> AgentClient:
        """The agent's operations over this sandbox's channel."""
        return AgentClient(self.channel)

    @abstractmethod
    async def stop(self) -> None:
        """Kill everything in the sandbox and remove every trace of it on the host. Idempotent."""

    @abstractmethod
    def is_alive(self) -> bool:
        """Whether the sandbox's processes are still running."""

    def memory_peak(self) -> int | None:
        """The most memory the sandbox has used, where the runtime can tell."""
        return None

    def memory_usage(self) -> tuple[int, int] | None:
        """(bytes of memory charged to the sandbox now, of which page cache), where the runtime can tell
        (a memory cgroup); None: the caller sums what the agent sees (resident memory)."""
        return None

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer has killed in the sandbox so far, or None where the runtime
        has no counter to tell (then a SIGKILL cannot be confirmed as an out-of-memory kill)."""
        return None

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """Runtime facts for ``info()``: the runtime's name under "runtime", isolation in force, host ids."""

    def snapshot_source(self) -> SnapshotSource:
        """Where this sandbox's changes are, for a snapshot (templates/snapshot.py). A runtime that cannot
        say raises a PolicyError or SandboxUnavailableError that says why."""
        from ..errors import UnenforceableError

        raise UnenforceableError(f"the {self.describe().get('runtime')} runtime cannot snapshot a sandbox")


class Runtime(ABC):
    """Made once per process by ``registry.make_runtime(name, config)``; its own settings it reads itself."""

    name: str
    layout: SandboxLayout = SandboxLayout()
    config: HostConfig

    @abstractmethod
    def __init__(self, config: HostConfig | None = None) -> None:
        """Check that this host can run the runtime (SandboxUnavailableError, with the fix, if not)."""

    @classmethod
    def unmet_requirement(cls) -> str | None:
        """A requirement of this host the runtime cannot start without, told without starting it (the
        test suite skips such a runtime for that reason only); None: it may run here."""
        return None

    @abstractmethod
    async def start(self, spec: SandboxSpec) -> RuntimeSandbox:
        """Start a sandbox whose agent is ready to serve requests; raise SandboxUnavailableError if the
        host cannot, UnenforceableError if the policy asks for a control this runtime cannot give."""

    @abstractmethod
    async def sweep_stale(self) -> list[str]:
        """Remove what sandboxes of owners that died (a SIGKILLed server) left on the host; their ids."""

    @abstractmethod
    def leftovers(self, sandbox_id: str, described: Mapping[str, object] | None = None) -> list[str]:
        """What of a sandbox still exists on the host (processes, cgroups, mounts, sockets, state files), in
        words; empty when it is all gone. ``described`` is its ``describe()`` from when it ran, for a sandbox
        another process started (a server that was killed). The leak tests ask this, for every runtime."""
