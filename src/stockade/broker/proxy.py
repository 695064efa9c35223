"""The egress proxy: HTTP (CONNECT and absolute-URI requests) and SOCKS5, over any byte stream.

One connection from the sandbox's bridge arrives per client connection, prefixed by one byte: ``H`` for
the HTTP proxy, ``S`` for SOCKS5. The transport (a Unix socket for the jail; vsock later) is the
server's business; this module only speaks the protocols and applies the rules:

1. decide on the requested name before any DNS lookup (a denied name never reaches a resolver);
2. resolve on the host, check every address (private ranges refused), connect to the checked address;
3. classify every tunnel's first bytes before forwarding any (``hello``): a ClientHello's SNI, or each
   HTTP request's Host (``exchange``), must name the requested host; other protocols need a tcp:// rule;
4. count bytes against network.max_egress_bytes and connections against network.max_connections;
5. record every attempt as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exchange import refusal, relay_http
from .hello import MAX_HELLO, Hello, Unclassifiable, classify
from .resolver import Resolver, system_resolver
from .rules import Decision, RuleError, Rules, normalize_host, parse_ip, split_target

if TYPE_CHECKING:  # cryptography (through .secrets) is imported only by a policy with secrets
    from .secrets import BoundSecret, SandboxCA

MAX_LINE = 8192
MAX_HEADERS = 100
CONNECT_TIMEOUT = 10.0
HEADER_TIMEOUT = 30.0
CLASSIFY_TIMEOUT = 10.0  # for a tunnel's first bytes: a client that waits longer gets a closed tunnel


@dataclass
class Egress:
    """One sandbox's egress state: its rules (replaceable at run time), limits, counters, event sink."""

    sandbox_id: str
    rules: Rules
    max_connections: int
    max_egress_bytes: int
    record: Callable[[dict[str, Any]], None]
    resolver: Resolver = system_resolver
    secrets: list[BoundSecret] = field(default_factory=list)
    ca: SandboxCA | None = None                    # set when there are secrets to inject
    upstream_ssl: ssl.SSLContext | None = None     # verification for intercepted upstreams
    active: int = 0
    egress_bytes: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Denied(Exception):
    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(decision.reason)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, egress: Egress) -> None:
    event: dict[str, Any] = {"sandbox_id": egress.sandbox_id, "time": time.time(), "protocol": "?", "host": None,
                             "port": None, "address": None, "decision": "error", "rule": None,
                             "bytes_out": 0, "bytes_in": 0}
    started = time.monotonic()
    egress.active += 1
    try:
        kind = await asyncio.wait_for(reader.readexactly(1), HEADER_TIMEOUT)
        if egress.active > egress.max_connections:
            event["rule"] = "max_connections"
            raise Denied(Decision(False, "max_connections",
                                  f"more than network.max_connections ({egress.max_connections}) open connections"))
        if kind == b"H":
            await _http(reader, writer, egress, event)
        elif kind == b"S":
            await _socks(reader, writer, egress, event)
    except Denied as denied:
        event.update(decision="deny", rule=denied.decision.rule, reason=denied.decision.reason)
        await _refuse(writer, event, denied.decision)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError, ValueError,
            RuleError, OSError) as exc:
        event.setdefault("reason", f"{type(exc).__name__}: {exc}"[:300])
        await _refuse(writer, event, None)
    finally:
        egress.active -= 1
        event["duration"] = round(time.monotonic() - started, 4)
        egress.record(event)
        if event["decision"] != "allow" and not event.get("established"):  # it was refused
            await _linger(reader, writer)
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    """Request line and headers, bounded in size and count; CR/LF inside values are impossible by framing."""
    async def line() -> str:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n"), HEADER_TIMEOUT)
        if len(raw) > MAX_LINE:
            raise ValueError("request line or header too long")
        return raw[:-2].decode("latin-1")

    request_line = await line()
    headers: list[tuple[str, str]] = []
    while (text := await line()) != "":
        if len(headers) >= MAX_HEADERS or ":" not in text:
            raise ValueError("too many or malformed headers")
        name, _, value = text.partition(":")
        headers.append((name.strip(), value.strip()))
    return request_line, headers


