"""Warm sandboxes: started ahead of demand with one policy (and one template, or the runtime's default
root), each handed out once, never reused.

A pooled sandbox is as fresh as a new one: nothing has run in it but its agent. It has no network (a
broker and its secrets belong to one caller) and no caller environment yet; the manager gives it the
caller's variables when it hands it out. The pool refills one sandbox at a time, and only once creates
have paused for QUIET seconds (or it ran dry), so a burst of creates is not slowed by the refill; it
replaces sandboxes that waited longer than ``max_age``. A template's pooled sandbox holds the template in
use (a lease, like any sandbox of it) until it is handed out and ends; its start command runs when it is
handed out, recorded under the caller's sandbox like any create's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from .policy import Policy
from .runtime.base import Runtime, RuntimeSandbox, SandboxSpec

log = logging.getLogger("stockade.pool")
QUIET = 0.25


class WarmPool:
    def __init__(self, runtime: Runtime, policy: Policy, size: int, new_id: Callable[[], str],
                 max_age: float = 600.0, template: str | None = None) -> None:
        self.runtime, self.policy, self.size, self.max_age = runtime, policy, size, max_age
        self.template = template
        self._new_id = new_id
        self.ready: deque[tuple[RuntimeSandbox, float]] = deque()
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._last_take = 0.0

    def start(self) -> None:
        self._wanted.set()
        self._filler = asyncio.get_running_loop().create_task(self._fill_forever())

    def matches(self, policy: Policy) -> bool:
        return policy.network.mode == "none" and policy == self.policy

    async def take(self) -> RuntimeSandbox | None:
        """A live warm sandbox, or None (the caller starts one itself)."""
        self._wanted.set()
        self._last_take = time.monotonic()
        while self.ready:
            sandbox, born = self.ready.popleft()
            if sandbox.is_alive() and not sandbox.channel.closed and time.monotonic() - born < self.max_age:
                return sandbox
            await sandbox.stop()
        return None

    async def _fill_forever(self) -> None:
        failures = 0
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            now = time.monotonic()
            while self.ready and now - self.ready[0][1] >= self.max_age:  # too old: replace
                old, _ = self.ready.popleft()
                await old.stop()
            while len(self.ready) < self.size:
                if self.ready and time.monotonic() - self._last_take < QUIET:
                    await asyncio.sleep(QUIET)
                    continue
                try:
                    sandbox = await self.runtime.start(SandboxSpec(self._new_id(), self.policy, template=self.template))
                except Exception as exc:  # noqa: BLE001 - the pool is an optimisation: log and back off
                    failures += 1
                    log.error("warm pool%s: cannot start a sandbox (%s); retrying",
                              f" of template {self.template!r}" if self.template else "", exc)
                    await asyncio.sleep(min(60.0, 2.0 ** failures))
                    continue
                failures = 0
                self.ready.append((sandbox, time.monotonic()))
            loop = asyncio.get_running_loop()
            loop.call_later(self.max_age / 2, self._wanted.set)  # look for stale ones now and then

    async def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        while self.ready:
            sandbox, _ = self.ready.popleft()
            with contextlib.suppress(Exception):
                await sandbox.stop()
