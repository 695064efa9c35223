"""What a tunnel's first bytes are, before anything is forwarded: a TLS ClientHello (reassembled across
reads and records) and the name it asks for, or the start of an HTTP/1.x request.

The ClientHello parser is written by hand: the libraries that parse one (tlslite-ng, scapy, dpkt) are
whole TLS stacks or packet toolkits, and this needs forty strict lines over bytes the broker already holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HELLO = 64 * 1024          # a ClientHello, with post-quantum key shares, is a few KiB; 64 KiB bounds it
_HTTP_START = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} ")  # a method token and a space
EXT_SERVER_NAME = 0x0000
EXT_ECH = 0xFE0D               # encrypted_client_hello: the real name is hidden behind the outer one


class Unclassifiable(ValueError):
    """The first bytes are neither a usable ClientHello nor HTTP/1.x; the message says why."""


@dataclass(frozen=True)
class Hello:
    kind: str                  # "tls" or "http"
    sni: str | None = None     # the ClientHello's host_name, when kind == "tls"


def classify(data: bytes) -> Hello | None:
    """``Hello`` once ``data`` is enough to decide, None when more bytes are needed; ``Unclassifiable``
    when it can never be accepted."""
    if not data:
        return None
    if data[0] == 0x16:
        body = _handshake(data)
        return None if body is None else Hello("tls", _sni(body))
    if data.startswith(b"PRI * HTTP/2.0"[:len(data)]):
        if len(data) < 14:
            return None
        raise Unclassifiable("HTTP/2 with prior knowledge: the broker checks HTTP/1.x Host headers only")
    if _HTTP_START.match(data):
        return Hello("http")
    if len(data) < 34 and re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*", data):
        return None  # perhaps a method still arriving
    raise Unclassifiable("neither TLS nor HTTP/1.x (a protocol the policy allows only with a tcp:// rule)")


def _handshake(data: bytes) -> bytes | None:
    """The ClientHello message body, reassembled from as many handshake records as it spans."""
    message = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if kind != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            raise Unclassifiable("not a TLS handshake record")
        if len(data) < pos + 5 + length:
            return None
        message += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(message) >= 4:
            if message[0] != 0x01:
                raise Unclassifiable("the first TLS handshake message is not a ClientHello")
            size = int.from_bytes(message[1:4], "big")
            if size + 4 > MAX_HELLO:
                raise Unclassifiable(f"ClientHello larger than {MAX_HELLO} bytes")
            if len(message) >= size + 4:  # what follows (early data) is the server's to judge
                return message[4:size + 4]


def _sni(body: bytes) -> str | None:
    """The single host_name of the server_name extension, or None when there is no such extension."""
    try:
        pos = 2 + 32                                                 # legacy version, random
        pos += 1 + body[pos]                                         # session id
        pos += 2 + int.from_bytes(body[pos:pos + 2], "big")          # cipher suites
        pos += 1 + body[pos]                                         # compression methods
        if pos == len(body):
            return None                                              # no extensions at all
        end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
        if end != len(body):
            raise Unclassifiable("malformed ClientHello: extension lengths do not add up")
        seen: set[int] = set()
        names: list[str] = []
        while pos < end:
            ext_type, ext_len = int.from_bytes(body[pos:pos + 2], "big"), int.from_bytes(body[pos + 2:pos + 4], "big")
            ext = body[pos + 4:pos + 4 + ext_len]
            if len(ext) != ext_len or ext_type in seen:
                raise Unclassifiable("malformed ClientHello: truncated or repeated extension")
            seen.add(ext_type)
            if ext_type == EXT_ECH:
                raise Unclassifiable("ClientHello uses encrypted_client_hello, which hides the real name")
            if ext_type == EXT_SERVER_NAME:
                names = _server_names(ext)
            pos += 4 + ext_len
    except IndexError:
        raise Unclassifiable("malformed ClientHello") from None
    if len(names) > 1:
        raise Unclassifiable(f"ClientHello names {len(names)} servers; one is expected")
    return names[0] if names else None


def _server_names(ext: bytes) -> list[str]:
    if int.from_bytes(ext[:2], "big") != len(ext) - 2:
        raise Unclassifiable("malformed server_name extension")
    names, pos = [], 2
    while pos < len(ext):
        name_type, length = ext[pos], int.from_bytes(ext[pos + 1:pos + 3], "big")
        raw = ext[pos + 3:pos + 3 + length]
        if len(raw) != length or name_type != 0:
            raise Unclassifiable("malformed server_name extension")
        try:
            names.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise Unclassifiable("server_name is not ASCII") from None
        pos += 3 + length
    return names
