"""The egress proxy: HTTP (CONNECT and absolute-URI requests) and SOCKS5, over any byte stream.

One connection from the sandbox's bridge arrives per client connection, prefixed by one byte: ``H`` for
the HTTP proxy, ``S`` for SOCKS5. The transport (a Unix socket for the jail; vsock later) is the
server's business; this module only speaks the protocols and applies the rules:

1. decide on the requested name before any DNS lookup (a denied name never reaches a resolver);
2. resolve on the host, check every address (private ranges refused), connect to the checked address;
3. for TLS through CONNECT, read the ClientHello and refuse an SNI that differs from the CONNECT host;
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .rules import Decision, IPAddress, RuleError, Rules, normalize_host, parse_ip
from .secrets import BoundSecret, SandboxCA

MAX_LINE = 8192
MAX_HEADERS = 100
CONNECT_TIMEOUT = 10.0
HEADER_TIMEOUT = 30.0
RELAY_CHUNK = 64 * 1024

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=1)  # SOCK_STREAM
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = parse_ip(str(sockaddr[0]))
        if ip is not None and ip not in out:
            out.append(ip)
    return out


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


def _split_target(target: str, default_port: int) -> tuple[str, int]:
    """host:port (or [v6]:port) from a CONNECT target or URL authority; rejects anything else."""
    if any(c in target for c in " \t\r\n@/\\?#") or not target:
        raise ValueError(f"bad target {target[:100]!r}")
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest.removeprefix(":") if rest else ""
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    else:
        host, port_text = target, ""
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    return normalize_host(host), port


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
        host, port = _split_target(target, 443)
        up_reader, up_writer = await _open(egress, event, host, port)
        try:
            await _tunnel(reader, writer, up_reader, up_writer, egress, event, host, port)
        finally:  # also when the tunnel is refused after the upstream connection was made
            up_writer.close()
        return
    event["protocol"] = "http"
    if not target.startswith("http://"):
        raise ValueError("a proxy request needs an absolute http:// URL (use CONNECT for https)")
    authority, _, path = target[len("http://"):].partition("/")
    host, port = _split_target(authority, 80)
    event["path"] = ("/" + path)[:200]
    up_reader, up_writer = await _open(egress, event, host, port)
    kept = [(k, v) for k, v in headers if not k.lower().startswith("proxy-") and k.lower() != "connection"]
    _note_placeholders(kept, egress.secrets, [], event)  # secrets never travel in clear text
    head = f"{method} /{path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept) + "Connection: close\r\n\r\n"
    # the head was checked and rewritten; the rest (body, answer) moves in the kernel like a tunnel's
    try:
        await _kernel_relay(reader, writer, up_reader, up_writer, egress, event, head.encode("latin-1"),
                            watch_status=True)
    finally:
        up_writer.close()


async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                  up_writer: asyncio.StreamWriter, egress: Egress, event: dict[str, Any], host: str,
                  port: int) -> None:
    """After CONNECT: intercept for a secret-bound host, else check the ClientHello and relay untouched."""
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    event["established"] = True  # from here a refusal is a closed tunnel, not an HTTP answer
    bound = [sec for sec in egress.secrets if sec.bound_to(host, port)]
    if bound and egress.ca is not None and egress.upstream_ssl is not None:
        event["protocol"] = "connect-intercepted"
        await writer.start_tls(egress.ca.server_context(host))
        await up_writer.start_tls(egress.upstream_ssl, server_hostname=host)
        request_head = await _request_with_secrets(reader, egress, event, bound)
        await _splice(reader, writer, up_reader, up_writer, egress, event, request_head,
                      [sec.value for sec in bound])
        return
    first = await _check_client_hello(reader, host, event)
    await _kernel_relay(reader, writer, up_reader, up_writer, egress, event, first)


def _note_placeholders(headers: list[tuple[str, str]], secrets: list[BoundSecret], bound: list[BoundSecret],
                       event: dict[str, Any]) -> None:
    """A placeholder of a secret not bound to this host is forwarded as it is, and recorded."""
    leaked = sorted({sec.name for sec in secrets if sec not in bound
                     for _, v in headers if sec.placeholder.decode() in v})
    if leaked:
        event["exfiltration_blocked"] = leaked


async def _request_with_secrets(reader: asyncio.StreamReader, egress: Egress, event: dict[str, Any],
                                bound: list[BoundSecret]) -> bytes:
    """The decrypted request's head with placeholders replaced by the real values (headers only)."""
    request_line, headers = await _read_head(reader)
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    event["method"], event["path"] = parts[0][:16], parts[1][:200]
    _note_placeholders(headers, egress.secrets, bound, event)
    used: set[str] = set()
    out: list[tuple[str, str]] = []
    for name, value in headers:
        if name.lower() in ("connection", "accept-encoding") or name.lower().startswith("proxy-"):
            continue
        for sec in bound:
            if sec.placeholder.decode() in value:
                value = value.replace(sec.placeholder.decode(), sec.value.decode("latin-1"))
                used.add(sec.name)
        out.append((name, value))
    for sec in bound:  # the configured header, when the client did not carry the placeholder itself
        if sec.header and sec.name not in used and not any(n.lower() == sec.header.lower() for n, _ in out):
            out.append((sec.header, sec.format.replace("{secret}", sec.value.decode("latin-1"))))
            used.add(sec.name)
    event["secrets"] = sorted(used)
    # identity encoding, so the response can be scrubbed of the values; one request per connection
    head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in out)
    return (head + "Accept-Encoding: identity\r\nConnection: close\r\n\r\n").encode("latin-1")


