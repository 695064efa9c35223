"""E2B's control plane under /e2b: create, connect, list, get, timeout, kill (v2 and the v1 forms the SDKs
still call), authenticated by ``X-API-KEY`` (a stockade key: the tenant comes from it).

Templates: ``base`` and ``code-interpreter-v1`` (the SDKs' defaults) are stockade's default sandbox (its
code interpreter is built in); stockade has no other templates yet, so any other name is refused by name.
Network: stockade's default is no network at all (E2B's is open internet). ``network.allowOut`` becomes
the egress broker's allowlist (names, ``*.domain``, IPs, CIDRs), ``denyOut`` its deny list, through the
tenant's gate like a native policy; ``allow_internet_access=False`` keeps the network off."""

from __future__ import annotations

import datetime
import math
import urllib.parse
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ...core.sandboxes import ManagedSandbox
from ...errors import PolicyError
from ...policy import Policy
from . import PREFIX
from .core import Core, E2BSandbox, core_of
from .routing import E2BRoute, not_supported

# The envd features this front end implements, as the SDKs gate them: stdin (0.3.0), the default user
# (0.4.0), close_stdin (0.5.2), octet-stream upload (0.5.7). Not file metadata (0.6.2) nor the watch
# event entries (0.6.3): claiming those would make the SDKs send what is not served.
ENVD_VERSION = "0.5.7"
DEFAULT_TEMPLATES = frozenset({"base", "code-interpreter-v1", "code-interpreter"})
DEFAULT_TIMEOUT = 300.0
CLIENT_ID = "stockade"

router = APIRouter(prefix=PREFIX, route_class=E2BRoute, include_in_schema=False)


class _In(BaseModel):
    # E2B adds fields over time: unknown ones are ignored, the ones that would change meaning are refused below
    model_config = ConfigDict(extra="ignore")


class NetworkIn(_In):
    allowOut: list[Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=1000)
    denyOut: list[Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=1000)
    allowPublicTraffic: bool | None = None


class NewSandbox(_In):
    templateID: Annotated[str, Field(min_length=1, max_length=256)] = "base"
    timeout: Annotated[float, Field(ge=0, le=10 * 365 * 86400)] | None = None
    metadata: dict[Annotated[str, Field(min_length=1, max_length=256)],
                   Annotated[str, Field(max_length=4096)]] | None = None
    envVars: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=1 << 16)]] | None = None
    allow_internet_access: bool | None = None
    network: NetworkIn | None = None
    secure: bool | None = None
    autoPause: bool | None = None
    mcp: Any = None
    volumeMounts: list[Any] | None = None


class Timeout(_In):
    timeout: Annotated[float, Field(ge=0, le=10 * 365 * 86400)]


class SnapshotIn(_In):
    name: str | None = None
    memory: bool | None = None


class ConnectIn(_In):
    timeout: Annotated[float, Field(ge=0, le=10 * 365 * 86400)] | None = None


def policy_for(core: Core, body: NewSandbox) -> Policy:
    """The stockade policy an E2B create stands for: the server's e2b_policy with E2B's network options."""
    for name, value in (("autoPause", body.autoPause), ("mcp", body.mcp), ("volumeMounts", body.volumeMounts)):
        if value:
            raise PolicyError(name, "is not supported by stockade (pause, MCP gateways and volumes are not built)")
    data: dict[str, Any] = dict(core.srv.settings.e2b_policy)
    net = body.network
    # denyOut alone changes nothing: with nothing allowed out the network stays off
    if body.allow_internet_access is not False and net is not None and net.allowOut:
        data["network"] = {**data.get("network", {}), "mode": "allowlist", "allow": list(net.allowOut),
                           "deny": list(net.denyOut or [])}
    return Policy.from_dict(data)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def created(e2b: E2BSandbox, domain: str) -> dict[str, Any]:
    return {"templateID": e2b.template, "alias": e2b.template, "sandboxID": e2b.id, "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION, "envdAccessToken": e2b.envd_token,
            "trafficAccessToken": e2b.traffic_token, "domain": domain}