async def _open(egress: Egress, event: dict[str, Any], host: str, port: int
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    event.update(host=host, port=port)
    decision = egress.rules.decide_name(host, port)
    event["rule"] = decision.rule
    if not decision.allowed:
        raise Denied(decision)
    literal = parse_ip(host)
    addresses = [literal] if literal is not None else await asyncio.wait_for(egress.resolver(host, port),
                                                                             CONNECT_TIMEOUT)
    if not addresses:
        raise OSError(f"{host} does not resolve")
    for address in addresses:  # every address must pass: no picking the private one later
        checked = egress.rules.decide_address(host, address, port)
        if not checked.allowed:
            raise Denied(checked)
    address = addresses[0]
    event["address"] = str(address)
    upstream = await asyncio.wait_for(asyncio.open_connection(str(address), port), CONNECT_TIMEOUT)
    event["decision"] = "allow"
    return upstream


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, egress: Egress,
                event: dict[str, Any]) -> None:
    request_line, headers = await _read_head(reader)
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    method, target, version = parts
    event["method"] = method[:16]
    if method == "CONNECT":
        event["protocol"] = "connect"
        host, port = split_target(target, 443)
        up_reader, up_writer = await _open(egress, event, host, port)
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            event["established"] = True  # from here a refusal is a closed tunnel, not an HTTP answer
            await _tunnel(reader, writer, up_reader, up_writer, egress, event, host, port, intercept=True)
        finally:  # also when the tunnel is refused after the upstream connection was made
            up_writer.close()
        return
    event["protocol"] = "http"
    if not target.startswith("http://"):
        raise ValueError("a proxy request needs an absolute http:// URL (use CONNECT for https)")
    authority, _, path = target[len("http://"):].partition("/")
    host, port = split_target(authority.partition("?")[0], 80)
    event["path"] = ("/" + path)[:200]
    up_reader, up_writer = await _open(egress, event, host, port)
    # the head as it came (it was read to find the host), then every request is parsed and checked
    head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    event["established"] = True
    try:
        await relay_http(reader, writer, up_reader, up_writer, egress, event, host, port,
                         initial=head.encode("latin-1"))
    finally:
        up_writer.close()


async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                  up_writer: asyncio.StreamWriter, egress: Egress, event: dict[str, Any], host: str,
                  port: int, intercept: bool = False) -> None:
    """An established tunnel (CONNECT or SOCKS). Nothing goes upstream before the first bytes are known:
    a ``tcp://`` rule relays anything; a secret-bound host (CONNECT) is intercepted, its TLS terminated
    here; otherwise a complete ClientHello whose SNI names the host is relayed untouched, or plain
    HTTP/1.x is relayed request by request with each Host checked. Anything else closes the tunnel."""
    if egress.rules.raw_tcp(host, port):
        event["classified"] = "tcp"
        await _kernel_relay(reader, writer, up_reader, up_writer, egress, event, b"")
        return
    bound = [sec for sec in egress.secrets if sec.bound_to(host, port)]
    if intercept and bound and egress.ca is not None and egress.upstream_ssl is not None:
        event["protocol"] = "connect-intercepted"
        await writer.start_tls(egress.ca.server_context(host))
        await up_writer.start_tls(egress.upstream_ssl, server_hostname=host)
        await relay_http(reader, writer, up_reader, up_writer, egress, event, host, port, bound=bound)
        return
    first, hello = await _first_bytes(reader, egress, event, host, port)
    if hello.kind == "http":
        await relay_http(reader, writer, up_reader, up_writer, egress, event, host, port, initial=first)
        return
    await _kernel_relay(reader, writer, up_reader, up_writer, egress, event, first)


