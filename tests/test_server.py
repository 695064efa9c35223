"""The HTTP API as its clients and its attackers see it: keys, tenants, quotas, bad input, the audit log.
(The conformance suite also runs every sandbox behaviour through this server: the remote backend.)"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade import Sandbox
from stockade.errors import AuthenticationError, QuotaError

from .conftest import base_policy
from .server_support import RunningServer
from .waiting import read_until, wait_until

TENANTS = {
    "solo": {"one_sandbox_per_user": "reuse"},
    "strict": {"one_sandbox_per_user": "reject"},
    "tiny": {"max_sandboxes": 1, "max_memory": "600MiB", "max_lifetime": "2h"},
    "slow": {"rate_limit": 1, "rate_burst": 3},
}


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    server = RunningServer(tenants=TENANTS)
    yield server
    manager = server.server.manager
    server.stop()
    assert manager is not None and not manager.sandboxes


class Client:
    """A tenant's HTTP client; kills what it created when the test ends."""

    def __init__(self, srv: RunningServer, tenant: str) -> None:
        self.key = srv.key(tenant)
        self.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)
        self.made: list[str] = []

    def create(self, expect: int = 201, **body: Any) -> dict[str, Any]:
        body.setdefault("policy", base_policy().model_dump(mode="json"))
        r = self.http.post("/sandboxes", json=body)
        assert r.status_code == expect, r.text
        data: dict[str, Any] = r.json()
        if r.status_code == 201:
            self.made.append(data["sandbox_id"])
        return data

    def run(self, sandbox_id: str, cmd: str, **extra: Any) -> httpx.Response:
        return self.http.post(f"/sandboxes/{sandbox_id}/commands", json={"cmd": cmd, **extra})

    def close(self) -> None:
        for sid in self.made:
            self.http.delete(f"/sandboxes/{sid}")
        self.http.close()


@pytest.fixture
def clients(srv: RunningServer) -> Iterator[Any]:
    made: list[Client] = []

    def client(tenant: str) -> Client:
        made.append(Client(srv, tenant))
        return made[-1]

    yield client
    for c in made:
        c.close()


