"""The official, unmodified E2B SDKs (``e2b``, ``e2b-code-interpreter``, pinned in the test extra) against a
live ``stockade serve``, configured only by E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY."""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    TimeoutException,
)
from e2b import Sandbox as E2BSandbox
from e2b.sandbox.sandbox_api import SandboxQuery
from e2b_code_interpreter import Sandbox as CodeSandbox
from wsproto import events as wsevents

from stockade.audit.events import EventFilter

from .conftest import base_policy
from .server_support import RunningServer
from .waiting import wait_until

UNKNOWN = "sbx-0123456789abcdef"
EXPOSED = 8000   # the port the server's e2b_policy exposes (network.expose)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    srv = RunningServer(e2b_policy=base_policy(network={"expose": [EXPOSED]}).model_dump(mode="json"),
                        tenants={"small": {"max_sandboxes": 1}})
    saved = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN")}
    os.environ.update(E2B_API_URL=srv.url + "/e2b", E2B_SANDBOX_URL=srv.url + "/e2b/sandbox",
                      E2B_API_KEY=srv.key("e2b"))
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        manager = srv.server.manager
        srv.stop()
        assert manager is not None and not manager.sandboxes


@pytest.fixture(scope="module")
def sbx(server: RunningServer) -> Iterator[CodeSandbox]:
    sb = CodeSandbox.create()
    yield sb
    sb.kill()