async def _first_bytes(reader: asyncio.StreamReader, egress: Egress, event: dict[str, Any], host: str,
                       port: int) -> tuple[bytes, Hello]:
    """Read until the tunnel's first bytes classify (bounded in size and time), and check the name they
    carry; ``Denied`` with the reason otherwise."""
    data = b""
    deadline = time.monotonic() + CLASSIFY_TIMEOUT
    try:
        while (hello := classify(data)) is None:
            if len(data) >= MAX_HELLO:
                raise Unclassifiable(f"no complete ClientHello or HTTP request in the first {MAX_HELLO} bytes")
            left = deadline - time.monotonic()
            try:
                chunk = await asyncio.wait_for(reader.read(MAX_HELLO - len(data)), max(left, 0.001))
            except TimeoutError:
                raise Unclassifiable(f"no ClientHello or HTTP request within {CLASSIFY_TIMEOUT:g}s") from None
            if not chunk:
                raise Unclassifiable("the client closed before sending a ClientHello or HTTP request")
            data += chunk
    except Unclassifiable as exc:
        event["classified"] = "refused"
        raise Denied(Decision(False, "tunnel-protocol", f"tunnel to {host}:{port} closed: {exc}")) from None
    event["classified"] = hello.kind
    if hello.kind == "tls":
        event["sni"] = hello.sni
        why = _sni_problem(hello.sni, host, port, egress)
        if why is not None:
            raise Denied(Decision(False, "sni-mismatch", why))
    return data, hello


def _sni_problem(sni: str | None, host: str, port: int, egress: Egress) -> str | None:
    """A name target needs its own name in the SNI. An IP-literal target (allowed by an address rule) takes
    no SNI, or a name that network.allow allows on that port by itself."""
    if sni is None:
        return None if parse_ip(host) is not None else f"TLS ClientHello without SNI in a tunnel to {host!r}"
    try:
        name = normalize_host(sni)
    except RuleError:
        return f"TLS SNI {sni[:80]!r} is not a host name"
    if name == host:
        return None
    if parse_ip(host) is not None and parse_ip(name) is None and egress.rules.decide_name(name, port).allowed:
        return None
    return f"TLS SNI {sni[:80]!r} differs from the tunnel's host {host!r}"


async def _socks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, egress: Egress,
                 event: dict[str, Any]) -> None:
    event["protocol"] = "socks5"
    version, count = await reader.readexactly(2)
    if version != 5:
        raise ValueError("not SOCKS5")
    await reader.readexactly(count)
    writer.write(b"\x05\x00")  # no authentication: the sandbox is already identified by its socket
    version, command, _, atyp = await reader.readexactly(4)
    if atyp == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif atyp == 3:
        host = (await reader.readexactly((await reader.readexactly(1))[0])).decode("latin-1")
    else:
        raise ValueError("bad SOCKS address type")
    port = int.from_bytes(await reader.readexactly(2), "big")
    if command != 1:  # only CONNECT: no UDP ASSOCIATE, no BIND
        event.update(host=host, port=port)
        raise Denied(Decision(False, "socks-command", "only TCP CONNECT is allowed through SOCKS"))
    host = normalize_host(host)
    up_reader, up_writer = await _open(egress, event, host, port)
    try:
        writer.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        await writer.drain()
        event["established"] = True
        await _tunnel(reader, writer, up_reader, up_writer, egress, event, host, port)
    finally:
        up_writer.close()


REFUSAL_DRAIN_TIME = 0.5       # after a refusal: how long the client's unread request is read and dropped
REFUSAL_DRAIN_BYTES = 1 << 16