def test_requests_without_a_valid_key_are_401(srv: RunningServer, clients: Any) -> None:
    alice = clients("alice")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": alice.key},
                    {"Authorization": "Bearer " + alice.key[:-1] + ("A" if alice.key[-1] != "A" else "B")},
                    {"X-API-Key": "sk_0000000000000000_" + "a" * 43}):
        r = httpx.get(f"{srv.url}/sandboxes", headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", (headers, r.text)
    assert httpx.get(f"{srv.url}/sandboxes", headers={"X-API-Key": alice.key}).status_code == 200
    key_id = alice.key.split("_")[1]
    assert srv.server.keys.revoke(key_id)
    r = alice.http.get("/sandboxes")
    assert r.status_code == 401 and "revoked" in r.json()["message"]
    with pytest.raises(AuthenticationError):
        Sandbox.list(api_url=srv.url, api_key=alice.key)
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"  # health needs no key


def test_another_tenants_sandbox_is_indistinguishable_from_none(srv: RunningServer, clients: Any) -> None:
    alice, bob = clients("alice"), clients("bob")
    sid = alice.create(metadata={"app": "a"})["sandbox_id"]
    assert alice.run(sid, "echo hi > /tmp/f; echo ok").json()["stdout"] == "ok\n"
    missing = "sbx-00000000deadbeef"
    for method, path, body in (("GET", "", None), ("DELETE", "", None), ("POST", "/commands", {"cmd": "id"}),
                               ("GET", "/files?path=/tmp/f", None), ("POST", "/files/list", {"path": "/"}),
                               ("POST", "/timeout", {"timeout": 10}), ("GET", "/artifacts", None),
                               ("PATCH", "/network", {"mode": "none"}), ("POST", "/code", {"code": "1"})):
        theirs = bob.http.request(method, f"/sandboxes/{sid}{path}", json=body)
        nothing = bob.http.request(method, f"/sandboxes/{missing}{path}", json=body)
        assert theirs.status_code == nothing.status_code == 404, (method, path, theirs.text)
        assert theirs.json() == json.loads(nothing.text.replace(missing, sid)), (method, path)
    assert sid not in [s["sandbox_id"] for s in bob.http.get("/sandboxes").json()]
    # bob sees his own (refused) requests, nothing of alice's sandbox
    seen = bob.http.get("/events", params={"sandbox_id": sid}).json()
    assert seen and {(e["tenant"], e["type"], e["data"]["status"]) for e in seen} == {("bob", "api.request", 404)}
    assert alice.run(sid, "cat /tmp/f").json()["stdout"] == "hi\n"  # and nothing of it was touched
    with pytest.raises(Exception, match="does not exist"):
        Sandbox.connect(sid, api_url=srv.url, api_key=bob.key)


def test_one_sandbox_per_user_reuse_and_reject(clients: Any) -> None:
    solo, strict = clients("solo"), clients("strict")
    first = solo.create(user_id="u1")
    again = solo.create(expect=200, user_id="u1")
    assert again["sandbox_id"] == first["sandbox_id"] and again["user_id"] == "u1"
    assert solo.create(user_id="u2")["sandbox_id"] != first["sandbox_id"]
    strict.create(user_id="u1")
    r = strict.http.post("/sandboxes", json={"policy": base_policy().model_dump(mode="json"), "user_id": "u1"})
    assert r.status_code == 409 and r.json()["code"] == "conflict" and "one sandbox per user" in r.json()["message"]
    # a user of another tenant with the same name is another user
    assert clients("alice").create(user_id="u1")["user_id"] == "u1"


def test_quotas_and_rate_limits_are_429_with_a_reason(srv: RunningServer, clients: Any) -> None:
    tiny = clients("tiny")
    big = base_policy(limits={"memory": "1GiB"}).model_dump(mode="json")
    r = tiny.http.post("/sandboxes", json={"policy": big})
    assert r.status_code == 429 and "max_memory" in r.json()["message"]
    long_lived = base_policy(lifetime={"max_lifetime": "3h"}).model_dump(mode="json")
    r = tiny.http.post("/sandboxes", json={"policy": long_lived})
    assert r.status_code == 400 and r.json()["field"] == "lifetime.max_lifetime" and "cap (2h)" in r.json()["message"]
    first = tiny.create()
    r = tiny.http.post("/sandboxes", json={"policy": base_policy().model_dump(mode="json")})
    assert r.status_code == 429 and "max_sandboxes = 1" in r.json()["message"]
    tiny.http.delete(f"/sandboxes/{first['sandbox_id']}")
    tiny.create()  # the quota is free again once it ended
    with pytest.raises(QuotaError):
        Sandbox.create(base_policy(), api_url=srv.url, api_key=tiny.key)
    slow = clients("slow")
    statuses = [slow.http.get("/sandboxes") for _ in range(6)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and limited[0].json()["code"] == "quota_exceeded" and "Retry-After" in limited[0].headers


def test_a_tenant_cannot_use_the_servers_files_or_secrets(clients: Any, shared_dir: Path) -> None:
    alice = clients("alice")
    cases = [
        ({"filesystem": {"mounts": ["/etc:/mnt/etc"]}}, "filesystem.mounts.0.source"),
        ({"filesystem": {"mounts": [f"{shared_dir}:/mnt/x"]}}, "filesystem.mounts.0.source"),
        ({"network": {"mode": "allowlist", "allow": ["a.example.test"]},
          "secrets": {"K": {"value_from": "env:HOME", "hosts": ["a.example.test"]}}}, "secrets.K.value_from"),
        ({"network": {"mode": "allowlist", "extra_ca_certs": "/etc/shadow"}}, "network.extra_ca_certs"),
        ({"network": {"mode": "allowlist", "allow": ["169.254.169.254"], "allow_private": ["169.254.0.0/16"]}},
         "network.allow_private.0"),
        ({"network": {"mode": "allowlist", "allow_private": ["127.0.0.1"]}}, "network.allow_private.0"),
    ]
    for policy, field in cases:
        r = alice.http.post("/sandboxes", json={"policy": base_policy(**policy).model_dump(mode="json")})
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "invalid_policy" and r.json()["field"] == field, r.text
    # nor later, through a network update of a sandbox it was given without them
    sid = alice.create(policy=base_policy(network={"mode": "allowlist", "allow": ["a.example.test"]})
                       .model_dump(mode="json"))["sandbox_id"]
    for change, field in (({"allow_private": ["10.0.0.0/8"]}, "network.allow_private.0"),
                          ({"extra_ca_certs": "/etc/shadow"}, "network.extra_ca_certs")):
        r = alice.http.patch(f"/sandboxes/{sid}/network", json=change)
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert alice.http.patch(f"/sandboxes/{sid}/network", json={"allow": ["b.example.test"]}).status_code == 200


def test_bad_input_is_a_json_4xx_and_harms_nothing(srv: RunningServer, clients: Any) -> None:
    alice = clients("alice")
    sid = alice.create()["sandbox_id"]
    h = alice.http
    cases = [
        h.post("/sandboxes", content=b"{not json", headers={"content-type": "application/json"}),
        h.post("/sandboxes", json={"policy": "everything"}),
        h.post("/sandboxes", json={"timeout": "soon"}),
        h.post("/sandboxes", json={"policy": {"limits": {"memory": "lots"}}}),
        h.post("/sandboxes", json={"unknown": 1}),
        h.post("/sandboxes", content=b"x" * (2 << 20), headers={"content-type": "application/json"}),
        h.post(f"/sandboxes/{sid}/commands", json={"cmd": "true", "argv": ["true"]}),
        h.post(f"/sandboxes/{sid}/commands", json={"cmd": 5}),
        h.post(f"/sandboxes/{sid}/commands", json={"cmd": "true", "stdin": "!!not base64!!"}),
        h.post(f"/sandboxes/{sid}/commands/0/signal", json={"signal": 9}),
        h.post(f"/sandboxes/{sid}/files/chmod", json={"path": "/tmp"}),
        h.post(f"/sandboxes/{sid}/files/rename", json={"src": "/tmp/a"}),
        h.get(f"/sandboxes/{sid}/files"),
        h.get("/sandboxes/" + "x" * 10000),
        h.get("/no/such/route"),
        h.get("/events", params={"limit": -1}),
        # refused before the cell starts: an error answer, never a stream that fails later
        h.post(f"/sandboxes/{sid}/code", json={"code": "1", "context_id": "ctx-nope"}),
        h.post(f"/sandboxes/{sid}/code", json={"code": "1", "timeout": -1}),
        h.post(f"/sandboxes/{sid}/files/stat", json={"path": "/tmp", "depth": 2}),
        h.post(f"/sandboxes/{sid}/files/stat", json={"path": "/tmp", "src": "/x"}),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
        body = r.json()
        assert set(body) >= {"code", "message"} and body["message"], body
        assert "Traceback" not in r.text
    assert cases[3].json()["field"] == "limits.memory"
    assert cases[5].status_code == 413
    assert cases[16].status_code == 404 and "ctx-nope" in cases[16].json()["message"]
    assert cases[17].json()["field"] == "timeout"
    assert cases[18].json()["field"] == "depth" and cases[19].json()["field"] == "src"
    # paths are the sandbox's own: traversal reaches only the sandbox's files, never the host's
    r = h.get(f"/sandboxes/{sid}/files", params={"path": "../../../../../../etc/shadow"})
    assert r.status_code in (400, 404) and "root:" not in r.text
    r = h.get(f"/sandboxes/{sid}/files", params={"path": "/../../../etc/passwd"})
    assert r.status_code == 200 and Path("/etc/passwd").read_bytes() != r.content
    assert alice.run(sid, "echo still fine").json()["stdout"] == "still fine\n"
    assert httpx.get(f"{srv.url}/health").status_code == 200


@pytest.mark.skipif(os.geteuid() == 0, reason="as root every control is available")
def test_a_policy_the_host_cannot_enforce_is_422_and_the_sdk_raises_the_local_error(srv: RunningServer,
                                                                                  clients: Any) -> None:
    from stockade import UnenforceableError

    alice = clients("alice")
    r = alice.http.post("/sandboxes", json={})
    assert r.status_code == 422 and r.json()["code"] == "unenforceable_policy"
    assert "allow_missing_controls" in r.json()["message"]
    with pytest.raises(UnenforceableError):
        Sandbox.create(api_url=srv.url, api_key=alice.key)


def test_expired_sandboxes_answer_404_with_why(clients: Any) -> None:
    alice = clients("alice")
    sid = alice.create(timeout=1)["sandbox_id"]
    wait_until(lambda: alice.http.get(f"/sandboxes/{sid}").status_code != 200, 30, "the sandbox to expire")
    r = alice.run(sid, "true")
    assert r.status_code == 404 and "timeout expired" in r.json()["message"]
    ended = alice.http.get("/sandboxes", params={"state": "ended"}).json()
    assert [s["end_reason"] for s in ended if s["sandbox_id"] == sid] == ["its timeout expired"]


def test_idle_sandboxes_end_but_busy_ones_do_not(clients: Any) -> None:
    alice = clients("alice")
    policy = base_policy(lifetime={"idle_timeout": "1s"}).model_dump(mode="json")
    busy = alice.create(policy=policy)["sandbox_id"]
    idle = alice.create(policy=policy)["sandbox_id"]
    r = alice.run(busy, "sleep 2.5; echo done")  # a foreground command is activity
    assert r.status_code == 200 and r.json()["stdout"] == "done\n"
    # (by now the idle one is past its idle timeout; its reaper may still be a moment behind on a busy host)
    def ended() -> httpx.Response | None:
        answer = alice.http.get(f"/sandboxes/{idle}")
        return answer if answer.status_code != 200 else None

    r = wait_until(ended, 10, "the idle sandbox to end")
    assert r.status_code == 404 and "idle" in r.json()["message"]


def test_streams_commands_with_stdin_and_signals(clients: Any) -> None:
    alice = clients("alice")
    sid = alice.create()["sandbox_id"]
    events = []
    payload = bytes(range(256)) * 3
    with alice.http.stream("POST", f"/sandboxes/{sid}/commands", headers={"accept": "text/event-stream"},
                           json={"cmd": "cat; echo bye >&2; exit 3",
                                 "stdin": base64.b64encode(payload).decode()}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line[5:])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "exit" and events[-1][1]["exit_code"] == 3
    out = b"".join(base64.b64decode(d["b64"]) for k, d in events if k == "stdout")
    assert out == payload
    # a background process: stdin, then a signal
    sb = Sandbox.connect(sid, api_url=alice.http.base_url.__str__().rstrip("/"), api_key=alice.key)
    handle = sb.commands.run("read line; echo got $line; sleep 60", background=True)
    handle.send_stdin("hello\n")
    read_until(handle, lambda: "got hello" in handle.stdout, 10, "the command to echo its stdin")
    assert handle.pid in [p.pid for p in sb.commands.list()]
    assert handle.kill()
    assert handle.wait().exit_code == -9


def test_every_command_and_transfer_is_in_the_audit_log(srv: RunningServer, clients: Any) -> None:
    alice = clients("alice")
    sid = alice.create(envs={"TOKEN": "env-value-42"}, user_id="u-audit")["sandbox_id"]
    r = alice.run(sid, "echo out-$TOKEN; echo err >&2; exit 4", envs={"EXTRA": "extra-value-7"})
    assert r.json()["exit_code"] == 4
    content = b"file body \x00\xff" * 1000
    assert alice.http.put(f"/sandboxes/{sid}/files", params={"path": "/tmp/up.bin"}, content=content).status_code == 200
    assert alice.http.get(f"/sandboxes/{sid}/files", params={"path": "/tmp/up.bin"}).content == content
    alice.http.delete(f"/sandboxes/{sid}")
    events = alice.http.get("/events", params={"sandbox_id": sid}).json()
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        assert e["tenant"] == "alice" and e["sandbox_id"] == sid
        by_type.setdefault(e["type"], []).append(e)
    create = by_type["sandbox.create"][0]
    assert create["user_id"] == "u-audit" and create["data"]["env_names"] == ["TOKEN"]
    assert create["data"]["policy"]["limits"]["memory"]
    start, end = by_type["command.start"][0]["data"], by_type["command.end"][0]["data"]
    assert start["cmd"].startswith("echo out-") and start["env_names"] == ["EXTRA"] and start["cwd"] is None
    assert end["exit_code"] == 4 and end["stdout"] == "out-env-value-42\n" and end["stderr"] == "err\n"
    assert end["duration"] > 0
    sha = hashlib.sha256(content).hexdigest()
    assert [(f["data"]["path"], f["data"]["size"], f["data"]["sha256"]) for f in by_type["file.write"]] == \
        [("/tmp/up.bin", len(content), sha)]
    assert [(f["data"]["size"], f["data"]["sha256"]) for f in by_type["file.read"]] == [(len(content), sha)]
    assert by_type["sandbox.end"][0]["data"]["reason"] == "killed"
    api = by_type["api.request"]
    assert {(a["data"]["method"], a["data"]["route"], a["data"]["status"]) for a in api} >= {
        ("POST", "/sandboxes/{sandbox_id}/commands", 200), ("DELETE", "/sandboxes/{sandbox_id}", 204)}
    assert all(a["data"]["key_id"] == alice.key.split("_")[1] for a in api)
    text = json.dumps(events)
    assert "extra-value-7" not in text  # env values are never recorded (the command's own output is)
    # a tenant sees only its own events, whatever it filters by
    bob = clients("bob")
    assert bob.http.get("/events", params={"type": "command"}).json() == []
    assert all(e["tenant"] == "bob" for e in bob.http.get("/events").json())


def test_metrics_count_what_happened(srv: RunningServer, clients: Any) -> None:
    alice = clients("alice")
    sid = alice.create()["sandbox_id"]
    alice.run(sid, "true")
    text = httpx.get(f"{srv.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["stockade_sandboxes_alive"] >= 1
    assert values["stockade_sandbox_creates_total"] >= 1
    assert values["stockade_exec_seconds_count"] >= 1


def test_the_committed_openapi_document_is_current() -> None:
    from stockade.server.app import openapi_json

    committed = (Path(__file__).parents[1] / "docs" / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(openapi_json()), "run: stockade openapi > docs/openapi.json"



def test_warm_pool_hands_out_fresh_sandboxes_once(shared_dir: Path) -> None:
    import signal

    from .conftest import sandbox_traces

    policy = base_policy().model_dump(mode="json")
    server = RunningServer(warm_pool=2, warm_pool_policy=policy)
    pool = server.server.manager.pools[None]  # type: ignore[union-attr]
    assert pool is not None
    c = Client(server, "alice")
    try:
        wait_until(lambda: len(pool.ready) == 2, 30, "the warm pool to fill")
        warm_ids = [sb.id for sb, _ in pool.ready]
        a = c.create(envs={"GREETING": "hello-a"})
        b = c.create()
        assert {a["sandbox_id"], b["sandbox_id"]} == set(warm_ids)
        assert c.run(a["sandbox_id"], "echo $GREETING; id -u").json()["stdout"] == "hello-a\n1000\n"
        home = ".local\n" if b["runtime"]["python_venv"] else ""  # only the workspace venv (environment.py)
        assert c.run(b["sandbox_id"], "echo ${GREETING:-unset}; ls -A /tmp /home/user").json()["stdout"] == \
            f"unset\n/home/user:\n{home}\n/tmp:\n"
        if a["runtime"]["uid_isolation"]:
            assert a["runtime"]["host_uid"] != b["runtime"]["host_uid"]
        other = c.create(policy=base_policy(limits={"pids": 100}).model_dump(mode="json"))
        assert other["sandbox_id"] not in warm_ids  # another policy: started for the caller
        events = c.http.get("/events", params={"type": "sandbox.create"}).json()
        creates = {e["sandbox_id"]: e["data"]["warm"] for e in events}
        assert creates == {a["sandbox_id"]: True, b["sandbox_id"]: True, other["sandbox_id"]: False}
        # the pool refills; a warm sandbox that died while waiting is never handed out
        wait_until(lambda: len(pool.ready) == 2, 30, "the warm pool to refill")
        dead, _ = pool.ready[0]
        signal.pidfd_send_signal(dead.agent_pidfd, signal.SIGKILL)  # type: ignore[attr-defined]
        wait_until(lambda: dead.channel.closed, 30, "the killed warm sandbox's channel to close")
        got = c.create()
        assert got["sandbox_id"] != dead.id and c.run(got["sandbox_id"], "echo ok").json()["stdout"] == "ok\n"
        waiting = [(sb.id, sb.describe()) for sb, _ in pool.ready]
    finally:
        c.close()
        server.stop()
    for sid, runtime in waiting:  # warm sandboxes go with the server (their last processes exit just after)
        wait_until(lambda: not sandbox_traces(runtime, sid), 15, f"warm sandbox {sid} to leave no trace",  # noqa: B023
                   show=lambda: sandbox_traces(runtime, sid))  # noqa: B023 - called at once


def test_uploads_and_downloads_over_the_size_cap_are_413_and_leave_nothing() -> None:
    server = RunningServer(max_upload=4096)
    c = Client(server, "alice")
    try:
        sid = c.create()["sandbox_id"]
        r = c.http.put(f"/sandboxes/{sid}/files", params={"path": "/tmp/big"}, content=b"x" * 10000)
        assert r.status_code == 413 and r.json()["code"] == "too_large"
        assert c.run(sid, "ls /tmp").json()["stdout"] == ""  # the partial file is gone
        assert c.http.put(f"/sandboxes/{sid}/files", params={"path": "/tmp/ok"}, content=b"y" * 4096).status_code == 200
        c.run(sid, "head -c 5000 /dev/zero > /tmp/made-inside")
        r = c.http.get(f"/sandboxes/{sid}/files", params={"path": "/tmp/made-inside"})
        assert r.status_code == 413 and "max_upload" in r.json()["message"]
    finally:
        c.close()
        server.stop()
