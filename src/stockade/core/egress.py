"""Egress wiring: the environment that points clients at the broker, and a live sandbox's rules."""

from __future__ import annotations

import builtins
import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..audit import AuditEvent, Redactor
from ..broker.rules import RuleError
from ..errors import PolicyError
from ..policy import NetworkPolicy, Policy
from ..runtime.base import SandboxLayout
from .base import CoreBase

if TYPE_CHECKING:
    from ..broker.secrets import BoundSecret
    from ..broker.server import BrokerEndpoint


def proxy_env(layout: SandboxLayout) -> dict[str, str]:
    """What every common client reads (curl, pip, npm, git, requests, httpx, node) to find the proxy."""
    http, socks = f"http://127.0.0.1:{layout.http_proxy_port}", f"socks5h://127.0.0.1:{layout.socks_port}"
    return {name: value for names, value in (
        (("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"), http),
        (("ALL_PROXY", "all_proxy"), socks),
        (("NO_PROXY", "no_proxy"), "localhost,127.0.0.1,::1"),
        # node's fetch reads none of the above before node 24: a preload points it at the proxy
        (("NODE_OPTIONS",), "--require /opt/stockade/agent/node_proxy.js"),
    ) for name in names}


def trust_env(layout: SandboxLayout) -> dict[str, str]:
    """Where clients find the trust bundle that includes the sandbox's CA (for intercepted hosts)."""
    bundle = layout.trust_bundle
    return {"SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle, "PIP_CERT": bundle,
            "GIT_SSL_CAINFO": bundle, "NODE_EXTRA_CA_CERTS": layout.sandbox_ca}


@dataclass
class EgressPlan:
    """What a new sandbox gets for its network: the broker (None: network off), files to place (the trust
    bundle with its own CA), its environment (the caller's plus the proxy's and secrets' placeholders) and
    the redactor of its secrets' values."""

    broker: BrokerEndpoint | None
    files: dict[str, bytes]
    envs: dict[str, str]
    redact: Redactor


class Egress(CoreBase):
    """The broker of each sandbox: made at create, its rules changed while it runs."""

    def _egress_for(self, sandbox_id: str, policy: Policy, layout: SandboxLayout, envs: dict[str, str],
                    tenant: str | None, user_id: str | None) -> EgressPlan:
        if policy.network.mode != "allowlist":
            # the proxy ports refuse with the reason (op net_off); pip retries once, which prints the reason
            return EgressPlan(None, {}, {**proxy_env(layout), "PIP_RETRIES": "1", **envs}, Redactor())
        from ..broker.server import BrokerEndpoint  # (only a sandbox with a network needs the broker)

        secrets_: builtins.list[BoundSecret] = []
        ca = None
        if policy.secrets:  # (cryptography, through broker.secrets, is imported only then)
            from ..broker.secrets import load_secrets
            secrets_ = load_secrets(dict(policy.secrets))
        redact = Redactor(sec.value for sec in secrets_)

        def on_network(event: dict[str, Any]) -> None:
            self.audit.record(AuditEvent("network.connection", redact(event), sandbox_id, tenant, user_id))

        files: dict[str, bytes] = {}
        if secrets_:
            from ..broker.secrets import SandboxCA, sandbox_trust_bundle
            ca = SandboxCA(sandbox_id, datetime.timedelta(seconds=policy.lifetime.max_lifetime + 3600))
            files = {layout.trust_bundle: sandbox_trust_bundle(ca.pem), layout.sandbox_ca: ca.pem}
        try:
            broker = BrokerEndpoint(sandbox_id, policy.network, on_network, self._resolve, secrets_, ca,
                                    self.host_groups)
        except RuleError as exc:
            raise PolicyError("network.allow", str(exc)) from None
        # placeholders win over same-named envs: a secret's real value never enters the sandbox
        envs = {**proxy_env(layout), **(trust_env(layout) if secrets_ else {}), **envs,
                **{sec.name: sec.placeholder.decode() for sec in secrets_}}
        return EgressPlan(broker, files, envs, redact)

    async def _resolve(self, host: str, port: int) -> builtins.list[Any]:
        return await self.resolver(host, port)  # an attribute, so a test can map made-up names

    def update_network(self, sandbox_id: str, changes: dict[str, Any]) -> NetworkPolicy:
        """Narrow or widen a live sandbox's egress; new connections see it at once."""
        sb = self.get(sandbox_id)
        policy = sb.policy.with_overrides(network=changes)
        if sb.broker is None:
            if policy.network.mode != "none":
                raise PolicyError("network.mode", "this sandbox was created without a network; create it with "
                                  "network.mode = \"allowlist\" to open hosts later")
        else:
            network = policy.network
            if network.mode == "none":  # no more egress: an empty allow list denies everything
                network = network.model_copy(update={"allow": []})
            try:
                sb.broker.update(network)
            except RuleError as exc:
                raise PolicyError("network.allow", str(exc)) from None
        sb.policy = policy
        self._record(sb, "network.update", {"changes": changes, "network": policy.to_display()["network"]})
        return policy.network

    def network_events(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        sb = self.get(sandbox_id)
        return builtins.list(sb.broker.events) if sb.broker is not None else []

