"""An HTTP reverse proxy onto a port inside a sandbox (``network.expose``), for the native route
``/sandboxes/{id}/ports/{port}/...`` and E2B's ``get_host(port)``.

Each request is one connection to the port, opened through the core (so it is checked against the policy
and audited) and carried by the agent's relay. The request is re-serialized with h11 (so what reaches the
sandbox is well-formed HTTP/1.1 whatever the client sent, and ``Connection: close``), without the
caller's credentials for stockade and without hop-by-hop headers; the response streams back as it comes
(server-sent events included). A server inside that never answers ends at ``HEAD_TIMEOUT``.
WebSockets (a dev server's hot reload) are relayed message by message: the client's handshake is
accepted by the server's own WebSocket transport (uvicorn over wsproto), a handshake of its own is made
to the server inside with wsproto over the port's stream (the path, the query, the subprotocols and the
client's other headers passed on as for HTTP), and then text, bytes and closes cross both ways; pings are
answered on each side by its own end. A message is bounded (MAX_MESSAGE).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager

import h11
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from ..runtime.port_stream import PortStream

HEAD_TIMEOUT = 60.0   # seconds the server inside may take to start its answer
MAX_HEAD = 64 << 10   # bytes of response head accepted from inside
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host"})

MAX_MESSAGE = 16 << 20   # bytes of one WebSocket message from inside (fragments reassembled)
# a WebSocket handshake's own headers: wsproto and uvicorn make each side's
WS_HANDSHAKE = frozenset({b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                          b"sec-websocket-protocol", b"sec-websocket-accept"})

Opener = Callable[[], AbstractAsyncContextManager[PortStream]]


def forwarded_headers(scope: Scope, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The client's headers as they go inside: without ``drop`` (hop-by-hop, credentials) and whatever
    the client's Connection header names (RFC 9110 7.6.1), with X-Forwarded-* added."""
    named = {token.strip().lower() for k, v in scope["headers"] if k == b"connection" for token in v.split(b",")}
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop and k.lower() not in named]
    host = next((v for k, v in scope["headers"] if k == b"host"), b"localhost")
    headers.append((b"x-forwarded-host", host))
    scheme = str(scope.get("scheme") or "http")
    headers.append((b"x-forwarded-proto", {"ws": "http", "wss": "https"}.get(scheme, scheme).encode()))
    client = scope.get("client")
    if client:
        headers.append((b"x-forwarded-for", str(client[0]).encode()))
    return headers


class PortProxyResponse(Response):
    """An ASGI response that forwards the request it answers to a port inside a sandbox. ``drop``: the
    request headers that carried stockade's own credentials (never passed inside)."""

    def __init__(self, open_port: Opener, target: bytes, drop: Iterable[bytes]) -> None:
        super().__init__()
        self.open_port, self.target = open_port, target
        self.drop = HOP_BY_HOP | {name.lower() for name in drop}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = next((v for k, v in scope["headers"] if k == b"host"), b"localhost")
        framing = [(k, v) for k, v in scope["headers"] if k in (b"content-length", b"transfer-encoding")]
        headers = [(k, v) for k, v in forwarded_headers(scope, self.drop) if k != b"content-length"] + framing
        headers += [(b"host", host), (b"connection", b"close")]
        started = False
        try:
            async with self.open_port() as stream:
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
                await stream.write(conn.send(h11.Request(method=scope["method"], target=self.target,
                                                         headers=headers)))
                upload = asyncio.ensure_future(_send_body(conn, stream, receive))
                try:
                    started = await _relay_response(conn, stream, send)
                finally:
                    upload.cancel()
                    await asyncio.gather(upload, return_exceptions=True)
        except Exception as exc:
            if started:  # the head went out: all that can be said now is an early end
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            status = 504 if isinstance(exc, TimeoutError) else 502
            message = f"stockade: the sandbox's port did not answer: {exc}".encode()[:2000] + b"\n"
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(message)).encode())]})
            await send({"type": "http.response.body", "body": message})


