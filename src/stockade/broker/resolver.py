"""The host's name resolution for the broker, apart from the proxy so the core can hold a resolver
without importing the proxy (h11, ssl) before a sandbox with a network needs it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .rules import IPAddress, parse_ip

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=1)  # SOCK_STREAM
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = parse_ip(str(sockaddr[0]))
        if ip is not None and ip not in out:
            out.append(ip)
    return out