def listed(core: Core, sb: ManagedSandbox) -> dict[str, Any]:
    limits = sb.policy.limits
    template = core.template_of(sb.id)
    return {"templateID": template, "alias": template, "sandboxID": sb.id, "clientID": CLIENT_ID,
            "startedAt": _iso(sb.started_at), "endAt": _iso(core.ends_in(sb)), "envdVersion": ENVD_VERSION,
            "cpuCount": max(1, math.ceil(limits.cpus)), "memoryMB": limits.memory >> 20,
            "diskSizeMB": sb.policy.filesystem.workspace_size >> 20, "state": "running",
            "metadata": dict(sb.metadata)}


@router.post("/v2/sandboxes", status_code=201)
@router.post("/sandboxes", status_code=201)
async def create(body: NewSandbox, request: Request) -> dict[str, Any]:
    core = core_of(request)
    who = await core.authenticate(request)
    policy = policy_for(core, body)
    timeout = body.timeout if body.timeout else DEFAULT_TIMEOUT
    name = body.templateID.split(":")[0]
    # E2B's own template names are stockade's default sandbox; any other names a template of the server's
    # store (`stockade template import`; an unknown one is refused naming `template`)
    e2b = await core.create(request, who, name, policy, timeout, body.envVars, body.metadata,
                            stockade_template=None if name in DEFAULT_TEMPLATES else name)
    # E2B's allowPublicTraffic: the exposed ports (policy network.expose) answer without the traffic token
    e2b.public = body.network is not None and body.network.allowPublicTraffic is True
    return created(e2b, core.domain(request))


@router.post("/v2/sandboxes/{sandbox_id}/connect")
@router.post("/sandboxes/{sandbox_id}/connect")
async def connect(sandbox_id: str, request: Request, response: Response) -> dict[str, Any]:
    """A running sandbox answers with its tokens (the timeout is extended to ``timeout`` if that is
    later than its end). Paused sandboxes do not exist in stockade."""
    core = core_of(request)
    who = await core.authenticate(request)
    raw = await request.body()
    body = ConnectIn.model_validate_json(raw) if raw.strip() else ConnectIn()
    sb = core.live(who, sandbox_id)
    if body.timeout and core.ends_in(sb) < datetime.datetime.now(datetime.UTC).timestamp() + body.timeout:
        core.set_timeout(who, sandbox_id, body.timeout)
    response.status_code = 200
    return created(core.register(request, sb, who), core.domain(request))


def _filters(metadata: str | None) -> dict[str, str]:
    """E2B sends the metadata filter as one query parameter: urlencode({quote(k): quote(v)})."""
    if not metadata:
        return {}
    return {urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(metadata, keep_blank_values=True)}


@router.get("/v2/sandboxes")
async def list_v2(request: Request, response: Response, metadata: str | None = None, state: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                  nextToken: Annotated[str | None, Query(max_length=32)] = None,
                  order: str | None = None, startedAfter: str | None = None,
                  template: str | None = None) -> list[dict[str, Any]]:
    """Running sandboxes only (stockade has no paused ones), oldest first unless ``order=desc``; a page
    ends with ``X-Next-Token`` when more follow."""
    core = core_of(request)
    who = await core.authenticate(request)
    states = {s.strip() for s in state.split(",")} if state else {"running", "paused"}
    if "running" not in states:
        return []
    want = _filters(metadata)
    try:
        after = datetime.datetime.fromisoformat(startedAfter).timestamp() if startedAfter else None
    except ValueError:
        raise PolicyError("startedAfter", "must be an RFC 3339 time") from None
    found = sorted((sb for sb in core.running(who) if all(sb.metadata.get(k) == v for k, v in want.items())
                    and (after is None or sb.started_at >= after)
                    and (template is None or core.template_of(sb.id) == template.split(":")[0])),
                   key=lambda sb: (sb.started_at, sb.id), reverse=order == "desc")
    start = int(nextToken) if nextToken and nextToken.isdigit() else 0
    page = found[start:start + limit]
    if start + limit < len(found):
        response.headers["X-Next-Token"] = str(start + limit)
    return [listed(core, sb) for sb in page]


