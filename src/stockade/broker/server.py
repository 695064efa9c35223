"""One broker endpoint per sandbox: a Unix socket on the host, and the sandbox's event log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from ..policy import NetworkPolicy
from .proxy import Egress, Resolver, serve, system_resolver
from .rules import Rules

EVENTS_KEPT = 10000  # in memory, for sandbox.network.events(); the JSONL file keeps all


def rules_for(policy: NetworkPolicy) -> Rules:
    return Rules(list(policy.allow), list(policy.deny), list(policy.allow_private))


class BrokerEndpoint:
    def __init__(self, sandbox_id: str, policy: NetworkPolicy, socket_dir: Path, log_path: Path,
                 resolver: Resolver = system_resolver) -> None:
        self.socket_dir = socket_dir
        self.log_path = log_path
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.egress = Egress(sandbox_id, rules_for(policy), policy.max_connections, policy.max_egress_bytes,
                             self._record, resolver)
        self._server: asyncio.AbstractServer | None = None
        self._log: TextIO | None = None

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / "broker.sock"

    async def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in stop()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o666)  # the sandbox's uid connects; only this sandbox sees the file

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.egress.tasks.add(task)
        try:
            await serve(reader, writer, self.egress)
        finally:
            if task is not None:
                self.egress.tasks.discard(task)

    def update(self, policy: NetworkPolicy) -> None:
        """New rules and limits apply to new connections at once."""
        self.egress.rules = rules_for(policy)
        self.egress.max_connections = policy.max_connections
        self.egress.max_egress_bytes = policy.max_egress_bytes

    def _record(self, event: dict[str, Any]) -> None:
        event.pop("established", None)
        self.events.append(event)
        if self._log is not None:
            self._log.write(json.dumps(event) + "\n")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self.egress.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.egress.tasks, return_exceptions=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)
