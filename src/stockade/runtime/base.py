"""The interface every runtime implements (jail now; a microVM and pods later)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from ..policy import Policy
from .channel import AgentChannel

BROKER_DIR = "/run/stockade"  # where the egress broker's socket appears inside every sandbox


class RuntimeSandbox(ABC):
    """One running sandbox as its runtime sees it."""

    id: str
    channel: AgentChannel
    python: str  # the interpreter code contexts run on, as a path inside the sandbox

    @abstractmethod
    async def stop(self) -> None:
        """Kill everything in the sandbox and remove every trace of it on the host. Idempotent."""

    @abstractmethod
    def is_alive(self) -> bool:
        """Whether the sandbox's processes are still running."""

    def memory_peak(self) -> int | None:
        """The most memory the sandbox has used, where the runtime can tell (for "ran out of memory")."""
        return None

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer has killed in the sandbox so far, or None where the runtime
        has no counter to tell (then a SIGKILL cannot be confirmed as an out-of-memory kill)."""
        return None

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """Runtime facts for ``info()``: isolation in force, host uid, cgroup, pids."""


class Runtime(ABC):
    name: str

    @abstractmethod
    def is_stale(self, sandbox_id: str) -> bool:
        """True when no live process owns this sandbox any more (its owner died without teardown)."""

    @abstractmethod
    async def sweep_stale(self) -> list[str]:
        """Remove what sandboxes of owners that died left on the host; returns their ids."""

    @abstractmethod
    async def start(self, sandbox_id: str, policy: Policy, envs: Mapping[str, str],
                    broker_dir: Path | None = None, files: Mapping[str, bytes] | None = None) -> RuntimeSandbox:
        """Start a sandbox whose agent is ready to serve requests; raise SandboxUnavailableError if the
        host cannot. ``broker_dir`` holds the egress broker's socket, to appear at BROKER_DIR inside;
        ``files`` are read-only files to place (sandbox path -> content), e.g. the trust bundle."""
