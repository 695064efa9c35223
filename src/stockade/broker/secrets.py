"""Secrets at the boundary: the sandbox holds placeholders, the broker holds the values.

For a host bound to a secret the broker terminates the client's TLS with a leaf certificate from a
per-sandbox certificate authority (trusted inside that sandbox only), puts the real value into the
request headers, and talks TLS to the real host with full verification. Responses are scrubbed of the
value on the way back, so an upstream that echoes it does not leak it into the sandbox.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import secrets as token
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import PolicyError
from ..policy import SecretPolicy
from .rules import Rule, parse_ip, parse_rule


@dataclass(frozen=True)
class BoundSecret:
    name: str
    value: bytes
    placeholder: bytes
    hosts: tuple[Rule, ...]
    header: str | None
    format: str

    def bound_to(self, host: str, port: int) -> bool:
        return any(rule.matches(host, parse_ip(host), port) for rule in self.hosts)


def load_secrets(specs: dict[str, SecretPolicy], environ: dict[str, str] | None = None) -> list[BoundSecret]:
    """Read each value on the host and mint its per-sandbox placeholder."""
    environ = dict(os.environ) if environ is None else environ
    out = []
    for name, spec in specs.items():
        kind, _, source = spec.value_from.partition(":")
        if kind == "env":
            if source not in environ:
                raise PolicyError(f"secrets.{name}.value_from", f"environment variable {source} is not set on the host")
            value = environ[source].encode()
        else:
            try:
                value = Path(source).read_bytes().strip()
            except OSError as exc:
                raise PolicyError(f"secrets.{name}.value_from", f"cannot read {source}: {exc.strerror}") from None
        if not value or b"\r" in value or b"\n" in value:
            raise PolicyError(f"secrets.{name}.value_from", "the value is empty or spans lines")
        placeholder = f"stockade-secret-{name.lower()}-{token.token_hex(12)}".encode()
        out.append(BoundSecret(name, value, placeholder, tuple(parse_rule(h) for h in spec.hosts), spec.header,
                               spec.format))
    return out


def _memfd_path(name: str, data: bytes) -> tuple[int, str]:
    fd = os.memfd_create(name)
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


@dataclass
class SandboxCA:
    """An ephemeral CA for one sandbox; its key never touches a disk or the sandbox."""

    sandbox_id: str
    lifetime: datetime.timedelta
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"stockade sandbox {self.sandbox_id}")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + self.lifetime)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``host``, signed by this CA (cached)."""
        if host in self._contexts:
            return self._contexts[host]
        key = ec.generate_private_key(ec.SECP256R1())
        ip = parse_ip(host)
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(str(ip))) if ip else x509.DNSName(host)
        now = datetime.datetime.now(datetime.UTC)
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + self.lifetime)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.pem
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert_fd, cert_path = _memfd_path("leaf", chain)
        key_fd, key_path = _memfd_path("key", key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        finally:
            os.close(cert_fd)
            os.close(key_fd)
        self._contexts[host] = ctx
        return ctx


def upstream_context(extra_ca_certs: str | None) -> ssl.SSLContext:
    """Full verification against the host's trust store, plus the policy's extra CA file if any."""
    ctx = ssl.create_default_context()
    if extra_ca_certs:
        ctx.load_verify_locations(cafile=extra_ca_certs)
    return ctx


def sandbox_trust_bundle(ca_pem: bytes) -> bytes:
    """The host's CA bundle plus the sandbox's CA: what every client inside trusts."""
    for candidate in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        try:
            return Path(candidate).read_bytes().rstrip(b"\n") + b"\n" + ca_pem
        except OSError:
            continue
    return ca_pem


def _byte_forms(b: int) -> list[bytes]:
    """The spellings of one byte an echo service plausibly produces: raw, percent-encoded, a JSON escape,
    an HTML character reference (hex in either case)."""
    forms = [re.escape(bytes([b]))]
    hexes = f"{b:02x}"
    hex_class = "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in hexes).encode()
    forms += [b"%" + hex_class, b"\\\\[uU]00" + hex_class, b"&#[xX]" + hex_class + b";",
              b"&#0?" + str(b).encode() + b";"]
    escapes = {ord("/"): b"\\\\/", ord('"'): b'\\\\"', ord("\\"): b"\\\\\\\\", ord("\t"): b"\\\\t"}
    if b in escapes:
        forms.append(escapes[b])
    return forms


MAX_FORM = 7  # the longest spelling of one byte above: "&#0NNN;"


def _base64_needles(value: bytes) -> list[bytes]:
    """The part of a base64 stream that encodes ``value`` alone, for each of its three alignments in the
    stream (the characters that also carry a neighbour's bits are left out); std and url alphabets."""
    out = []
    for align in range(3):
        encoded = base64.b64encode(b"\0" * align + value)
        start = (0, 2, 3)[align]
        end = ((align + len(value)) * 8) // 6
        needle = encoded[start:end]
        out += [needle, needle.translate(bytes.maketrans(b"+/", b"-_"))]
    return out


class Masker:
    """Masks secret values in a byte stream read in pieces of any size: each value in every form of
    ``_byte_forms`` per byte, its base64 (std/url, any alignment) and hex, each masked by as many ``*``
    as the spelling is long (so lengths and framing hold). Up to the longest match minus one byte is held
    back between pieces, so a value split across reads is still found."""

    def __init__(self, values: list[bytes]) -> None:
        needles = {v for v in values if v}
        for value in list(needles):
            needles.update(_base64_needles(value))
            needles.update({value.hex().encode(), value.hex().upper().encode()})
        # longest first, so a spelling is masked whole rather than by a shorter needle inside it
        ordered = sorted(needles, key=len, reverse=True)
        self.pattern = re.compile(b"|".join(b"".join(b"(?:" + b"|".join(_byte_forms(c)) + b")" for c in n)
                                            for n in ordered))
        self.keep = max(len(n) for n in ordered) * MAX_FORM - 1
        self.held = b""

    def mask(self, data: bytes) -> bytes:
        return self.pattern.sub(lambda m: b"*" * len(m.group()), data)

    def feed(self, data: bytes) -> bytes:
        """What may be passed on now; the rest is held for the next piece or ``flush``."""
        data = self.mask(self.held + data)
        cut = max(0, len(data) - self.keep)
        out, self.held = data[:cut], data[cut:]
        return out

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out
