"""HTTP/1.x through the broker, one request at a time, parsed by h11 on both sides.

Used for every HTTP the broker can read: absolute-URI proxy requests, plain HTTP inside a tunnel, and
the decrypted stream of an intercepted (secret-bound) host. Every request on a keep-alive connection is
checked: its Host (and an absolute-form target) must name the host the connection was allowed for, or it
gets a 403 that says why and the connection ends; nothing of it reaches the upstream. Requests are
re-serialized by h11, so an ambiguous framing (Content-Length beside Transfer-Encoding, obs-fold) never
reaches the upstream as sent. For an intercepted host the secrets are put into each checked request, and
the response (headers and body, de-chunked and, for gzip/deflate, decompressed) passes a ``Masker``.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11

from .rules import RuleError, parse_ip, split_target

if TYPE_CHECKING:  # cryptography (through .secrets) is imported only by a policy with secrets
    from .proxy import Egress
    from .secrets import BoundSecret, Masker

MAX_HEAD = 64 * 1024
HEADER_TIMEOUT = 30.0
READ_CHUNK = 64 * 1024
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
              b"te", b"trailer", b"upgrade", b"transfer-encoding"}


class Refused(Exception):
    """A request the broker will not forward; the message is the reason (one short line)."""


def refusal(status: int, reason: str, body_text: str = "") -> bytes:
    """A complete answer that ends the connection, its status line carrying the reason (curl -v, pip and
    http.client print it): the broker's 403s, 502s and 400s all take this shape."""
    phrase = _phrase(f"stockade: {reason}")
    body = body_text.rstrip("\n").encode() + b"\n" if body_text else b""
    return (f"HTTP/1.1 {status} {phrase}\r\nX-Stockade-Reason: {phrase}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _phrase(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]


def check_authority(value: str, host: str, port: int, also: Callable[[str, int], bool]) -> str | None:
    """Why the authority ``value`` (a Host header or an absolute URL's) does not name ``host:port``; None
    when it does. A missing port means the connection's port. For an IP-literal connection ``also`` may
    accept a name the rules allow on that port."""
    try:
        named, named_port = split_target(value.strip(), port)
    except (ValueError, RuleError):
        return f"Host {value[:80]!r} is not a host[:port]"
    if named_port != port:
        return f"Host {value[:80]!r} names port {named_port}, the connection is for {host}:{port}"
    if named == host or (parse_ip(host) is not None and also(named, port)):
        return None
    return f"Host {named!r} differs from {host!r}, the host this connection was allowed for"


def check_request(request: h11.Request, host: str, port: int, also: Callable[[str, int], bool]) -> str | None:
    target = request.target.decode("latin-1")
    hosts = [v.decode("latin-1") for k, v in request.headers if k == b"host"]
    names = {k for k, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "a request with both Content-Length and Transfer-Encoding"
    if request.method == b"CONNECT" or target == "*" and request.method != b"OPTIONS":
        return f"{request.method.decode('latin-1')} {target[:60]} inside a connection to {host}"
    if not target.startswith("/") and target != "*":
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return f"request target {target[:80]!r} is neither a path nor an http URL"
        authority = rest.split("/", 1)[0].split("?", 1)[0]
        if (why := check_authority(authority, host, port, also)) is not None:
            return why
    for value in hosts:
        if (why := check_authority(value, host, port, also)) is not None:
            return why
    return None


async def _next(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float | None = None,
                counted: dict[str, Any] | None = None) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await (asyncio.wait_for(reader.read(READ_CHUNK), timeout) if timeout else reader.read(READ_CHUNK))
        if counted is not None:
            counted["bytes_in"] += len(data)
        conn.receive_data(data)


class _Decoder:
    """The response body as the client will receive it: decompressed when it came gzip/deflate."""

    def __init__(self, coding: str) -> None:
        self.z = zlib.decompressobj(31 if coding in ("gzip", "x-gzip") else 15) if coding else None

    def feed(self, data: bytes) -> bytes:
        return self.z.decompress(data) if self.z else data

    def flush(self) -> bytes:
        return self.z.flush() if self.z else b""


async def relay_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                     up_writer: asyncio.StreamWriter, egress: Egress, event: dict[str, Any], host: str, port: int,
                     *, initial: bytes = b"", bound: list[BoundSecret] | None = None) -> None:
    """Requests from the client, each checked and (with ``bound`` secrets) rewritten, and their responses,
    until either side closes or a request is refused."""
    from .proxy import count_out  # the proxy owns the egress counters

    bound = bound or []
    client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    upstream = h11.Connection(h11.CLIENT)
    if initial:  # (empty data would mean end of stream to h11)
        client.receive_data(initial)
    masker = None
    if bound:
        from .secrets import Masker
        masker = Masker([sec.value for sec in bound])
    event["requests"] = 0
    used: set[str] = set()

    async def send_up(ev: Any) -> None:
        data = upstream.send(ev) or b""
        count_out(egress, event, len(data))
        if egress.egress_bytes > egress.max_egress_bytes:
            event["reason"] = "network.max_egress_bytes reached"
            raise Refused("network.max_egress_bytes reached")
        up_writer.write(data)
        await up_writer.drain()

    async def send_client(ev: Any) -> None:
        writer.write(client.send(ev) or b"")
        await writer.drain()

    def also(name: str, p: int) -> bool:
        return egress.rules.decide_name(name, p).allowed

    try:
        while True:
            request = await _next(client, reader, HEADER_TIMEOUT)
            if not isinstance(request, h11.Request):
                return  # the client closed between requests
            event["requests"] += 1
            if event["requests"] == 1:
                event.setdefault("method", request.method.decode("latin-1")[:16])
                event.setdefault("path", _origin_form(request.target).decode("latin-1")[:200])
            why = check_request(request, host, port, also)
            if why is not None:
                event.update(decision="deny", rule="host-mismatch", reason=why)
                writer.write(refusal(403, why, f"stockade: request refused: {why}\n(a connection is allowed for "
                                                "one host; open another connection for another host)"))
                await writer.drain()
                return
            this: set[str] = set()
            headers = _request_headers(request, host, port, bound, egress.secrets, event, this)
            used |= this
            if client.their_state is h11.MUST_CLOSE or request.http_version == b"1.0":
                headers.append((b"Connection", b"close"))
            await send_up(h11.Request(method=request.method, target=_origin_form(request.target), headers=headers))
            if client.they_are_waiting_for_100_continue:
                await send_client(h11.InformationalResponse(status_code=100, headers=[]))
            while not isinstance(part := await _next(client, reader), h11.EndOfMessage):
                await send_up(part)
            await send_up(h11.EndOfMessage())
            if not await _response(upstream, up_reader, client, send_client, masker, event):
                return
            if h11.MUST_CLOSE in (client.our_state, upstream.their_state, upstream.our_state):
                return
            client.start_next_cycle()
            upstream.start_next_cycle()
    except Refused:
        return
    except (h11.RemoteProtocolError, h11.LocalProtocolError, zlib.error) as exc:
        event.setdefault("reason", f"HTTP: {exc}"[:300])
        if client.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            writer.write(refusal(400, "malformed HTTP"))
    finally:
        if used:
            event["secrets"] = sorted(used)


async def _response(upstream: h11.Connection, up_reader: asyncio.StreamReader, client: h11.Connection,
                    send_client: Callable[[Any], Any], masker: Masker | None, event: dict[str, Any]) -> bool:
    """Pass one response on (masked when ``masker``); False when the connection must end."""
    decoder = _Decoder("")
    while True:
        ev = await _next(upstream, up_reader, counted=event)
        if isinstance(ev, h11.InformationalResponse):
            if ev.status_code != 101:
                await send_client(h11.InformationalResponse(status_code=ev.status_code,
                                                            headers=_masked_headers(ev.headers, masker)))
            continue
        if isinstance(ev, h11.Response):
            event.setdefault("status", ev.status_code)
            headers = [(k, v) for k, v in ev.headers.raw_items() if k.lower() not in HOP_BY_HOP]
            if masker is not None:
                coding = b",".join(v for k, v in ev.headers if k == b"content-encoding").decode("latin-1")
                coding = coding.strip().lower()
                if coding not in ("", "identity", "gzip", "x-gzip", "deflate"):
                    why = f"the upstream answered with Content-Encoding {coding[:40]!r}, which cannot be checked " \
                          "for secrets"
                    event["reason"] = why
                    await send_client(h11.Response(status_code=502, reason=_phrase(f"stockade: {why}").encode(),
                                                   headers=[(b"Content-Length", b"0"), (b"Connection", b"close")]))
                    return False
                if coding not in ("", "identity"):
                    decoder = _Decoder(coding)
                    headers = [(k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")]
                headers = _masked_headers(headers, masker)
            await send_client(h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason
                                           if masker is None else masker.mask(ev.reason)))
            continue
        if isinstance(ev, h11.Data):
            data = decoder.feed(ev.data)
            if masker is not None:
                data = masker.feed(data)
            if data:
                await send_client(h11.Data(data=data))
            continue
        if isinstance(ev, h11.EndOfMessage):
            tail = decoder.flush()
            if masker is not None:
                tail = masker.feed(tail) + masker.flush()
            if tail:
                await send_client(h11.Data(data=tail))
            await send_client(h11.EndOfMessage())
            return True
        return False  # ConnectionClosed before the response ended


def _masked_headers(headers: Any, masker: Masker | None) -> list[tuple[bytes, bytes]]:
    items = list(headers.raw_items()) if hasattr(headers, "raw_items") else list(headers)
    if masker is None:
        return items
    return [(masker.mask(k), masker.mask(v)) for k, v in items]


def _origin_form(target: bytes) -> bytes:
    if target.startswith(b"/") or target == b"*":
        return target
    rest = target.partition(b"://")[2]
    path_start = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    path = rest[path_start:]
    return path if path.startswith(b"/") else b"/" + path


def _request_headers(request: h11.Request, host: str, port: int, bound: list[BoundSecret],
                     secrets: list[BoundSecret], event: dict[str, Any], used: set[str]) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers, a Host if it had none, placeholders of ``bound`` secrets replaced
    by their values (headers only), and the configured header of each bound secret it did not carry."""
    out: list[tuple[bytes, bytes]] = []
    leaked = set()
    for name, value in request.headers.raw_items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower == b"expect" or (bound and lower == b"accept-encoding"):
            continue
        for sec in secrets:
            if sec.placeholder in value:
                if sec in bound:
                    value = value.replace(sec.placeholder, sec.value)
                    used.add(sec.name)
                else:
                    leaked.add(sec.name)  # forwarded as it is: a placeholder is worthless elsewhere
        out.append((name, value))
    if not any(k.lower() == b"host" for k, _ in out):
        out.insert(0, (b"Host", (host if port in (80, 443) else f"{host}:{port}").encode()))
    for sec in bound:  # the configured header, when the client did not carry the placeholder itself
        if sec.header and sec.name not in used and not any(k.lower() == sec.header.lower().encode() for k, _ in out):
            out.append((sec.header.encode(), sec.format.replace("{secret}", sec.value.decode("latin-1")).encode(
                "latin-1")))
            used.add(sec.name)
    if bound:  # identity, so the response can be scanned for the values
        out.append((b"Accept-Encoding", b"identity"))
    if leaked:
        event["exfiltration_blocked"] = sorted(set(event.get("exfiltration_blocked", [])) | leaked)
    if "chunked" in b",".join(v for k, v in request.headers if k == b"transfer-encoding").decode("latin-1"):
        out.append((b"Transfer-Encoding", b"chunked"))
    return out

