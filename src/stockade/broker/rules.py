"""Egress rules: which (host, port) a sandbox may reach. Decided on the requested name before any DNS
lookup; addresses are checked again after the host resolves them (private ranges refused by default).

Rule forms: ``api.example.com``, ``*.example.org`` (subdomains only), ``example.net:8443``,
``192.0.2.10``, ``198.51.100.0/24:443``, ``[2001:db8::1]:443``. ``deny`` wins over ``allow``.

A tunnel carries TLS (whose SNI must name the host) or HTTP/1.x (whose Host must name it), nothing else,
unless an allow rule is marked ``tcp://`` (``tcp://git.example.com:22``, a port is required): then that
host and port take any protocol, relayed unchecked.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# Refused as destinations unless network.allow_private lists them, whatever name led there.
BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "64:ff9b::/96", "100::/64",
))


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    text: str
    host: str | None = None            # exact name
    suffix: str | None = None          # "*.example.org" -> ".example.org"
    network: IPNetwork | None = None   # IP or CIDR
    port: int | None = None
    tcp: bool = False                  # "tcp://": any protocol, not only TLS and HTTP

    def matches(self, host: str, address: IPAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        if self.host is not None:
            return host == self.host
        return self.suffix is not None and host.endswith(self.suffix) and len(host) > len(self.suffix)


def parse_ip(text: str) -> IPAddress | None:
    """An IP literal in any spelling a resolver would accept: dotted, decimal (2130706433), octal
    (0177.0.0.1), hex (0x7f.1), short (127.1), IPv6, IPv4-mapped IPv6 (returned as IPv4)."""
    text = text.strip("[]")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if not text or not all(c in "0123456789abcdefxABCDEFX." for c in text):
            return None
        try:  # inet_aton takes the historical forms that resolvers also take
            ip = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_host(host: str) -> str:
    """Lower-case, strip one trailing dot, IDNA-encode; RuleError if it cannot be a host name."""
    host = host.strip().rstrip(".").lower()
    if parse_ip(host) is not None:
        return str(parse_ip(host))
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise RuleError(f"{host!r} is not a valid host name") from None
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise RuleError(f"{host!r} is not a valid host name")
    return host


def split_target(target: str, default_port: int) -> tuple[str, int]:
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
    if port_text and not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"bad port {port_text[:20]!r}")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    return normalize_host(host), port


def parse_rule(text: str) -> Rule:
    if not isinstance(text, str) or not text.strip():
        raise RuleError("empty rule")
    raw = text.strip()
    if raw.startswith("@"):
        raise RuleError(f"host group {raw!r} is not defined on this host (STOCKADE_HOST_GROUPS)")
    if raw.lower().startswith("tcp://"):
        rule = parse_rule(raw[len("tcp://"):])
        if rule.port is None or "://" in rule.text:
            raise RuleError(f"{raw!r}: a tcp:// rule needs one host and a port, e.g. 'tcp://git.example.com:22'")
        return Rule(raw, rule.host, rule.suffix, rule.network, rule.port, tcp=True)
    if "://" in raw or ("/" in raw and parse_ip(raw.partition("/")[0].strip("[]")) is None):
        raise RuleError(f"{raw!r}: expected a host, optionally with :port (or 'tcp://HOST:PORT'), not a URL"
                        f"{_suggest_host(raw)}")
    port: int | None = None
    body = raw
    if raw.startswith("["):  # [IPv6]:port
        end = raw.find("]")
        if end < 0:
            raise RuleError(f"{raw!r}: unclosed '['")
        body, rest = raw[1:end], raw[end + 1:]
        if rest:
            port = _port(rest.removeprefix(":"), raw)
    elif raw.count(":") == 1:
        body, port_text = raw.split(":")
        port = _port(port_text, raw)
    if "/" in body:
        try:
            return Rule(raw, network=ipaddress.ip_network(body, strict=False), port=port)
        except ValueError:
            raise RuleError(f"{raw!r} is not a valid CIDR") from None
    ip = parse_ip(body)
    if ip is not None:
        return Rule(raw, network=ipaddress.ip_network(ip), port=port)
    if body.startswith("*."):
        return Rule(raw, suffix="." + normalize_host(body[2:]), port=port)
    if "*" in body:
        raise RuleError(f"{raw!r}: a wildcard is only allowed as a leading '*.'")
    return Rule(raw, host=normalize_host(body), port=port)


def _suggest_host(raw: str) -> str:
    from urllib.parse import urlsplit

    try:
        netloc = urlsplit(raw if "://" in raw else "//" + raw).netloc.rpartition("@")[2]
        parse_rule(netloc)
    except (ValueError, RuleError):
        return ""
    return f"; did you mean {netloc!r}?"


GROUP_NAME = re.compile(r"^@[A-Za-z0-9_.-]{1,64}$")


def expand_groups(rules: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Replace each ``@name`` by the rules of the host group ``name`` (groups do not nest)."""
    out: list[str] = []
    for rule in rules:
        if rule.strip().startswith("@"):
            name = rule.strip()[1:]
            if name not in groups:
                raise RuleError(f"host group {rule.strip()!r} is not defined on this host (STOCKADE_HOST_GROUPS)")
            out += groups[name]
        else:
            out.append(rule)
    return out


def _port(text: str, rule: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RuleError(f"{rule!r}: invalid port {text!r}")
    return int(text)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str          # the rule (or built-in check) that decided
    reason: str        # for the 403 body and the audit event


class Rules:
    def __init__(self, allow: list[str], deny: list[str], allow_private: list[str]) -> None:
        self.allow = [parse_rule(r) for r in allow]
        self.deny = [parse_rule(r) for r in deny]
        try:
            self.private_ok = [ipaddress.ip_network(n, strict=False) for n in allow_private]
        except ValueError as exc:
            raise RuleError(f"allow_private: {exc}") from None

    def decide_name(self, host: str, port: int) -> Decision:
        """Before any lookup: is this (name or literal, port) allowed at all?"""
        address = parse_ip(host)
        for rule in self.deny:
            if rule.matches(host, address, port):
                return Decision(False, f"deny:{rule.text}", f"{host}:{port} matches network.deny {rule.text!r}")
        for rule in self.allow:
            if rule.matches(host, address, port):
                return Decision(True, f"allow:{rule.text}", "allowed")
        return Decision(False, "default-deny", f"{host}:{port} is not in network.allow")

    def raw_tcp(self, host: str, port: int) -> bool:
        """Whether a ``tcp://`` allow rule opens this host and port to any protocol."""
        address = parse_ip(host)
        return any(rule.tcp and rule.matches(host, address, port) for rule in self.allow)

    def decide_address(self, host: str, address: IPAddress, port: int) -> Decision:
        """After resolving: refuse private, loopback, link-local, CGNAT, multicast and metadata addresses
        unless allow_private lists them; deny rules on addresses apply too."""
        for rule in self.deny:
            if rule.network is not None and rule.matches(host, address, port):
                return Decision(False, f"deny:{rule.text}", f"{address} matches network.deny {rule.text!r}")
        if any(address in net for net in BLOCKED_NETWORKS) and not any(address in n for n in self.private_ok):
            return Decision(False, "private-address",
                            f"{host} resolves to {address}, a private/internal address; "
                            "add it to network.allow_private to allow it")
        return Decision(True, "resolved", "allowed")
