"""The sandbox policy: one declarative object, enforced the same by every runtime.

Sizes accept "512MiB", "1GiB", "64k", "1.5G" or plain byte counts; durations accept "30s", "5m",
"1h", "250ms" or plain seconds. Every default is the safe value.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .errors import PolicyError

_SIZE_UNITS: dict[str, float] = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}
_DURATION_UNITS: dict[str, float] = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _amount(value: Any, kind: str, units: dict[str, float], forms: str, unit_names: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a {kind}, not a boolean: {forms}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _NUMBER_WITH_UNIT.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"invalid {kind} {value!r}: {forms}")
    if unit not in units:
        raise ValueError(f"invalid {kind} unit {unit!r} in {value!r}: use {unit_names}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"invalid {kind} {value!r}: must be a finite, non-negative amount")
    return number * units[unit]


def parse_size(value: Any) -> int:
    """Bytes from 512MiB / 1G / 4096. Raises ValueError with the accepted forms."""
    return int(_amount(value, "size", _SIZE_UNITS, "use bytes or a unit, e.g. 512MiB, 1GiB, 64k",
                       "B, KiB, MiB, GiB, TiB (or k, M, G)"))


def parse_duration(value: Any) -> float:
    """Seconds from 30s / 5m / 1h / 250ms / 12.5."""
    return _amount(value, "duration", _DURATION_UNITS, "use seconds or a unit, e.g. 30s, 5m, 1h, 250ms",
                   "ms, s, m, h or d")


def format_size(n: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_duration(s: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= factor and s % factor == 0:
            return f"{int(s // factor)}{unit}"
    return f"{s:g}s"


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]

# Sandbox paths a mount may not cover: they hold the system image, the agent, or kernel interfaces.
RESERVED_TARGETS = ("/", "/proc", "/dev", "/sys", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32",
                    "/lib64", "/libx32", "/opt/stockade", "/tmp", "/home/user")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NetworkPolicy(_Section):
    """No network by default. ``allowlist`` opens the hosts in ``allow`` through the egress broker."""

    mode: Literal["none", "allowlist"] = "none"
    allow: list[str] = []            # "api.example.com", "*.example.org", "example.net:8443", "198.51.100.0/24:443"
    deny: list[str] = []             # wins over allow
    allow_private: list[str] = []    # CIDRs a name may resolve to (private ranges are refused otherwise)
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 64   # open at once
    max_egress_bytes: PositiveSize = 1 << 30                         # sent out over the sandbox's life
    extra_ca_certs: str | None = None  # a PEM file the broker trusts for upstreams, beside the host's store
    # TCP ports inside that the sandbox's owner may reach from outside (get_host, the server's port proxy),
    # relayed by the agent to 127.0.0.1/::1; none by default. Independent of mode: inbound, not egress.
    expose: list[Annotated[int, Field(ge=1, le=65535)]] = []

    @field_validator("allow", "deny")
    @classmethod
    def _rules(cls, v: list[str]) -> list[str]:
        from .broker.rules import GROUP_NAME, RuleError, parse_rule

        for i, rule in enumerate(v):
            if rule.strip().startswith("@"):  # a host group: resolved from the host's configuration at start
                if not GROUP_NAME.match(rule.strip()):
                    raise ValueError(f"entry {i}: {rule!r} is not a valid host group name")
                continue
            try:
                parse_rule(rule)
            except RuleError as exc:
                raise ValueError(f"entry {i}: {exc}") from None
        return v

    @field_validator("allow_private")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        for i, cidr in enumerate(v):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"entry {i}: {cidr!r} is not a CIDR such as 10.0.0.0/8") from None
        return v


class Mount(_Section):
    source: str
    target: str
    mode: Literal["ro", "rw"] = "ro"

    @field_validator("source")
    @classmethod
    def _absolute_source(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"host path {v!r} must be absolute")
        return posixpath.normpath(v)

    @field_validator("target")
    @classmethod
    def _safe_target(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"sandbox path {v!r} must be absolute")
        if "\0" in v:
            raise ValueError("sandbox path contains a NUL byte")
        norm = posixpath.normpath(v)
        for reserved in RESERVED_TARGETS:
            if norm == reserved or (reserved != "/" and norm.startswith(reserved + "/")
                                    and reserved not in ("/home/user", "/tmp")):
                raise ValueError(f"sandbox path {v!r} would cover {reserved}, which the sandbox needs; "
                                 "mount under /mnt, /data or /home/user/<dir> instead")
        return norm


def _mount_from_shorthand(v: Any) -> Any:
    # "HOST:SANDBOX[:ro|rw]" is accepted beside the table form.
    if isinstance(v, str):
        parts = v.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"mount {v!r}: use 'HOST:SANDBOX' or 'HOST:SANDBOX:ro|rw'")
        return {"source": parts[0], "target": parts[1], **({"mode": parts[2]} if len(parts) == 3 else {})}
    return v


class FilesystemPolicy(_Section):
    mounts: list[Annotated[Mount, BeforeValidator(_mount_from_shorthand)]] = []
    workspace_size: PositiveSize = 1 << 30
    tmp_size: PositiveSize = 256 << 20

    @field_validator("mounts")
    @classmethod
    def _distinct_targets(cls, v: list[Mount]) -> list[Mount]:
        targets = [m.target for m in v]
        if len(set(targets)) != len(targets):
            raise ValueError("two mounts share one sandbox path")
        return v


class LimitsPolicy(_Section):
    memory: Annotated[int, BeforeValidator(parse_size), Field(ge=16 << 20)] = 512 << 20
    cpus: Annotated[float, Field(gt=0, le=1024)] = 1.0
    pids: Annotated[int, Field(ge=8, le=1 << 22)] = 256
    command_timeout: PositiveDuration = 60.0      # the default for a call that passes no timeout
    max_command_timeout: PositiveDuration | None = None  # a cap on a call's own timeout; None: the lifetime
    output: PositiveSize = 1 << 20
    open_files: Annotated[int, Field(ge=16, le=1 << 20)] = 1024
    file_size: PositiveSize = 1 << 30


class LifetimePolicy(_Section):
    timeout: PositiveDuration = 300.0
    max_lifetime: PositiveDuration = 3600.0
    # ends the sandbox after this long without a request or a running foreground command; None: never
    idle_timeout: PositiveDuration | None = None


class SecretPolicy(_Section):
    """A credential the sandbox can use but never see: inside, env NAME holds a placeholder; the broker
    puts the real value in requests to ``hosts`` only."""

    value_from: str                      # "env:VAR" or "file:PATH", read on the host when the sandbox starts
    hosts: list[str]                     # rules as in network.allow
    header: str | None = None            # set this header when the request does not carry the placeholder
    format: str = "{secret}"             # e.g. "Bearer {secret}"

    @field_validator("value_from")
    @classmethod
    def _source(cls, v: str) -> str:
        kind, _, rest = v.partition(":")
        if kind not in ("env", "file") or not rest:
            raise ValueError("use env:VARIABLE or file:/absolute/path")
        if kind == "file" and not rest.startswith("/"):
            raise ValueError("file: needs an absolute path")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a secret needs at least one host")
        return NetworkPolicy._rules(v)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if "{secret}" not in v:
            raise ValueError("format must contain {secret}")
        return v

    @field_validator("header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in " :\r\n\t")):
            raise ValueError(f"{v!r} is not a header name")
        return v


class ArtifactsPolicy(_Section):
    """What a sandbox may hand to the host through save-artifact. Artifacts outlive the sandbox."""

    count: Annotated[int, Field(ge=0, le=100_000)] = 100
    max_size: PositiveSize = 64 << 20          # bytes per artifact
    total_size: PositiveSize = 256 << 20       # bytes for all of one sandbox's artifacts
    retention: PositiveDuration = 7 * 86400.0  # how long the host keeps them after they are saved


Control = Literal["memory", "pids", "cpu"]


class Policy(_Section):
    """What a sandbox may do. Immutable; derive variants with :meth:`with_overrides`."""

    network: NetworkPolicy = NetworkPolicy()
    filesystem: FilesystemPolicy = FilesystemPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    lifetime: LifetimePolicy = LifetimePolicy()
    artifacts: ArtifactsPolicy = ArtifactsPolicy()
    secrets: dict[str, SecretPolicy] = {}
    # Controls the policy accepts running without when the host cannot apply them (e.g. no cgroups
    # for an unprivileged user). Empty by default: a missing control is an error.
    allow_missing_controls: list[Control] = []

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError("", f"a policy is a mapping of sections, not {type(data).__name__}")
        try:
            policy = cls.model_validate(data)
        except ValidationError as exc:
            raise _policy_error(exc) from None
        policy._check_consistency()
        return policy

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise PolicyError("", f"cannot read policy file {p}: {exc.strerror}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError("", f"{p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}") \
                from None
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, value: Policy | dict[str, Any] | str | Path | None) -> Policy:
        """A Policy from what the SDK accepts: a Policy, a dict, a file path, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, Policy):
            return value
        if isinstance(value, str | Path):
            return cls.from_file(value)
        return cls.from_dict(value)

    def with_overrides(self, **sections: dict[str, Any]) -> Policy:
        """A copy with some fields replaced, validated like any input: ``with_overrides(limits={...})``."""
        data = self.model_dump()
        for section, fields in sections.items():
            if section not in data or not isinstance(data[section], dict):
                raise PolicyError(section, "unknown policy section")
            data[section].update(fields)
        return Policy.from_dict(data)

    def _check_consistency(self) -> None:
        for name in self.secrets:
            if not name or name[0].isdigit() or not all(c.isalnum() or c == "_" for c in name):
                raise PolicyError(f"secrets.{name}", "the name must be an environment variable name")
            if self.network.mode != "allowlist":
                raise PolicyError(f"secrets.{name}", "secrets travel through the egress broker: "
                                  "set network.mode = \"allowlist\"")
        if self.network.mode == "none" and self.network.allow:
            raise PolicyError("network.allow", "set network.mode = \"allowlist\" to open these hosts")
        if self.lifetime.timeout > self.lifetime.max_lifetime:
            raise PolicyError("lifetime.timeout", f"{format_duration(self.lifetime.timeout)} exceeds "
                              f"lifetime.max_lifetime ({format_duration(self.lifetime.max_lifetime)})")

    def to_display(self) -> dict[str, Any]:
        """The effective policy with sizes and durations in human units (what `policy show` prints)."""
        d = self.model_dump()
        fs, lim, life = d["filesystem"], d["limits"], d["lifetime"]
        for key in ("workspace_size", "tmp_size"):
            fs[key] = format_size(fs[key])
        for key in ("memory", "output", "file_size"):
            lim[key] = format_size(lim[key])
        lim["command_timeout"] = format_duration(lim["command_timeout"])
        if lim["max_command_timeout"] is not None:
            lim["max_command_timeout"] = format_duration(lim["max_command_timeout"])
        for key in ("timeout", "max_lifetime", "idle_timeout"):
            if life[key] is not None:
                life[key] = format_duration(life[key])
        d["network"]["max_egress_bytes"] = format_size(d["network"]["max_egress_bytes"])
        art = d["artifacts"]
        for key in ("max_size", "total_size"):
            art[key] = format_size(art[key])
        art["retention"] = format_duration(art["retention"])
        return d


def _policy_error(exc: ValidationError) -> PolicyError:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    reason = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        reason = "unknown field (check the spelling; see `stockade policy show` for every field)"
    elif err["type"] == "literal_error":
        reason = f"{reason}, got {err.get('input')!r}"
    return PolicyError(field, reason)
