"""One broker endpoint per sandbox: the egress rules, limits and secrets of that sandbox, serving each
connection its runtime carries out of it; its events go to the audit log. How a connection gets here (a
descriptor over a Unix socket, a vsock stream) is the runtime's business (``runtime.base.EgressHandler``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..policy import NetworkPolicy
from .proxy import Egress, serve
from .resolver import Resolver, system_resolver
from .rules import Rules, expand_groups

if TYPE_CHECKING:  # cryptography (through .secrets) is imported only by a policy with secrets
    from .secrets import BoundSecret, SandboxCA

EVENTS_KEPT = 10000  # in memory, for sandbox.network.events(); the audit log keeps all


def rules_for(policy: NetworkPolicy, groups: dict[str, list[str]]) -> Rules:
    return Rules(expand_groups(list(policy.allow), groups), expand_groups(list(policy.deny), groups),
                 list(policy.allow_private))


class BrokerEndpoint:
    def __init__(self, sandbox_id: str, policy: NetworkPolicy, on_event: Callable[[dict[str, Any]], None],
                 resolver: Resolver = system_resolver, secrets: list[BoundSecret] | None = None,
                 ca: SandboxCA | None = None, groups: dict[str, list[str]] | None = None) -> None:
        self.groups = dict(groups or {})
        self.on_event = on_event
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        upstream = None
        if secrets:
            from .secrets import upstream_context
            upstream = upstream_context(policy.extra_ca_certs)
        self.egress = Egress(sandbox_id, rules_for(policy, self.groups), policy.max_connections,
                             policy.max_egress_bytes, self._record, resolver, list(secrets or []), ca, upstream)
        self._stopped = False

    async def handle(self, client: socket.socket, kind: bytes) -> None:
        """Serve one client connection from inside the sandbox (the runtime's EgressHandler)."""
        if self._stopped:
            client.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self.egress.tasks.add(task)
        try:
            # server-side streams (as start_server makes them), so TLS can be terminated here for secrets
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=65536)
            connected: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
            protocol = asyncio.StreamReaderProtocol(reader, lambda _r, w: connected.set_result(w))
            try:
                await loop.connect_accepted_socket(lambda: protocol, sock=client)
                writer = await connected
            except BaseException:
                client.close()
                raise
            reader.feed_data(kind)  # serve() reads the selector first, whatever carried it
            await serve(reader, writer, self.egress)
        finally:
            if task is not None:
                self.egress.tasks.discard(task)

    def update(self, policy: NetworkPolicy) -> None:
        """New rules and limits apply to new connections at once."""
        self.egress.rules = rules_for(policy, self.groups)
        self.egress.max_connections = policy.max_connections
        self.egress.max_egress_bytes = policy.max_egress_bytes

    def _record(self, event: dict[str, Any]) -> None:
        event.pop("established", None)
        self.events.append(event)
        self.on_event(event)

    async def stop(self) -> None:
        """End every connection still open (the runtime stops carrying new ones with the sandbox)."""
        self._stopped = True
        current = asyncio.current_task()
        tasks = [t for t in self.egress.tasks if t is not current]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