async def _check_client_hello(reader: asyncio.StreamReader, host: str, event: dict[str, Any]) -> bytes:
    """The first bytes after CONNECT; if they are a TLS ClientHello, its SNI must name the CONNECT host."""
    try:
        first = await asyncio.wait_for(reader.read(16384), HEADER_TIMEOUT)
    except TimeoutError:
        return b""
    if first[:1] != b"\x16":  # not TLS: plain bytes through the tunnel
        return first
    sni = client_hello_sni(first)
    event["sni"] = sni
    if sni is not None and parse_ip(host) is None and normalize_host(sni) != host:
        raise Denied(Decision(False, "sni-mismatch",
                              f"TLS SNI {sni!r} differs from the CONNECT host {host!r}"))
    return first


def client_hello_sni(data: bytes) -> str | None:
    """The server_name of a TLS ClientHello (in the first record), or None. Never raises on garbage."""
    try:
        if data[0] != 0x16 or data[5] != 0x01:
            return None
        pos = 9 + 2 + 32  # record header(5) + handshake header(4) + version + random
        pos += 1 + data[pos]                                     # session id
        pos += 2 + int.from_bytes(data[pos:pos + 2], "big")      # cipher suites
        pos += 1 + data[pos]                                     # compression methods
        end = pos + 2 + int.from_bytes(data[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            ext_type = int.from_bytes(data[pos:pos + 2], "big")
            ext_len = int.from_bytes(data[pos + 2:pos + 4], "big")
            if ext_type == 0:  # server_name: list length(2), type(1), name length(2), name
                name_len = int.from_bytes(data[pos + 7:pos + 9], "big")
                return data[pos + 9:pos + 9 + name_len].decode("ascii")
            pos += 4 + ext_len
    except (IndexError, UnicodeDecodeError):
        return None
    return None


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
    up_reader, up_writer = await _open(egress, event, normalize_host(host), port)
    writer.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    await writer.drain()
    await _kernel_relay(reader, writer, up_reader, up_writer, egress, event, b"")


async def _refuse(writer: asyncio.StreamWriter, event: dict[str, Any], decision: Decision | None) -> None:
    if writer.is_closing():
        return
    protocol = event.get("protocol")
    target = f"{event.get('host')}:{event.get('port')}"
    with contextlib.suppress(ConnectionError, OSError):
        if protocol == "socks5":
            writer.write(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00" if decision else
                         b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00")
        elif protocol in ("http", "connect", "?") and not event.get("established"):
            if decision is not None:
                body = (f"stockade: egress to {target} denied: {decision.reason}\n"
                        f"(rule: {decision.rule}; a policy allows hosts with network.allow = [\"HOST[:PORT]\"])\n")
                status = "403 Forbidden"
            else:
                body = f"stockade: could not reach {target}: {event.get('reason', 'bad request')}\n"
                status = "502 Bad Gateway"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                  up_writer: asyncio.StreamWriter, egress: Egress, event: dict[str, Any], first: bytes,
                  redact: list[bytes]) -> None:
    """An intercepted exchange, copied through Python both ways until either side closes; bytes out count
    against max_egress_bytes. ``redact``: values masked (same length, so framing holds) in what comes back,
    also across chunk boundaries."""
    event["established"] = True

    async def outbound() -> None:
        data = first
        while True:
            if data:
                _count_out(egress, event, len(data))
                if egress.egress_bytes > egress.max_egress_bytes:
                    event["reason"] = "network.max_egress_bytes reached"
                    return
                up_writer.write(data)
                await up_writer.drain()
            data = await reader.read(RELAY_CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    if up_writer.can_write_eof():
                        up_writer.write_eof()
                return

    keep = max((len(v) for v in redact), default=1) - 1

    async def inbound() -> None:
        held = b""
        while True:
            data = await up_reader.read(RELAY_CHUNK)
            if "status" not in event:
                _note_status(data, event)
            event["bytes_in"] += len(data)
            if redact:
                data = held + data
                for value in redact:
                    data = data.replace(value, b"*" * len(value))
                if data and keep and not up_reader.at_eof():  # a value may straddle the next chunk
                    data, held = data[:-keep], data[-keep:]
                else:
                    held = b""
            if data:
                writer.write(data)
                await writer.drain()
            elif up_reader.at_eof() and not held:
                return

    tasks = [asyncio.ensure_future(outbound()), asyncio.ensure_future(inbound())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[0] in done and not event.get("reason"):  # client finished sending: wait for the answer
            await tasks[1]
    except (ConnectionError, OSError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        up_writer.close()


async def _kernel_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                        up_writer: asyncio.StreamWriter, egress: Egress, event: dict[str, Any], first: bytes,
                        watch_status: bool = False) -> None:
    """An untouched tunnel: after what Python already read is passed on, bytes move socket -> pipe -> socket
    inside the kernel (splice), counted against the caps but never copied through Python. ``watch_status``:
    the answer's HTTP status is read (peeked, not consumed) for the event."""
    event["established"] = True
    for w in (writer, up_writer):  # from here on nothing may land in the streams' buffers
        w.transport.pause_reading()  # type: ignore[attr-defined]
    leftover = first + _take_buffered(reader)
    if leftover:
        _count_out(egress, event, len(leftover))
        if egress.egress_bytes > egress.max_egress_bytes:  # checked before anything leaves
            event["reason"] = "network.max_egress_bytes reached"
            return
        up_writer.write(leftover)
    back = _take_buffered(up_reader)
    if back:
        event["bytes_in"] += len(back)
        writer.write(back)
        if watch_status:
            _note_status(back, event)
            watch_status = False
    await asyncio.gather(writer.drain(), up_writer.drain())
    # duplicates of the two sockets: asyncio will not watch a descriptor a transport owns
    client, upstream = (socket.socket(fileno=os.dup(w.get_extra_info("socket").fileno())) for w in (writer, up_writer))
    for sock in (client, upstream):
        sock.setblocking(False)  # a socket object made from a descriptor starts blocking, and so would the original
    out = asyncio.ensure_future(_pump(client, upstream, egress, event, outbound=True))
    inbound = asyncio.ensure_future(_pump(upstream, client, egress, event, outbound=False,
                                          watch_status=watch_status))
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


def _count_out(egress: Egress, event: dict[str, Any], n: int) -> None:
    egress.egress_bytes += n
    event["bytes_out"] += n


def _note_status(data: bytes, event: dict[str, Any]) -> None:
    if data.startswith(b"HTTP/"):
        with contextlib.suppress(ValueError, IndexError):
            event["status"] = int(data.split(b" ", 2)[1])


async def _pump(src: Any, dst: Any, egress: Egress, event: dict[str, Any], outbound: bool,
                watch_status: bool = False) -> None:
    loop = asyncio.get_running_loop()
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    flags = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
    in_pipe = 0
    try:
        while True:
            if not in_pipe:
                if watch_status:
                    try:
                        _note_status(src.recv(64, socket.MSG_PEEK), event)
                        watch_status = False
                    except BlockingIOError:
                        await _ready(loop, src.fileno(), loop.add_reader, loop.remove_reader)
                        continue
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
                    _count_out(egress, event, n)
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