async def _refuse(writer: asyncio.StreamWriter, event: dict[str, Any], decision: Decision | None) -> None:
    if writer.is_closing():
        return
    protocol = event.get("protocol")
    target = f"{event.get('host')}:{event.get('port')}"
    with contextlib.suppress(ConnectionError, OSError):
        if protocol == "socks5" and not event.get("established"):
            writer.write(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00" if decision else
                         b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00")
        elif protocol in ("http", "connect", "?") and not event.get("established"):
            if decision is not None:
                writer.write(refusal(403, decision.reason, f"stockade: egress to {target} denied: "
                                     f"{decision.reason}\n(rule: {decision.rule}; a policy allows hosts with "
                                     'network.allow = ["HOST[:PORT]"])'))
            else:
                why = f"could not reach {target}: {event.get('reason', 'bad request')}"
                writer.write(refusal(502, why, f"stockade: {why}"))
        await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After a refusal: our end of the stream, then what the client sent and was not read, briefly (its
    event is recorded already). Closing with unread bytes resets the connection, and a reset can overtake
    the answer (a relaying runtime's agent, gVisor's, saw the reset before the 403)."""
    if writer.is_closing() or not writer.can_write_eof():
        return
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        writer.write_eof()
        await asyncio.wait_for(reader.read(REFUSAL_DRAIN_BYTES), REFUSAL_DRAIN_TIME)


async def _kernel_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                        up_writer: asyncio.StreamWriter, egress: Egress, event: dict[str, Any], first: bytes) -> None:
    """An untouched tunnel: after what Python already read is passed on, bytes move socket -> pipe -> socket
    inside the kernel (splice), counted against the caps but never copied through Python."""
    event["established"] = True
    for w in (writer, up_writer):  # from here on nothing may land in the streams' buffers
        w.transport.pause_reading()  # type: ignore[attr-defined]
    leftover = first + _take_buffered(reader)
    if leftover:
        count_out(egress, event, len(leftover))
        if egress.egress_bytes > egress.max_egress_bytes:  # checked before anything leaves
            event["reason"] = "network.max_egress_bytes reached"
            return
        up_writer.write(leftover)
    back = _take_buffered(up_reader)
    if back:
        event["bytes_in"] += len(back)
        writer.write(back)
    await asyncio.gather(writer.drain(), up_writer.drain())
    # duplicates of the two sockets: asyncio will not watch a descriptor a transport owns
    client, upstream = (socket.socket(fileno=os.dup(w.get_extra_info("socket").fileno())) for w in (writer, up_writer))
    for sock in (client, upstream):
        sock.setblocking(False)  # a socket object made from a descriptor starts blocking, and so would the original
    out = asyncio.ensure_future(_pump(client, upstream, egress, event, outbound=True))
    inbound = asyncio.ensure_future(_pump(upstream, client, egress, event, outbound=False))
    try:
        done, _ = await asyncio.wait([out, inbound], return_when=asyncio.FIRST_COMPLETED)
        if out in done and not event.get("reason"):  # the client finished sending: let the answer finish
            await inbound
    finally:
        for task in (out, inbound):
            task.cancel()
        await asyncio.gather(out, inbound, return_exceptions=True)
        client.close()
        upstream.close()
        up_writer.close()


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    # what the stream already read from the socket and nobody consumed (StreamReader has no public view)
    data = bytes(reader._buffer)  # type: ignore[attr-defined]
    reader._buffer.clear()  # type: ignore[attr-defined]
    return data


def count_out(egress: Egress, event: dict[str, Any], n: int) -> None:
    egress.egress_bytes += n
    event["bytes_out"] += n


async def _pump(src: Any, dst: Any, egress: Egress, event: dict[str, Any], outbound: bool) -> None:
    loop = asyncio.get_running_loop()
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    flags = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
    in_pipe = 0
    try:
        while True:
            if not in_pipe:
                try:
                    n = os.splice(src.fileno(), pipe_w, 1 << 20, flags=flags)
                except BlockingIOError:
                    await _ready(loop, src.fileno(), loop.add_reader, loop.remove_reader)
                    continue
                if n == 0:  # end of stream: pass the half-close on
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                in_pipe = n
                if outbound:
                    count_out(egress, event, n)
                    if egress.egress_bytes > egress.max_egress_bytes:
                        event["reason"] = "network.max_egress_bytes reached"
                        return
                else:
                    event["bytes_in"] += n
            try:
                in_pipe -= os.splice(pipe_r, dst.fileno(), in_pipe, flags=flags)
            except BlockingIOError:
                await _ready(loop, dst.fileno(), loop.add_writer, loop.remove_writer)
    except (ConnectionError, OSError):
        return
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, add: Any, remove: Any) -> None:
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    add(fd, wake)
    try:
        await future
    finally:
        remove(fd)
