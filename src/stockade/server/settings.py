"""Server settings: defaults, then a TOML file (``--config`` or STOCKADE_CONFIG), then STOCKADE_<SETTING>
variables (STOCKADE_PORT, STOCKADE_DATABASE_URL, STOCKADE_WARM_POOL...), then command-line options.
Invalid settings name the field, as policies do.

    [server]
    host = "127.0.0.1"
    port = 8421
    data_dir = "/var/lib/stockade"
    database_url = "postgresql://user:pass@db/stockade"   # default: SQLite in data_dir

    [tenant_defaults]            # every tenant, unless [tenants.NAME] says otherwise
    max_sandboxes = 20
    one_sandbox_per_user = "reuse"

    [tenants.acme]
    max_memory = "64GiB"
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import PolicyError
from ..policy import Duration, Policy, PositiveDuration, PositiveSize, Size, _policy_error


def _within(cidr: str, ranges: list[str]) -> bool:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
        return any(net.version == r.version and net.subnet_of(r)  # type: ignore[arg-type]
                   for r in (ipaddress.ip_network(x, strict=False) for x in ranges))
    except ValueError:
        return False


def _under(path: str, directories: list[str]) -> bool:
    """Whether ``path``, symlinks resolved, is one of ``directories`` or below one."""
    real = os.path.realpath(path)
    return any(real == d or real.startswith(d.rstrip("/") + "/") for d in map(os.path.realpath, directories))


def _comma_list(value: Any) -> Any:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def _template_counts(value: Any) -> Any:
    """``{"py312": 4}``, or "py312=4,node=2" from the environment; each name a valid template name."""
    if isinstance(value, str):
        pairs = [part.strip().partition("=") for part in value.split(",") if part.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("write NAME=COUNT[,NAME=COUNT...]")
        value = {name.strip(): count.strip() for name, _, count in pairs}
    if isinstance(value, dict):
        from ..templates.store import NAME_RE

        for name in value:
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a template name (a-z, 0-9, '.', '_', '-', at most 64)")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantSettings(_Model):
    max_sandboxes: Annotated[int, Field(ge=0)] = 20             # running at once
    max_memory: Size = 32 << 30                                 # sum of limits.memory of running sandboxes
    max_cpus: Annotated[float, Field(ge=0)] = 32.0              # sum of limits.cpus
    max_lifetime: PositiveDuration = 86400.0                    # cap on a policy's lifetime.max_lifetime
    # a second create for the same user_id: "reuse" answers with the live one, "reject" with 409
    one_sandbox_per_user: Literal["off", "reuse", "reject"] = "off"
    rate_limit: Annotated[float, Field(gt=0)] = 100.0           # requests per second and key (sustained)
    rate_burst: Annotated[int, Field(ge=1)] = 200
    # A policy names host resources: mounts, secrets read from the server's env or files, CA files. A
    # tenant may use none of them unless allowed here (else a tenant could mount the server's files, or
    # have the server's own credentials sent to a host of its choosing).
    allow_mounts: list[str] = []        # host directories (and what is below them) a mount may come from
    allow_secrets: list[str] = []       # value_from patterns, e.g. "env:ACME_*" or "file:/etc/stockade/acme/*"
    allow_ca_files: list[str] = []      # host directories a network.extra_ca_certs file may be in
    # CIDRs a policy's network.allow_private may open (each entry must lie inside one): private ranges are
    # the server's own network, its loopback services and the cloud metadata address
    allow_private: list[str] = []
    runtimes: list[str] | None = None   # the runtimes this tenant's sandboxes may run on; None: every one served

    def check_runtime(self, name: str) -> None:
        if self.runtimes is not None and name not in self.runtimes:
            raise PolicyError("runtime", f"this tenant may not use runtime {name!r} (server setting runtimes; "
                              f"allowed: {', '.join(self.runtimes) or 'none'})")

    def check(self, policy: Policy) -> None:
        """Refuse what the policy would take from the server host beyond what this tenant is allowed."""
        for i, mount in enumerate(policy.filesystem.mounts):
            if not _under(mount.source, self.allow_mounts):
                raise PolicyError(f"filesystem.mounts.{i}.source", f"{mount.source} is not in a directory this "
                                  "tenant may mount (server setting allow_mounts)")
        for name, secret in policy.secrets.items():
            if not any(fnmatch.fnmatchcase(secret.value_from, pattern) for pattern in self.allow_secrets):
                raise PolicyError(f"secrets.{name}.value_from", f"{secret.value_from!r} is not a secret source "
                                  "this tenant may use (server setting allow_secrets)")
        for i, cidr in enumerate(policy.network.allow_private):
            if not _within(cidr, self.allow_private):
                raise PolicyError(f"network.allow_private.{i}", f"{cidr} is not a range this tenant may reach on "
                                  "the server's network (server setting allow_private)")
        ca = policy.network.extra_ca_certs
        if ca is not None and not _under(ca, self.allow_ca_files):
            raise PolicyError("network.extra_ca_certs", f"{ca} is not in a directory this tenant may read "
                              "(server setting allow_ca_files)")


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8421
    data_dir: Path | None = None                 # None: the host default (HostConfig)
    database_url: str | None = None
    audit_output: Size = 64 << 10                # of each command's stdout and stderr, kept in the audit log
    audit_retention: PositiveDuration = 30 * 86400.0
    # a cap on the audit log's size: beyond it the oldest events are pruned (checked every reaper_interval);
    # None: only audit_retention limits it
    audit_max_size: PositiveSize | None = None
    max_upload: PositiveSize = 1 << 30           # one file upload
    max_body: PositiveSize = 1 << 20             # any other request body (JSON)
    reaper_interval: Duration = 60.0             # how often expired audit events are pruned
    # slow clients: a request's head must arrive within header_timeout, a body may pause at most body_timeout;
    # one client address may hold max_connections_per_client connections (behind a proxy: raise it), and
    # the server max_connections in all (over it: 503)
    header_timeout: PositiveDuration = 10.0
    body_timeout: PositiveDuration = 60.0
    max_connections_per_client: Annotated[int, Field(ge=1)] = 64
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # Sandboxes started ahead of demand for creates whose policy equals warm_pool_policy (network none);
    # each is handed out once. 0: none.
    warm_pool: Annotated[int, Field(ge=0, le=1000)] = 0
    warm_pool_policy: dict[str, Any] = {}
    # The same per template of the server's store (its data_dir's templates), with warm_pool_policy:
    # {"py312" = 4}, or STOCKADE_WARM_POOLS="py312=4,node=2". Each name must exist when the server starts.
    warm_pools: Annotated[dict[str, Annotated[int, Field(ge=0, le=1000)]], BeforeValidator(_template_counts)] = {}
    # The runtime sandboxes get unless a create names another (None: the host's, STOCKADE_RUNTIME or "jail"),
    # and the others a create may name ("jail,gvisor" from the environment). Each is started, and what a
    # killed run left of its sandboxes swept, when the server starts.
    runtime: str | None = None
    runtimes: Annotated[list[str], BeforeValidator(_comma_list)] = []
    # The policy a sandbox created through the E2B front end starts from (E2B's create has no policy; its
    # network options are applied over this one). {}: stockade's defaults.
    e2b_policy: dict[str, Any] = {}
    # The domain E2B's get_host(port) names, "{port}-{sandboxID}.{domain}": a wildcard name that reaches this
    # server (behind a TLS proxy, say). None: the name each create reached the server by.
    e2b_domain: str | None = None
    tenant_defaults: TenantSettings = TenantSettings()
    tenants: dict[str, TenantSettings] = {}

    def tenant(self, name: str) -> TenantSettings:
        return self.tenants.get(name, self.tenant_defaults)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> ServerSettings:
        data: dict[str, Any] = {}
        path = config_file or (Path(os.environ["STOCKADE_CONFIG"]) if os.environ.get("STOCKADE_CONFIG") else None)
        if path is not None:
            try:
                raw = tomllib.loads(path.read_text())
            except OSError as exc:
                raise PolicyError("", f"cannot read the config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise PolicyError("", f"{path} is not valid TOML: {exc}") from None
            unknown = set(raw) - {"server", "tenant_defaults", "tenants"}
            if unknown:
                raise PolicyError(sorted(unknown)[0],
                                  "unknown section; use [server], [tenant_defaults] or [tenants.NAME]")
            data.update(raw.get("server", {}))
            data.update({k: raw[k] for k in ("tenant_defaults", "tenants") if k in raw})
            if "tenants" in data and "tenant_defaults" in raw:  # a tenant's table overrides the defaults
                data["tenants"] = {n: {**raw["tenant_defaults"], **t} for n, t in data["tenants"].items()}
        for name, info in cls.model_fields.items():  # every scalar setting also from STOCKADE_<NAME>
            value = os.environ.get(f"STOCKADE_{name.upper()}")
            if value and info.annotation not in (TenantSettings, dict[str, TenantSettings], dict[str, Any]):
                data[name] = value
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _policy_error(exc) from None
