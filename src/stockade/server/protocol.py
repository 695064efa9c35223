"""uvicorn's h11 protocol with the bounds it lacks: a deadline for each request's head, an idle limit while
a body arrives, and a cap on open connections per client address.

uvicorn only closes idle kept-alive connections (timeout_keep_alive); a client that sends half a request
line, or a body one byte a minute, held its connection (and a descriptor) for as long as it liked, and 50
such clients held 50. h11 has no timers of its own, so they are added here on uvicorn's protocol class,
the one place that sees bytes before a request is parsed. (The server's total connections are capped by
uvicorn's own limit_concurrency.)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServerSettings

TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class GuardedH11Protocol(H11Protocol):
    header_timeout = 10.0
    body_timeout = 60.0
    per_client = 64
    _open: Counter[str] = Counter()  # connections per client address, in this process

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._address = self.client[0] if self.client else ""
        self._released = False
        self._open[self._address] += 1
        if self._open[self._address] > self.per_client:
            self.logger.warning("refused a connection from %s: over max_connections_per_client (%d)",
                                self._address, self.per_client)
            transport.close()
            return
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The WebSocket protocol takes the transport over, and this one never hears of the connection again:
        # its slot and timer go now (the WebSocket is counted by limit_concurrency and pinged by uvicorn).
        self._disarm()
        self._release()
        super().handle_websocket_upgrade(event)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._open[self._address] -= 1
        if self._open[self._address] <= 0:
            del self._open[self._address]

    def data_received(self, data: bytes) -> None:
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._arm(self.header_timeout)  # the next request on a kept-alive connection begins
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm(self.body_timeout)  # idle limit: re-armed by each piece of the body
        elif state is not h11.IDLE:
            self._disarm()  # the head (and body) are in: the request runs as long as it needs

    def on_response_complete(self) -> None:
        self._disarm()  # between requests uvicorn's keep-alive timeout applies
        super().on_response_complete()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # mid-body: the app is reading
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        else:
            self.transport.write(TIMEOUT_ANSWER)
        self.transport.close()


def protocol_for(settings: ServerSettings) -> type[GuardedH11Protocol]:
    """The protocol class with the server's limits (uvicorn takes a class, and makes one per connection)."""
    attrs: dict[str, Any] = {"header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout,
                             "per_client": settings.max_connections_per_client}
    return type("ServerH11Protocol", (GuardedH11Protocol,), attrs)


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """What every uvicorn the server runs under is given: the guarded protocol, WebSockets through wsproto
    (the port proxy's), and the total connection cap."""
    return {"http": protocol_for(settings), "ws": "wsproto", "limit_concurrency": settings.max_connections}