@router.get("/sandboxes")
async def list_v1(request: Request, metadata: str | None = None) -> list[dict[str, Any]]:
    core = core_of(request)
    who = await core.authenticate(request)
    want = _filters(metadata)
    return [listed(core, sb) for sb in core.running(who) if all(sb.metadata.get(k) == v for k, v in want.items())]


@router.get("/sandboxes/{sandbox_id}")
async def get(sandbox_id: str, request: Request) -> dict[str, Any]:
    core = core_of(request)
    who = await core.authenticate(request)
    sb = core.live(who, sandbox_id)
    e2b = core.register(request, sb, who)
    return {**listed(core, sb), "envdAccessToken": e2b.envd_token, "domain": core.domain(request)}


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, body: Timeout, request: Request) -> Response:
    core = core_of(request)
    who = await core.authenticate(request)
    if body.timeout <= 0:
        raise PolicyError("timeout", "must be a positive number of seconds")
    core.set_timeout(who, sandbox_id, body.timeout)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def create_snapshot(sandbox_id: str, body: SnapshotIn, request: Request) -> dict[str, Any]:
    """``create_snapshot()``: the sandbox's files as a template of the server's store (``Sandbox.create``
    takes its id as the template), its tenant's only. Filesystem only: memory and processes are not kept."""
    core = core_of(request)
    who = await core.authenticate(request)
    if body.memory:
        raise PolicyError("memory", "stockade snapshots keep the filesystem only: use mode='filesystem' "
                                    "(sandboxes from it start fresh, without the running processes)")
    core.live(who, sandbox_id)
    template = await core.srv.m.snapshot(sandbox_id, body.name, owner=who.tenant)
    return {"snapshotID": template.name, "names": [template.name]}


@router.get("/sandboxes/{sandbox_id}/metrics")
async def metrics(sandbox_id: str, request: Request, start: int | None = None,
                  end: int | None = None) -> list[dict[str, Any]]:
    """``get_metrics()``: stockade samples when asked (E2B every 5 s), so the list is the samples earlier
    calls took plus one taken now; ``cpuUsedPct`` averages since the sample before."""
    core = core_of(request)
    who = await core.authenticate(request)
    core.live(who, sandbox_id)
    return [{"timestamp": m.timestamp.isoformat().replace("+00:00", "Z"),
             "timestampUnix": int(m.timestamp.timestamp()), "cpuCount": m.cpu_count, "cpuUsedPct": m.cpu_used_pct,
             "memUsed": m.mem_used, "memTotal": m.mem_total, "memCache": m.mem_cache, "diskUsed": m.disk_used,
             "diskTotal": m.disk_total}
            for m in await core.srv.m.metrics(sandbox_id, start, end)]


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill(sandbox_id: str, request: Request) -> Response:
    core = core_of(request)
    who = await core.authenticate(request)
    await core.kill(who, sandbox_id)
    return Response(status_code=204)


class NetworkUpdate(_In):
    allowOut: list[Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=1000)
    denyOut: list[Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=1000)
    allow_internet_access: bool | None = None
    dnsServers: list[str] | None = None
    egressProxy: Any = None
    rules: Any = None


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
async def update_network(sandbox_id: str, body: NetworkUpdate, request: Request) -> Response:
    """``update_network()``: the broker's allow and deny lists of a sandbox created with ``allowOut``
    (one created without a network cannot gain one, as natively)."""
    core = core_of(request)
    who = await core.authenticate(request)
    for name in ("dnsServers", "egressProxy", "rules"):
        if getattr(body, name):
            raise PolicyError(f"network.{name}", "is not supported by stockade's egress broker")
    changes: dict[str, Any] = {}
    if body.allow_internet_access is False:
        changes.update(mode="none", allow=[])
    elif body.allowOut is not None:
        changes.update(mode="allowlist", allow=list(body.allowOut))
    if body.denyOut is not None:
        changes["deny"] = list(body.denyOut)
    core.update_network(who, sandbox_id, changes)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause")
async def pause(sandbox_id: str, request: Request) -> Response:
    core = core_of(request)
    who = await core.authenticate(request)
    core.live(who, sandbox_id)  # a stranger's or unknown sandbox is "not found", as everywhere
    return not_supported("pausing a sandbox")