@pytest.fixture
def other_tenant(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", server.key("someone-else"))


def _raw(server: RunningServer, method: str, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


def _envd_headers(sb: E2BSandbox, token: str | None = None) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sb._envd_access_token if token is None else token}


# ---- control plane ----------------------------------------------------------------------------------------
def test_create_info_list_timeout_kill(server: RunningServer) -> None:
    sb = E2BSandbox.create(metadata={"owner": "alice", "run": "t1"}, envs={"GREETING": "hi"}, timeout=120)
    try:
        assert sb.sandbox_id.startswith("sbx-") and sb.is_running()
        info = sb.get_info()
        assert info.metadata == {"owner": "alice", "run": "t1"} and info.template_id == "base"
        assert info.envd_version == "0.5.7" and info.state.value == "running"
        assert 100 < (info.end_at - info.started_at).total_seconds() <= 121
        assert sb.commands.run("echo $GREETING").stdout == "hi\n"
        found = E2BSandbox.list(query=SandboxQuery(metadata={"owner": "alice"})).next_items()
        assert [s.sandbox_id for s in found] == [sb.sandbox_id]
        assert E2BSandbox.list(query=SandboxQuery(metadata={"owner": "bob"})).next_items() == []
        sb.set_timeout(600)
        assert 590 < (sb.get_info().end_at - info.started_at).total_seconds() <= 601
        again = E2BSandbox.connect(sb.sandbox_id)
        assert again.commands.run("echo connected").stdout == "connected\n"
        E2BSandbox.connect(sb.sandbox_id, timeout=60)  # an earlier end: the timeout is not shortened
        assert 590 < (sb.get_info().end_at - info.started_at).total_seconds() <= 601
        E2BSandbox.connect(sb.sandbox_id, timeout=900)
        assert 890 < (sb.get_info().end_at - info.started_at).total_seconds() <= 905
    finally:
        assert sb.kill() is True
    assert not sb.is_running()
    assert E2BSandbox.kill(sb.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        E2BSandbox.get_info(sb.sandbox_id)


def test_a_command_deadline_past_the_sandboxs_end_is_cut_to_it(server: RunningServer) -> None:
    sb = E2BSandbox.create(timeout=20)  # the SDK's commands.run sends its default 60 s deadline
    try:
        assert sb.commands.run("echo fits").stdout == "fits\n"
    finally:
        sb.kill()


def test_a_natively_created_sandbox_can_be_connected(server: RunningServer) -> None:
    from stockade import Sandbox

    native = Sandbox.create(base_policy(), api_url=server.url, api_key=os.environ["E2B_API_KEY"])
    try:
        e2b = CodeSandbox.connect(native.sandbox_id)
        assert e2b.commands.run("echo both").stdout == "both\n"
        assert e2b.run_code("2 ** 10").text == "1024"
        e2b.files.write("/home/user/shared.txt", "written by e2b")
        assert native.files.read("/home/user/shared.txt") == "written by e2b"
    finally:
        native.kill()


def test_default_timeout_is_300_seconds(server: RunningServer) -> None:
    sb = E2BSandbox.create()
    try:
        info = sb.get_info()
        assert 295 < (info.end_at - info.started_at).total_seconds() <= 301
    finally:
        sb.kill()


def test_list_pages_with_next_token(server: RunningServer) -> None:
    made = [E2BSandbox.create(metadata={"batch": "paging"}) for _ in range(3)]
    try:
        pages = E2BSandbox.list(query=SandboxQuery(metadata={"batch": "paging"}), limit=2)
        first = pages.next_items()
        assert len(first) == 2 and pages.has_next
        second = pages.next_items()
        assert len(second) == 1 and not pages.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in made}
        query = {"metadata": {"batch": "paging"}}
        future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        assert E2BSandbox.list(query=SandboxQuery(**query, started_after=future)).next_items() == []
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        assert len(E2BSandbox.list(query=SandboxQuery(**query, started_after=past)).next_items()) == 3
        assert E2BSandbox.list(query=SandboxQuery(**query, template="code-interpreter-v1")).next_items() == []
        assert len(E2BSandbox.list(query=SandboxQuery(**query, template="base")).next_items()) == 3
    finally:
        for sb in made:
            sb.kill()


def test_unknown_sandbox_is_not_found(server: RunningServer) -> None:
    with pytest.raises(SandboxNotFoundException):
        E2BSandbox.connect(UNKNOWN)
    with pytest.raises(SandboxNotFoundException):
        E2BSandbox.get_info(UNKNOWN)
    with pytest.raises(SandboxNotFoundException):
        E2BSandbox.set_timeout(UNKNOWN, 60)
    assert E2BSandbox.kill(UNKNOWN) is False


def test_wrong_key_is_refused(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("sk_nope_nope", "not-even-a-key"):
        monkeypatch.setenv("E2B_API_KEY", key)
        with pytest.raises(AuthenticationException, match="401"):
            E2BSandbox.create()
        with pytest.raises(AuthenticationException):
            E2BSandbox.list().next_items()
    r = _raw(server, "GET", "/e2b/v2/sandboxes", {})
    assert r.status_code == 401 and r.json()["code"] == 401 and "API key" in r.json()["message"]


def test_another_tenants_sandbox_is_answered_like_an_unknown_one(server: RunningServer, sbx: CodeSandbox,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", server.key("someone-else"))
    key = os.environ["E2B_API_KEY"]
    answers = []
    for sid in (sbx.sandbox_id, UNKNOWN):
        got = [_raw(server, m, p.format(sid), {"X-API-KEY": key}, json=body) for m, p, body in (
            ("GET", "/e2b/sandboxes/{}", None), ("DELETE", "/e2b/sandboxes/{}", None),
            ("POST", "/e2b/sandboxes/{}/timeout", {"timeout": 30}), ("POST", "/e2b/v2/sandboxes/{}/connect", {}))]
        answers.append([(r.status_code, r.json()["code"], r.json()["message"].replace(sid, "ID")) for r in got])
        with pytest.raises(SandboxNotFoundException):
            E2BSandbox.connect(sid)
        assert E2BSandbox.kill(sid) is False
    assert answers[0] == answers[1] and all(a[0] == 404 for a in answers[0])
    assert sbx.sandbox_id not in {s.sandbox_id for s in E2BSandbox.list().next_items()}
    monkeypatch.undo()
    assert sbx.is_running()  # the stranger's kill did nothing


def test_wrong_access_token_is_refused_like_an_unknown_sandbox(server: RunningServer, sbx: CodeSandbox) -> None:
    good = _raw(server, "GET", "/e2b/sandbox/health", _envd_headers(sbx))
    assert good.status_code == 204
    wrong = _raw(server, "GET", "/e2b/sandbox/health", _envd_headers(sbx, "guess"))
    missing = _raw(server, "GET", "/e2b/sandbox/health", {k: v for k, v in _envd_headers(sbx).items()
                                                            if k != "X-Access-Token"})
    unknown = _raw(server, "GET", "/e2b/sandbox/health", {**_envd_headers(sbx), "E2b-Sandbox-Id": UNKNOWN})
    for r in (wrong, missing, unknown):
        assert r.status_code == 502 and "was not found" in r.json()["message"]
    assert wrong.json()["message"] == missing.json()["message"]
    # an RPC with the wrong token runs nothing
    stat = _raw(server, "POST", "/e2b/sandbox/filesystem.Filesystem/Stat",
                {**_envd_headers(sbx, "guess"), "Content-Type": "application/json"}, json={"path": "/home/user"})
    assert stat.status_code == 503 and stat.json()["code"] == "unavailable"
    # the envd token does not open the code interpreter, nor the reverse
    interp = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
    r = _raw(server, "POST", "/e2b/sandbox/execute", {**interp, "E2B-Traffic-Access-Token": sbx._envd_access_token},
             json={"code": "1"})
    assert r.status_code == 502
    r = _raw(server, "GET", "/e2b/sandbox/health", {**_envd_headers(sbx, sbx.traffic_access_token or "")})
    assert r.status_code == 502


def test_quota_and_rate_limits_apply(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", server.key("small"))
    first = E2BSandbox.create()
    try:
        with pytest.raises(RateLimitException, match="max_sandboxes"):
            E2BSandbox.create(retries=0)
    finally:
        first.kill()


def test_templates_and_unsupported_features_answer_in_e2b_shape(server: RunningServer, sbx: CodeSandbox) -> None:
    with pytest.raises(SandboxException, match="template: no template named 'my-template'"):
        E2BSandbox.create(template="my-template")
    with pytest.raises(SandboxException, match="501.*not supported"):
        sbx.pause()
    with pytest.raises(InvalidArgumentException, match="one user"):
        sbx.commands.run("id", user="root")
    r = _raw(server, "GET", "/e2b/sandbox/", {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8080",
                                              "E2B-Traffic-Access-Token": sbx.traffic_access_token or ""})
    assert r.status_code == 400 and r.json() == {"code": 400, "message": r.json()["message"]}
    assert "port 8080" in r.json()["message"] and "network.expose" in r.json()["message"]


def test_a_template_of_the_servers_store_is_an_e2b_template(server: RunningServer, tmp_path: Any) -> None:
    from stockade.templates import TemplateStore, import_image

    from . import template_images as ti

    store = TemplateStore(server.data_dir / "templates")
    ti.oci_layout(tmp_path / "img", [ti.layer(ti.entry("dir", "etc"), ti.entry("file", "etc/hello", b"from tpl\n"))],
                  Env=["GREETING=from the image"])
    import_image(store, "e2b-tpl", f"oci:{tmp_path}/img")
    try:
        sb = E2BSandbox.create(template="e2b-tpl")
        try:
            assert sb.files.read("/etc/hello") == "from tpl\n"  # the template's root, not the host's
            assert not sb.files.exists("/usr/bin/python3")
            assert sb.get_info().template_id == "e2b-tpl"
            assert [s.sandbox_id for s in E2BSandbox.list(query=SandboxQuery()).next_items()
                    if s.template_id == "e2b-tpl"] == [sb.sandbox_id]
        finally:
            sb.kill()
    finally:
        store.remove("e2b-tpl")


def test_create_snapshot_makes_a_template_of_the_sandbox_files_for_its_tenant(server: RunningServer,
                                                                            tmp_path: Any) -> None:
    from stockade.templates import TemplateStore, import_image

    from . import template_images as ti

    store = TemplateStore(server.data_dir / "templates")
    ti.oci_layout(tmp_path / "img", ti.user_image_layers(), Env=["PATH=/usr/bin:/bin"], User="node")
    import_image(store, "e2b-snapbase", f"oci:{tmp_path}/img")
    made: list[str] = []
    try:
        sb = E2BSandbox.create(template="e2b-snapbase")
        try:
            sb.files.write("/home/node/notes.txt", "kept\n")
            if os.geteuid() != 0:
                with pytest.raises(SandboxException, match="run stockade as root"):
                    sb.create_snapshot()
                return
            with pytest.raises(SandboxException, match="filesystem only"):
                sb.create_snapshot(mode="full")
            info = sb.create_snapshot(name="e2b-snap", mode="filesystem")
            made.append(info.snapshot_id)
            assert info.snapshot_id == "e2b-snap" and info.names == ["e2b-snap"]
            default = sb.create_snapshot()          # the SDK's default asks for no mode: filesystem here
            made.append(default.snapshot_id)
            assert default.snapshot_id.startswith("e2b-snapbase-snap-")
        finally:
            sb.kill()
        restored = E2BSandbox.create(template=info.snapshot_id)
        try:
            assert restored.files.read("/home/node/notes.txt") == "kept\n"
            restored.files.write("/home/node/notes.txt", "still the image user's\n")   # node's to write
        finally:
            restored.kill()
        assert store.get("e2b-snap").owner == "e2b"
    finally:
        for name in [*made, "e2b-snapbase"]:
            if store.exists(name):
                store.remove(name)


def test_get_metrics_reports_the_sandbox_use(server: RunningServer) -> None:
    sbx = E2BSandbox.create()
    try:
        before = time.time()
        sbx.commands.run("python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass'"
                         " && head -c 20000000 /dev/zero > /home/user/blob")
        first = sbx.get_metrics()
        assert len(first) == 1
        m = first[0]
        assert m.cpu_count == 1 and m.mem_total == 512 << 20 and 0 < m.cpu_used_pct <= 100
        assert 0 < m.mem_used <= m.mem_total and 0 <= m.mem_cache <= m.mem_used
        assert m.disk_used >= 20_000_000 and m.disk_total >= m.disk_used
        assert before - 1 <= m.timestamp.timestamp() <= time.time() + 1
        # the next call adds a sample: idle for a second since the first, its CPU average is low
        time.sleep(1.0)
        series = E2BSandbox.get_metrics(sbx.sandbox_id)
        assert [s.timestamp for s in series[:1]] == [m.timestamp] and len(series) == 2
        assert series[1].cpu_used_pct < 50, series
        # start and end select: a window before the sandbox holds nothing; from the first sample, all four
        assert E2BSandbox.get_metrics(sbx.sandbox_id, end=datetime.datetime.fromtimestamp(before - 60)) == []
        everything = E2BSandbox.get_metrics(sbx.sandbox_id, start=m.timestamp - datetime.timedelta(seconds=1))
        assert len(everything) == 4 and everything[:2] == series
    finally:
        sbx.kill()
    with pytest.raises(SandboxNotFoundException):
        E2BSandbox.get_metrics(sbx.sandbox_id)


def test_network_options_map_onto_the_policy(server: RunningServer) -> None:
    manager = server.server.m
    opened = E2BSandbox.create(network={"allow_out": ["example.com", "*.example.org"], "deny_out": ["10.0.0.0/8"]})
    closed = E2BSandbox.create(allow_internet_access=False)
    default = E2BSandbox.create()
    try:
        net = manager.get(opened.sandbox_id).policy.network
        assert net.mode == "allowlist" and net.allow == ["example.com", "*.example.org"] and net.deny == ["10.0.0.0/8"]
        assert manager.get(closed.sandbox_id).policy.network.mode == "none"
        assert manager.get(default.sandbox_id).policy.network.mode == "none"
        with pytest.raises(CommandExitException) as refused:
            closed.commands.run("python3 -c \"import urllib.request; urllib.request.urlopen('http://example.com')\"")
        assert "network is off" in refused.value.stderr
    finally:
        for sb in (opened, closed, default):
            sb.kill()


def test_calls_are_audited_under_the_tenant(server: RunningServer, sbx: CodeSandbox) -> None:
    sbx.commands.run("echo audited-e2b")
    srv = server.server
    srv.audit.flush()
    events = srv.audit.query(EventFilter(tenant="e2b", sandbox_id=sbx.sandbox_id, limit=10000))
    routes = {e.data.get("route") for e in events if e.type == "api.request"}
    assert "/e2b/sandbox/process.Process/{method}" in routes and "/e2b/v2/sandboxes" not in routes
    assert any(e.type == "command.end" and "audited-e2b" in e.data.get("stdout", "") for e in events)
    keyed = [e for e in events if e.type == "api.request" and e.data.get("route", "").startswith("/e2b/sandbox")]
    assert keyed and all(e.data.get("key_id") for e in keyed)


# ---- commands ---------------------------------------------------------------------------------------------
def test_foreground_command_streams_and_fails_with_command_exit_exception(sbx: CodeSandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sbx.commands.run("for i in 1 2 3; do echo line$i; done; echo oops >&2",
                              on_stdout=out.append, on_stderr=err.append)
    assert result.exit_code == 0 and result.stdout == "line1\nline2\nline3\n" and result.stderr == "oops\n"
    assert "".join(out) == result.stdout and "".join(err) == "oops\n"
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo partial; echo bad >&2; exit 7")
    assert failed.value.exit_code == 7 and failed.value.stdout == "partial\n" and failed.value.stderr == "bad\n"


def test_cwd_envs_and_bytes_output(sbx: CodeSandbox) -> None:
    r = sbx.commands.run('pwd; echo "$A-$B"', cwd="/tmp", envs={"A": "x", "B": "y z"})
    assert r.stdout == "/tmp\nx-y z\n"
    assert sbx.commands.run("pwd").stdout == "/home/user\n"
    with pytest.raises(CommandExitException):
        sbx.commands.run("true", cwd="/does/not/exist")


def test_background_command_list_connect_and_kill(sbx: CodeSandbox) -> None:
    handle = sbx.commands.run("echo started; sleep 60", background=True)
    wait_until(lambda: handle.pid in {p.pid for p in sbx.commands.list()}, 10, "the command in the process list")
    listed = next(p for p in sbx.commands.list() if p.pid == handle.pid)
    assert listed.cmd == "/bin/bash" and listed.args == ["-l", "-c", "echo started; sleep 60"]
    attached = sbx.commands.connect(handle.pid)
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as killed:
        attached.wait()
    assert killed.value.exit_code == -1
    wait_until(lambda: handle.pid not in {p.pid for p in sbx.commands.list()}, 10, "the killed command to go")
    assert sbx.commands.kill(handle.pid) is False
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999)


def test_stdin_send_and_close(sbx: CodeSandbox) -> None:
    handle = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "first\n")
    sbx.commands.send_stdin(handle.pid, b"second\n")
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "first\nsecond\ndone\n"
    with pytest.raises(NotFoundException):
        sbx.commands.send_stdin(999999, "x")


def test_command_timeout_raises_and_ends_the_process(sbx: CodeSandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; echo never", timeout=1)
    wait_until(lambda: not any("sleep 30; echo never" in " ".join(p.args) for p in sbx.commands.list()), 10,
               "the timed-out command to go")


def test_is_running_follows_the_sandbox(server: RunningServer) -> None:
    sb = E2BSandbox.create()
    assert sb.is_running()
    sb.kill()
    assert not sb.is_running()
    with pytest.raises(TimeoutException):  # SandboxNotRunningException, a TimeoutException
        sb.commands.run("true")


# ---- files ------------------------------------------------------------------------------------------------
def test_files_text_bytes_stream_and_errors(sbx: CodeSandbox) -> None:
    info = sbx.files.write("/home/user/notes/a.txt", "héllo")
    assert info.path == "/home/user/notes/a.txt" and info.name == "a.txt"
    assert sbx.files.read("/home/user/notes/a.txt") == "héllo"
    sbx.files.write("rel.bin", b"\x00\xff" * 10)
    assert bytes(sbx.files.read("/home/user/rel.bin", format="bytes")) == b"\x00\xff" * 10
    payload = os.urandom(3 << 20)
    sbx.files.write("/home/user/big.bin", io.BytesIO(payload))  # streamed: octet-stream
    assert b"".join(sbx.files.read("/home/user/big.bin", format="stream")) == payload
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/home/user/missing.txt")
    with pytest.raises(InvalidArgumentException):
        sbx.files.read("/home/user/notes")
    with pytest.raises(InvalidArgumentException, match="one user"):
        sbx.files.read("/home/user/notes/a.txt", user="root")


def test_files_list_exists_remove_rename_make_dir(sbx: CodeSandbox) -> None:
    assert sbx.files.make_dir("/home/user/tree/sub") is True
    assert sbx.files.make_dir("/home/user/tree/sub") is False
    sbx.files.write("/home/user/tree/sub/deep.txt", "d")
    sbx.files.write("/home/user/tree/top.txt", "t")
    one = {e.path for e in sbx.files.list("/home/user/tree")}
    assert one == {"/home/user/tree/sub", "/home/user/tree/top.txt"}
    two = {e.path: e for e in sbx.files.list("/home/user/tree", depth=2)}
    assert "/home/user/tree/sub/deep.txt" in two and two["/home/user/tree/sub"].type.value == "dir"
    assert two["/home/user/tree/top.txt"].size == 1
    assert sbx.files.exists("/home/user/tree/top.txt") and not sbx.files.exists("/home/user/tree/nope")
    moved = sbx.files.rename("/home/user/tree/top.txt", "/home/user/tree/moved.txt")
    assert moved.path == "/home/user/tree/moved.txt"
    assert sbx.files.get_info("/home/user/tree/moved.txt").size == 1
    sbx.files.remove("/home/user/tree")
    assert not sbx.files.exists("/home/user/tree")
    with pytest.raises(FileNotFoundException):
        sbx.files.list("/home/user/tree")
    with pytest.raises(FileNotFoundException):
        sbx.files.rename("/home/user/none", "/home/user/other")


def test_write_files_multipart(sbx: CodeSandbox) -> None:
    infos = sbx.files.write_files([{"path": "/home/user/multi/1.txt", "data": "one"},
                                   {"path": "/home/user/multi/2.bin", "data": b"\x01\x02"}])
    assert [i.path for i in infos] == ["/home/user/multi/1.txt", "/home/user/multi/2.bin"]
    assert sbx.files.read("/home/user/multi/1.txt") == "one"
    assert bytes(sbx.files.read("/home/user/multi/2.bin", format="bytes")) == b"\x01\x02"


def test_upload_over_max_upload_is_refused_and_not_kept(server: RunningServer, sbx: CodeSandbox,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.server, "settings", server.server.settings.model_copy(update={"max_upload": 1 << 20}))
    r = _raw(server, "POST", "/e2b/sandbox/files?path=/home/user/huge.bin",
             {**_envd_headers(sbx), "Content-Type": "application/octet-stream"}, content=b"x" * (2 << 20))
    assert r.status_code == 413
    r = _raw(server, "POST", "/e2b/sandbox/files", _envd_headers(sbx),
             files=[("file", ("/home/user/huge2.bin", b"x" * (2 << 20)))])
    assert r.status_code == 413
    monkeypatch.undo()
    assert not sbx.files.exists("/home/user/huge.bin") and not sbx.files.exists("/home/user/huge2.bin")


def test_gzip_uploads_are_decoded_and_bounded(server: RunningServer, sbx: CodeSandbox,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip
    import random

    data = random.Random(7).randbytes(300_000) + b"tail" * 50_000
    info = sbx.files.write("/home/user/gz.bin", data, gzip=True)
    assert info.path == "/home/user/gz.bin"
    assert bytes(sbx.files.read("/home/user/gz.bin", format="bytes")) == data
    sbx.files.write("/home/user/gz-stream.txt", io.BytesIO(b"streamed " * 1000), gzip=True)  # file-like, chunked
    assert sbx.files.read("/home/user/gz-stream.txt") == "streamed " * 1000
    headers = {**_envd_headers(sbx), "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}

    def post(name: str, body: bytes, extra: dict[str, str] | None = None) -> httpx.Response:
        return _raw(server, "POST", f"/e2b/sandbox/files?path=/home/user/{name}", {**headers, **(extra or {})},
                    content=body)

    monkeypatch.setattr(server.server, "settings", server.server.settings.model_copy(update={"max_upload": 1 << 20}))
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 KiB on the wire, 64 MiB inflated
    assert len(bomb) < 100_000
    assert post("bomb", bomb).status_code == 413
    whole = gzip.compress(b"fine\n" * 1000)
    for name, body in [("truncated", whole[:-10]), ("trailing", whole + b"garbage"), ("not-gzip", b"plain text"),
                       ("two-members", whole + whole)]:
        r = post(name, body)
        assert r.status_code == 400 and "gzip" in r.json()["message"], (name, r.text)
    r = post("br", whole, {"Content-Encoding": "br"})
    assert r.status_code == 400 and "'br' is not supported" in r.json()["message"]
    r = _raw(server, "POST", "/e2b/sandbox/files", {**_envd_headers(sbx), "Content-Encoding": "gzip"},
             files=[("file", ("/home/user/multi.gz", whole))])
    assert r.status_code == 400 and "octet-stream" in r.json()["message"]
    monkeypatch.undo()
    left = sbx.files.list("/home/user")
    assert not {e.name for e in left} & {"bomb", "truncated", "trailing", "not-gzip", "two-members", "br", "multi.gz"}


# ---- code interpreter -------------------------------------------------------------------------------------
def test_run_code_state_streaming_and_results(sbx: CodeSandbox) -> None:
    chunks: list[str] = []
    first = sbx.run_code("x = 40\nprint('thinking')\nx + 2", on_stdout=lambda m: chunks.append(m.line))
    assert first.text == "42" and first.logs.stdout == ["thinking\n"] and "".join(chunks) == "thinking\n"
    assert first.error is None and first.execution_count is not None
    assert sbx.run_code("x * 2").text == "80"  # state across calls
    assert sbx.run_code("import os; os.environ['ONLY_HERE']", envs={"ONLY_HERE": "yes"}).text == "'yes'"
    assert sbx.run_code("[1, 2].length", language="js").text == "2"


def test_run_code_chart_png_and_dataframe_html(sbx: CodeSandbox) -> None:
    chart = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    png = [r.png for r in chart.results if r.png]
    assert png and base64.b64decode(png[0]).startswith(b"\x89PNG")
    frame = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert frame.results[0].is_main_result and "<table" in (frame.results[0].html or "")
    assert "html" in frame.results[0].formats() and "text" in frame.results[0].formats()


def test_run_code_error_has_a_traceback(sbx: CodeSandbox) -> None:
    errors = []
    ex = sbx.run_code("def f():\n    raise ValueError('bad value')\nf()", on_error=errors.append)
    assert ex.error is not None and ex.error.name == "ValueError" and ex.error.value == "bad value"
    assert "f()" in ex.error.traceback and errors and errors[0].name == "ValueError"


def test_contexts_bash_and_javascript(sbx: CodeSandbox) -> None:
    bash = sbx.create_code_context(language="bash", cwd="/tmp")
    assert bash.language == "bash" and bash.cwd == "/tmp"
    assert sbx.run_code("V=7; pwd", context=bash).logs.stdout == ["/tmp\n"]
    assert "".join(sbx.run_code("echo $V", context=bash).logs.stdout) == "7\n"
    js = sbx.run_code("const n = 20; n + 1", language="javascript")
    assert js.text == "21"
    py = sbx.create_code_context()
    sbx.run_code("y = 5", context=py)
    assert sbx.run_code("y", context=py).text == "5"
    ids = {c.id for c in sbx.list_code_contexts()}
    assert {bash.id, py.id} <= ids
    sbx.restart_code_context(py)
    assert sbx.run_code("y", context=py).error.name == "NameError"
    sbx.remove_code_context(py)
    assert py.id not in {c.id for c in sbx.list_code_contexts()}
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=py)
    with pytest.raises(SandboxException, match="not supported"):
        sbx.run_code("1", language="r")


# ---- Host-header routing ----------------------------------------------------------------------------------
def _envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def _frames(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    out = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        out.append((flags, json.loads(body[5:5 + length])))
        body = body[5 + length:]
    return out


def test_host_form_routes_to_the_sandbox(server: RunningServer, sbx: CodeSandbox) -> None:
    host = {"Host": f"49983-{sbx.sandbox_id}.sandbox.example.test", "X-Access-Token": sbx._envd_access_token}
    assert _raw(server, "GET", "/health", host).status_code == 204
    stat = _raw(server, "POST", "/filesystem.Filesystem/Stat", {**host, "Content-Type": "application/json"},
                json={"path": "/home/user"})
    assert stat.status_code == 200 and stat.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    start = _raw(server, "POST", "/process.Process/Start", {**host, "Content-Type": "application/connect+json"},
                 content=_envelope({"process": {"cmd": "/bin/echo", "args": ["via-host"]}}))
    frames = _frames(start.content)
    assert "start" in frames[0][1]["event"] and frames[-1] == (2, {})
    assert base64.b64decode(frames[1][1]["event"]["data"]["stdout"]) == b"via-host\n"
    assert frames[-2][1]["event"]["end"]["exitCode"] == 0
    interp = {"Host": f"49999-{sbx.sandbox_id}.sandbox.example.test",
              "E2B-Traffic-Access-Token": sbx.traffic_access_token or ""}
    text = _raw(server, "POST", "/execute", interp, json={"code": "6*7"}).text
    assert "\n\n" not in text and text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(x.get("type") == "result" and x.get("text") == "42" for x in lines)
    assert lines[-1] == {"type": "end_of_execution"} and all(lines)
    wrong = {**host, "X-Access-Token": "guess"}
    assert _raw(server, "GET", "/health", wrong).status_code == 502
    assert _raw(server, "GET", "/health", {"Host": f"49983-{UNKNOWN}.sandbox.example.test"}).status_code == 502


ECHO_HEADERS = r'''
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        out = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_POST = do_GET
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), H).serve_forever()
'''


def _serve_echo(sb: E2BSandbox) -> Any:
    sb.files.write("/tmp/echo.py", ECHO_HEADERS)
    handle = sb.commands.run("python3 /tmp/echo.py", background=True)
    wait_until(lambda: sb.commands.run("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", "
                                       "8000)).close()' 2>/dev/null && echo up || true").stdout == "up\n",
               20, "the server inside to listen")
    return handle


def test_get_host_reaches_an_exposed_port_with_the_traffic_token(server: RunningServer) -> None:
    sb = E2BSandbox.create()
    try:
        echo = _serve_echo(sb)
        host = sb.get_host(EXPOSED)
        # the domain is the name the create reached the server by, never E2B's own
        assert host == f"{EXPOSED}-{sb.sandbox_id}.{server.url.removeprefix('http://')}"
        token = {"E2B-Traffic-Access-Token": sb.traffic_access_token or ""}
        assert sb.traffic_access_token
        # the host form, as a browser behind a wildcard name sends it; paths envd serves (/health, /files)
        # are the server inside's here
        for path in ("/health", "/files?path=x", "/a%2Fb?q=%20"):
            r = _raw(server, "GET", path, {"Host": host, **token, "X-Access-Token": sb._envd_access_token})
            assert r.status_code == 200, (path, r.text)
            seen = r.json()
            assert seen["path"] == path
            text = json.dumps(seen)  # no credential reaches the sandbox
            assert sb.traffic_access_token not in text and sb._envd_access_token not in text
            assert os.environ["E2B_API_KEY"] not in text
        # the header form (E2B_SANDBOX_URL), as SDK-built clients send it
        r = _raw(server, "POST", "/e2b/sandbox/echo", {"E2b-Sandbox-Id": sb.sandbox_id,
                                                        "E2b-Sandbox-Port": str(EXPOSED), **token}, content=b"hi")
        assert r.status_code == 200 and r.json()["path"] == "/echo"
        # without the token, or with another sandbox's, it is not found, as E2B answers
        assert _raw(server, "GET", "/", {"Host": host}).status_code == 502
        assert _raw(server, "GET", "/", {"Host": host, "E2B-Traffic-Access-Token": "guess"}).status_code == 502
        # a port the policy does not expose is refused by name; one that nothing listens on is a 502
        closed = _raw(server, "GET", "/", {"Host": f"9000-{sb.sandbox_id}.x.test", **token})
        assert closed.status_code == 400 and "network.expose" in closed.json()["message"]
        echo.kill()
        wait_until(lambda: _raw(server, "GET", "/", {"Host": host, **token}).status_code == 502, 10,
                   "the stopped server's 502")
        assert "nothing inside the sandbox listens" in _raw(server, "GET", "/", {"Host": host, **token}).text
        server.server.audit.flush()
        audit = server.server.audit.query(EventFilter(tenant="e2b", sandbox_id=sb.sandbox_id, type="port"))
        assert {e.type for e in audit} == {"port.open", "port.close"}
        assert all(e.data["via"] == "e2b" and e.data["port"] == EXPOSED for e in audit)
    finally:
        sb.kill()
    assert _raw(server, "GET", "/", {"Host": host, **token}).status_code == 502


def test_get_host_carries_websockets(server: RunningServer) -> None:
    from stockade.server.protocol import GuardedH11Protocol

    from .conformance.test_ports import WS_SERVER, WsClient

    sb = E2BSandbox.create()
    try:
        sb.files.write("/tmp/ws.py", WS_SERVER.replace("8003", str(EXPOSED)))
        sb.commands.run("python3 /tmp/ws.py > /tmp/ws.log 2>&1", background=True)
        # (the background command makes the log: it may not exist yet at the first look)
        wait_until(lambda: sb.files.exists("/tmp/ws.log") and "ready" in sb.files.read("/tmp/ws.log"), 20,
                   "the WebSocket server inside")
        addr, port = server.url.removeprefix("http://").rsplit(":", 1)
        token = [("E2B-Traffic-Access-Token", sb.traffic_access_token or "")]
        slots = GuardedH11Protocol._open.get("127.0.0.1", 0)
        for _ in range(3):  # the host form, as a browser's hot-reload client behind a wildcard name
            client = WsClient(addr, int(port), "/ws?x=1", token, host_header=sb.get_host(EXPOSED))
            assert isinstance(client.accepted, wsevents.AcceptConnection), client.accepted
            client.send("over e2b")
            assert client.receive().data == "over e2b"
            client.send("seen")
            seen = json.loads(client.receive().data)
            assert seen["path"] == "/ws?x=1" and "e2b-traffic-access-token" not in seen["headers"]
            assert client.close().code == 1000
        # an upgraded connection gives its per-client slot back (it would leak one per WebSocket)
        wait_until(lambda: GuardedH11Protocol._open.get("127.0.0.1", 0) <= slots, 5, "the slots to be released")
        # the header form, and refusals: no token, a port not exposed
        client = WsClient(addr, int(port), "/e2b/sandbox/ws", [*token, ("E2b-Sandbox-Id", sb.sandbox_id),
                                                                  ("E2b-Sandbox-Port", str(EXPOSED))])
        assert isinstance(client.accepted, wsevents.AcceptConnection)
        client.close()
        for host, headers in ((sb.get_host(EXPOSED), []), (sb.get_host(9000), token)):
            refused = WsClient(addr, int(port), "/ws", headers, host_header=host)
            assert not isinstance(refused.accepted, wsevents.AcceptConnection)
            refused.sock.close()
    finally:
        sb.kill()


def test_allow_public_traffic_opens_exposed_ports_without_the_token(server: RunningServer) -> None:
    sb = E2BSandbox.create(network={"allow_public_traffic": True})
    private = E2BSandbox.create(network={"allow_public_traffic": False})
    try:
        _serve_echo(sb)
        _serve_echo(private)
        assert _raw(server, "GET", "/open", {"Host": sb.get_host(EXPOSED)}).json()["path"] == "/open"
        assert _raw(server, "GET", "/", {"Host": private.get_host(EXPOSED)}).status_code == 502
        # envd and the code interpreter still need their tokens
        assert _raw(server, "GET", "/health", {"Host": sb.get_host(49983)}).status_code == 502
        assert _raw(server, "POST", "/execute", {"Host": sb.get_host(49999)}, json={"code": "1"}).status_code == 502
    finally:
        sb.kill()
        private.kill()


def test_connect_stream_errors_end_with_an_end_stream_frame(server: RunningServer, sbx: CodeSandbox) -> None:
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/Start",
             {**_envd_headers(sbx, "guess"), "Content-Type": "application/connect+json"},
             content=_envelope({"process": {"cmd": "/bin/true"}}))
    assert r.status_code == 200 and _frames(r.content) == [(2, {"error": {
        "code": "unavailable", "message": _frames(r.content)[0][1]["error"]["message"]}})]
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/Start",
             {**_envd_headers(sbx), "Content-Type": "application/connect+json"}, content=b"\x00\x00\x00")
    assert _frames(r.content)[0][1]["error"]["code"] == "invalid_argument"
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/List", {**_envd_headers(sbx), "Content-Type": "text/x"},
             content=b"{}")
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"


def test_run_code_timeout_raises(sbx: CodeSandbox) -> None:
    own = sbx.create_code_context()  # the abandoned cell keeps this context busy, not the default one
    with pytest.raises(TimeoutException):
        sbx.run_code("import time; time.sleep(30)", context=own, timeout=2)
    sbx.remove_code_context(own)


def test_signed_urls_name_one_path_and_operation(sbx: CodeSandbox) -> None:
    sbx.files.write("/home/user/signed.txt", "signed content")
    url = sbx.download_url("/home/user/signed.txt")
    assert "signature=v1_" in url
    assert httpx.get(url).text == "signed content"  # no headers: the URL alone
    expiring = sbx.download_url("/home/user/signed.txt", use_signature_expiration=60)
    assert httpx.get(expiring).text == "signed content"
    up = sbx.upload_url("/home/user/uploaded.txt")
    assert httpx.post(up, files=[("file", ("uploaded.txt", b"via url"))]).status_code == 200
    assert sbx.files.read("/home/user/uploaded.txt") == "via url"
    refused = [
        url.replace("signed.txt", "other.txt"),                   # another path
        url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB"),  # a forged signature
        up,                                                        # a write signature used to read
        sbx.download_url("/home/user/signed.txt", use_signature_expiration=-10),  # expired
    ]
    for bad in refused:
        r = httpx.get(bad)
        assert r.status_code == 502 and "was not found" in r.json()["message"], bad
    assert httpx.post(url, files=[("file", ("x", b"overwrite"))]).status_code == 502  # read signature, write
    assert sbx.files.read("/home/user/signed.txt") == "signed content"


def test_one_sandbox_per_user_by_the_user_id_metadata_key(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = RunningServer(e2b_policy=base_policy().model_dump(mode="json"),
                        tenants={"reuse": {"one_sandbox_per_user": "reuse"},
                                 "reject": {"one_sandbox_per_user": "reject"}})
    try:
        monkeypatch.setenv("E2B_API_URL", srv.url + "/e2b")
        monkeypatch.setenv("E2B_SANDBOX_URL", srv.url + "/e2b/sandbox")
        monkeypatch.setenv("E2B_API_KEY", srv.key("reuse"))
        first = E2BSandbox.create(metadata={"user_id": "u-42"})
        again = E2BSandbox.create(metadata={"user_id": "u-42"})
        other = E2BSandbox.create(metadata={"user_id": "u-43"})
        assert again.sandbox_id == first.sandbox_id != other.sandbox_id
        assert again.commands.run("echo same").stdout == "same\n"
        monkeypatch.setenv("E2B_API_KEY", srv.key("reject"))
        E2BSandbox.create(metadata={"user_id": "u-42"})
        with pytest.raises(SandboxException, match="409.*one sandbox per user"):
            E2BSandbox.create(metadata={"user_id": "u-42"})
    finally:
        srv.stop()


class _Terminal:
    """A pty handle's output, read by a thread of its own (the SDK's wait() blocks until the end)."""

    def __init__(self, handle: Any) -> None:
        import threading

        self.handle, self.data, self.error = handle, bytearray(), None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.handle.wait(on_pty=self.data.extend)
        except Exception as exc:  # noqa: BLE001 - kept for the test to look at
            self.error = exc

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")

    def wait_for(self, text: str) -> None:
        wait_until(lambda: text in self.text(), 15, f"{text!r} on the terminal", show=self.text)


def test_pty_create_input_resize_stream_input_connect_and_kill(sbx: CodeSandbox) -> None:
    from e2b import PtySize

    handle = sbx.pty.create(size=PtySize(rows=24, cols=80), timeout=0)  # E2B's /bin/bash -i -l, no limit
    term = _Terminal(handle)
    assert handle.pid in {p.pid for p in sbx.commands.list()}
    sbx.pty.send_stdin(handle.pid, b"stty size; echo TERM=$TERM; python3 -c 'import os; print(os.isatty(0))'\r")
    term.wait_for("24 80\r\n")
    term.wait_for("TERM=xterm-256color")
    term.wait_for("True\r\n")
    sbx.pty.resize(handle.pid, PtySize(rows=50, cols=132))
    sbx.pty.send_stdin(handle.pid, b"stty size\r")
    term.wait_for("50 132\r\n")
    sbx.pty.send_stdin(handle.pid, b"sleep 100\r")
    wait_until(lambda: "\nsleep 100\n" in sbx.commands.run("ps -eo args").stdout, 10, "the shell's sleep to start")
    sbx.pty.send_stdin(handle.pid, b"\x03")  # Ctrl-C ends the foreground sleep, not the shell
    sbx.pty.send_stdin(handle.pid, b"echo status-$?\r")
    term.wait_for("status-130")
    sbx.pty.stream_input(handle.pid, iter([b"echo stre", "amed-", b"in\r"]))
    term.wait_for("streamed-in\r\n")
    attached = _Terminal(sbx.pty.connect(handle.pid))  # a second stream sees what comes next
    sbx.pty.send_stdin(handle.pid, b"echo again''-attached\r")
    attached.wait_for("again-attached")
    with pytest.raises(SandboxException):  # a terminal takes input.pty, not input.stdin
        sbx.commands.send_stdin(handle.pid, "x")
    assert sbx.pty.kill(handle.pid) is True
    for t in (term, attached):
        t.thread.join(15)
        assert not t.thread.is_alive()
        assert isinstance(t.error, CommandExitException) and t.error.exit_code == -1
    wait_until(lambda: handle.pid not in {p.pid for p in sbx.commands.list()}, 10, "the killed pty to go")
    assert sbx.pty.kill(handle.pid) is False
    with pytest.raises(NotFoundException):
        sbx.pty.send_stdin(handle.pid, b"x")
    with pytest.raises(NotFoundException):
        sbx.pty.resize(handle.pid, PtySize(rows=10, cols=10))
    plain = sbx.commands.run("sleep 60", background=True)
    try:
        with pytest.raises(SandboxException):  # a pipe is no terminal: no pty input, no resize
            sbx.pty.send_stdin(plain.pid, b"x")
        with pytest.raises(InvalidArgumentException):
            sbx.pty.resize(plain.pid, PtySize(rows=10, cols=10))
    finally:
        plain.kill()
    with pytest.raises(InvalidArgumentException):
        sbx.pty.create(size=PtySize(rows=0, cols=80))


def test_pty_output_arrives_whole_and_a_timeout_ends_it(sbx: CodeSandbox) -> None:
    from e2b import PtySize

    timed = _Terminal(sbx.pty.create(size=PtySize(rows=24, cols=80), timeout=1))
    timed.thread.join(20)
    assert not timed.thread.is_alive() and isinstance(timed.error, TimeoutException), timed.error

    handle = sbx.pty.create(size=PtySize(rows=24, cols=80), timeout=30)
    term = _Terminal(handle)
    sbx.pty.send_stdin(handle.pid, b"stty -echo; python3 -c \"import sys\nfor i in range(40000): "
                                   b"sys.stdout.write('%06d\\n' % i)\"; exit 4\r")
    term.thread.join(30)
    assert not term.thread.is_alive()
    assert isinstance(term.error, CommandExitException) and term.error.exit_code == 4
    text = term.text()
    expected = "".join(f"{i:06d}\r\n" for i in range(40000))
    assert expected in text, (len(text), text[-200:])


def test_stream_input_feeds_stdin_in_order(sbx: CodeSandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(handle.pid, iter(["a\n", b"b\n", "c\n"]))
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "a\nb\nc\n"


def test_async_sdk(server: RunningServer) -> None:
    import asyncio

    from e2b_code_interpreter import AsyncSandbox

    async def flow() -> tuple[str, str, str | None, bool]:
        sb = await AsyncSandbox.create()
        try:
            out = await sb.commands.run("echo async")
            await sb.files.write("/home/user/a.txt", "async file")
            text = await sb.files.read("/home/user/a.txt")
            code = await sb.run_code("3 * 3")
        finally:
            await sb.kill()
        return out.stdout, text, code.text, await sb.is_running()

    assert asyncio.run(flow()) == ("async\n", "async file", "9", False)


def test_a_revoked_key_closes_its_sandboxes_data_plane(server: RunningServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    key = server.key("revokers")
    monkeypatch.setenv("E2B_API_KEY", key)
    sb = E2BSandbox.create()
    assert sb.commands.run("echo before").stdout == "before\n"
    server.server.keys.revoke(key.split("_")[1])
    wait_until(lambda: not sb.is_running(), 10, "the revoked key's sandbox to stop answering")  # key cache: 2 s
    with pytest.raises(TimeoutException):
        sb.commands.run("echo after")
    monkeypatch.setenv("E2B_API_KEY", server.key("revokers"))  # another key of the tenant takes it over
    again = E2BSandbox.connect(sb.sandbox_id)
    assert again.commands.run("echo again").stdout == "again\n"
    again.kill()


def test_update_network_changes_the_brokers_lists(server: RunningServer) -> None:
    manager = server.server.m
    opened = E2BSandbox.create(network={"allow_out": ["example.com"]})
    closed = E2BSandbox.create()
    try:
        opened.update_network({"allow_out": ["example.org"], "deny_out": ["203.0.113.0/24"]})
        net = manager.get(opened.sandbox_id).policy.network
        assert net.allow == ["example.org"] and net.deny == ["203.0.113.0/24"]
        with pytest.raises(SandboxException, match="network.allow"):
            opened.update_network({"allow_out": ["exa mple.org"]})
        assert manager.get(opened.sandbox_id).policy.network.allow == ["example.org"]  # unchanged
        opened.update_network({"allow_internet_access": False})
        assert manager.get(opened.sandbox_id).policy.network.mode == "none"
        with pytest.raises(SandboxException, match="without a network"):
            closed.update_network({"allow_out": ["example.com"]})
    finally:
        opened.kill()
        closed.kill()


def test_watch_dir_reports_changes_between_looks(sbx: CodeSandbox) -> None:
    from e2b import FilesystemEventType

    sbx.files.make_dir("/home/user/watched/inner")
    sbx.files.write("/home/user/watched/old.txt", "old")
    handle = sbx.files.watch_dir("/home/user/watched", recursive=True)
    assert handle.get_new_events() == []
    sbx.files.write("/home/user/watched/new.txt", "new")
    sbx.files.write("/home/user/watched/inner/deep.txt", "deep")
    sbx.files.remove("/home/user/watched/old.txt")
    events = {(e.name, e.type) for e in handle.get_new_events()}
    assert events == {("new.txt", FilesystemEventType.CREATE), ("inner/deep.txt", FilesystemEventType.CREATE),
                      ("old.txt", FilesystemEventType.REMOVE)}
    sbx.commands.run("echo more >> /home/user/watched/new.txt")
    assert {(e.name, e.type) for e in handle.get_new_events()} == {("new.txt", FilesystemEventType.WRITE)}
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()
    with pytest.raises(SandboxException):
        sbx.files.watch_dir("/home/user/watched/new.txt")  # not a directory


def test_watch_dir_stream_with_the_async_sdk(server: RunningServer, sbx: CodeSandbox) -> None:
    import asyncio

    from e2b_code_interpreter import AsyncSandbox

    async def flow() -> list[tuple[str, str]]:
        sb = await AsyncSandbox.connect(sbx.sandbox_id)
        await sb.files.make_dir("/home/user/astream")
        seen: list[tuple[str, str]] = []
        got = asyncio.Event()

        def on_event(e: Any) -> None:
            seen.append((e.name, e.type.value))
            got.set()

        handle = await sb.files.watch_dir("/home/user/astream", on_event=on_event, timeout=30)
        await sb.files.write("/home/user/astream/f.txt", "x")
        await asyncio.wait_for(got.wait(), 20)
        await handle.stop()
        return seen

    assert ("f.txt", "create") in asyncio.run(flow())


def test_bad_input_gets_a_clear_error_naming_the_field(server: RunningServer, sbx: CodeSandbox) -> None:
    key = {"X-API-KEY": os.environ["E2B_API_KEY"], "Content-Type": "application/json"}
    for body, field in (({"templateID": "base", "envVars": {"1BAD": "x"}}, "envs"),
                        ({"templateID": "base", "timeout": -5}, "timeout"),
                        ({"templateID": "base", "metadata": {"k": 5}}, "metadata"),
                        ({"templateID": "base", "autoPause": True}, "autoPause"),
                        ({"templateID": "base", "network": {"allowOut": ["not a host!"]}}, "network.allow")):
        r = _raw(server, "POST", "/e2b/v2/sandboxes", key, json=body)
        assert r.status_code == 400 and r.json()["code"] == 400 and field in r.json()["message"], (body, r.text)
    r = _raw(server, "POST", "/e2b/v2/sandboxes", key, content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == 400
    envd = {**_envd_headers(sbx), "Content-Type": "application/connect+json"}
    huge = struct.pack(">BI", 0, 1 << 30) + b"{}"
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/Start", envd, content=huge)
    assert _frames(r.content)[0][1]["error"]["code"] == "resource_exhausted"
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/Start", envd, content=_envelope({"process": {"cmd": 5}}))
    assert _frames(r.content)[0][1]["error"] == {"code": "invalid_argument",
                                                 "message": "process.cmd must be a non-empty string"}
    unary = {**_envd_headers(sbx), "Content-Type": "application/json"}
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/SendSignal", unary,
             json={"process": {"pid": 1}, "signal": "SIGNAL_NOPE"})
    assert r.status_code == 400 and "signal" in r.json()["message"]
    r = _raw(server, "POST", "/e2b/sandbox/process.Process/StreamInput", envd,
             content=_envelope({"event": {"start": "not an object"}}))
    assert _frames(r.content)[0][1]["error"]["code"] == "invalid_argument"
    r = _raw(server, "POST", "/e2b/sandbox/filesystem.Filesystem/Nope", unary, json={})
    assert r.status_code == 501 and r.json()["code"] == "unimplemented"
    r = _raw(server, "POST", "/e2b/sandbox/filesystem.Filesystem/ListDir", unary, json={"path": "/", "depth": 99})
    assert r.status_code == 400 and "depth" in r.json()["message"]
    for host in ("49983-../../etc.example.test", "99999999-sbx.example.test", "abc-sbx-1.example.test",
                 "10-0-0-5.internal", f"49983-{sbx.sandbox_id}"):
        r = _raw(server, "GET", "/health", {"Host": host})  # not the host form: the server's own /health
        assert r.status_code == 200 and r.json()["status"] == "ok", host


def test_the_cookbook_example_runs_unchanged(server: RunningServer, tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "e2b_cookbook.py"
    run = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "saved chart-0.png" in run.stdout and "45" in run.stdout.split()
    assert (tmp_path / "chart-0.png").read_bytes().startswith(b"\x89PNG")


def test_a_create_retried_with_its_idempotency_key_gets_the_same_sandbox(server: RunningServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    first = E2BSandbox.create(idempotency_key="retry-1")
    try:
        assert E2BSandbox.create(idempotency_key="retry-1").sandbox_id == first.sandbox_id
        other = E2BSandbox.create(idempotency_key="retry-2")
        assert other.sandbox_id != first.sandbox_id
        other.kill()
        monkeypatch.setenv("E2B_API_KEY", server.key("someone-else"))  # keys are per tenant
        stranger = E2BSandbox.create(idempotency_key="retry-1")
        assert stranger.sandbox_id != first.sandbox_id
        stranger.kill()
    finally:
        first.kill()
    monkeypatch.undo()
    again = E2BSandbox.create(idempotency_key="retry-1")  # a new one once the first has ended
    assert again.sandbox_id != first.sandbox_id
    again.kill()