async def _send_body(conn: h11.Connection, stream: PortStream, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.close()
            return
        if message.get("body"):
            await stream.write(conn.send(h11.Data(data=message["body"])))
        if not message.get("more_body"):
            await stream.write(conn.send(h11.EndOfMessage()))
            return


async def _next_event(conn: h11.Connection, stream: PortStream, timeout: float | None) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await (asyncio.wait_for(stream.read(), timeout) if timeout else stream.read())
        conn.receive_data(data)


async def _relay_response(conn: h11.Connection, stream: PortStream, send: Send) -> bool:
    """Stream the answer out; True once its head was sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEAD_TIMEOUT
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"no answer within {HEAD_TIMEOUT:g} s")
        event = await _next_event(conn, stream, left)
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            break
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before the response")
    await send({"type": "http.response.start", "status": event.status_code,
                "headers": [(k, v) for k, v in event.headers if k not in HOP_BY_HOP]})
    while True:
        event = await _next_event(conn, stream, None)
        if isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True


async def proxy_websocket(websocket: WebSocket, open_port: Opener, target: bytes, drop: Iterable[bytes]) -> None:
    """Relay a client's WebSocket to the server inside (see the module's note). A refusal inside, or a
    port nothing listens on, closes the client's socket before it is accepted (the client sees a 403)."""
    headers = [(k, v) for k, v in forwarded_headers(websocket.scope, HOP_BY_HOP | WS_HANDSHAKE |
                                                    {name.lower() for name in drop})]
    host = websocket.headers.get("host", "localhost")
    offered = list(websocket.scope.get("subprotocols") or [])
    try:
        async with open_port() as stream:
            inside = WSConnection(ConnectionType.CLIENT)
            await stream.write(inside.send(ws.Request(host=host, target=target.decode("latin-1"),
                                                      extra_headers=headers, subprotocols=offered)))
            answer = await _ws_handshake(inside, stream)
            if answer is None:
                await websocket.close(code=1011, reason="the server inside refused the WebSocket")
                return
            await websocket.accept(subprotocol=answer.subprotocol)
            await _ws_relay(websocket, inside, stream)
    except Exception:  # nothing listens inside, the sandbox ended, a broken frame from inside
        with contextlib.suppress(Exception):
            await websocket.close(code=1011)


async def _ws_handshake(inside: WSConnection, stream: PortStream) -> ws.AcceptConnection | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEAD_TIMEOUT
    while True:
        for event in inside.events():
            if isinstance(event, ws.AcceptConnection):
                return event
            if isinstance(event, ws.RejectConnection | ws.RejectData):
                return None
        data = await asyncio.wait_for(stream.read(), max(0.0, deadline - loop.time()))
        if not data:
            return None
        inside.receive_data(data)


async def _ws_relay(websocket: WebSocket, inside: WSConnection, stream: PortStream) -> None:
    async def outward() -> None:  # the client's messages, to the server inside
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    await stream.write(inside.send(ws.CloseConnection(code=message.get("code", 1000))))
                    return
                if message.get("bytes") is not None:
                    await stream.write(inside.send(ws.Message(data=message["bytes"])))
                elif message.get("text") is not None:
                    await stream.write(inside.send(ws.Message(data=message["text"])))
        except WebSocketDisconnect:
            return

    async def inward() -> None:  # the server's messages, to the client
        parts: list[bytes | str] = []
        size = 0
        while True:
            data = await stream.read()
            inside.receive_data(data or None)
            for event in inside.events():
                if isinstance(event, ws.Ping):
                    await stream.write(inside.send(event.response()))
                elif isinstance(event, ws.CloseConnection):
                    with contextlib.suppress(Exception):
                        await stream.write(inside.send(event.response()))
                    await websocket.close(code=event.code, reason=event.reason or None)
                    return
                elif isinstance(event, ws.TextMessage | ws.BytesMessage):
                    parts.append(event.data if isinstance(event.data, str) else bytes(event.data))
                    size += len(event.data)
                    if size > MAX_MESSAGE:
                        await websocket.close(code=1009, reason="message too big")
                        return
                    if event.message_finished:
                        if isinstance(event, ws.TextMessage):
                            await websocket.send_text("".join(p for p in parts if isinstance(p, str)))
                        else:
                            await websocket.send_bytes(b"".join(p for p in parts if isinstance(p, bytes)))
                        parts, size = [], 0
            if not data:  # the server inside went away without a close
                await websocket.close(code=1011)
                return

    tasks = [asyncio.ensure_future(outward()), asyncio.ensure_future(inward())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
