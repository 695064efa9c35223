"""`stockade serve` as its own process: killed mid-exec (SIGKILL) and restarted, stopped gracefully, on
SQLite and on PostgreSQL; keys and logs through the CLI against the same data directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.config import HostConfig

from .conformance.conftest import UNMET
from .conftest import base_policy, sandbox_traces
from .db_support import pg_schema_url
from .waiting import stopped_after, wait_until

STOCKADE = [sys.executable, "-m", "stockade.cli"]
SETTLE = 20.0  # seconds for a server's start, a sandbox's last processes, the next run's sweep


class ServerProcess:
    def __init__(self, data_dir: Path, database_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ}
        self.env.pop("STOCKADE_DATABASE_URL", None)
        if database_url:
            self.env["STOCKADE_DATABASE_URL"] = database_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*STOCKADE, *args, "--data-dir", str(self.data_dir)], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([*STOCKADE, "serve", "--port", str(port), "--data-dir", str(self.data_dir)],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(lambda: up() or self.proc is None or self.proc.poll() is not None, 30, "the server to start")
            if not up():
                raise AssertionError("the server exited before it answered /health")
        except AssertionError as exc:
            self.proc.kill()
            raise AssertionError(f"{exc}: {self.proc.communicate()[1].decode()[-2000:]}") from None

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    urls = pg_schema_url() if request.param == "postgresql" else iter([None])
    url = next(urls)  # skips here when no PostgreSQL server is configured: before anything is made
    data_dir = Path(tempfile.mkdtemp(prefix="stockade-test-serve-"))
    srv = ServerProcess(data_dir, url)
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
        for _ in urls:  # drops the PostgreSQL schema
            pass
        shutil.rmtree(data_dir, ignore_errors=True)


def _host_traces(info: dict[str, Any]) -> list[str]:
    sid = info["sandbox_id"]
    traces = sandbox_traces(info["runtime"], sid)
    if (HostConfig.from_env().state_dir / "net" / sid).exists():
        traces.append("broker socket directory")
    return traces


def test_a_killed_server_leaves_nothing_and_its_successor_closes_the_records(server: ServerProcess) -> None:
    _kill_and_restart(server)


@pytest.mark.skipif(UNMET.get("gvisor", "not under test") is not None,
                    reason=str(UNMET.get("gvisor", "gvisor is not under test (STOCKADE_TEST_RUNTIMES)")))
def test_a_killed_gvisor_server_leaves_no_runsc_container_and_its_successor_sweeps(tmp_path: Path) -> None:
    """The same for a server whose sandboxes are gVisor's (STOCKADE_RUNTIME): runsc's containers, gofers,
    bundles and cgroups die with it or are swept by its successor (SQLite; the store is not the point)."""
    srv = ServerProcess(tmp_path / "data")
    srv.env["STOCKADE_RUNTIME"] = "gvisor"
    try:
        _kill_and_restart(srv, runtime="gvisor")
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


def _kill_and_restart(server: ServerProcess, runtime: str = "jail") -> None:
    made = server.cli("keys", "create", "--tenant", "acme")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    server.start()
    h = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    policy = base_policy(network={"mode": "allowlist", "allow": ["x.example.test"]}).model_dump(mode="json")
    info = h.post("/sandboxes", json={"policy": policy}).json()
    sid = info["sandbox_id"]
    assert info["runtime"]["runtime"] == runtime
    # mid-exec: a command is streaming output when the server dies
    with h.stream("POST", f"/sandboxes/{sid}/commands", headers={"accept": "text/event-stream"},
                  json={"cmd": "echo started; sleep 600"}) as r:
        lines = r.iter_lines()  # held, so leaving the loop does not close the stream (which kills the command)
        for line in lines:
            if "stdout" in line:
                break
        wait_until(lambda: h.get("/events", params={"sandbox_id": sid, "type": "command.start"}).json(), SETTLE,
                   "the command's start to be recorded")
        assert _host_traces(info)
        server.stop(signal.SIGKILL)
    # the sandbox died with the server: no process of it survives
    wait_until(lambda: not [t for t in _host_traces(info) if "process" in t], SETTLE,
               "the sandbox's processes to die with the server", show=lambda: _host_traces(info))
    server.start()  # the successor sweeps cgroups, locks and broker directories, and closes the records
    h = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    wait_until(lambda: not _host_traces(info), SETTLE, "the successor to sweep the sandbox's traces",
               show=lambda: _host_traces(info))
    r = h.get(f"/sandboxes/{sid}")
    assert r.status_code == 404 and "server restarted" in r.json()["message"]
    events = h.get("/events", params={"sandbox_id": sid}).json()
    types = [e["type"] for e in events]
    assert types[:2] == ["sandbox.create", "command.start"] and "command.end" not in types, types
    (end,) = [e for e in events if e["type"] == "sandbox.end"]
    assert "server restarted" in end["data"]["reason"]
    server.stop(signal.SIGTERM)
    logs = server.cli("logs", sid)
    assert logs.returncode == 0 and "$ echo started; sleep 600" in logs.stdout and "sandbox.end" in logs.stdout


def test_logs_follow_prints_events_as_they_come(server: ServerProcess) -> None:
    key = server.cli("keys", "create", "--tenant", "acme").stdout.strip()
    server.start()
    h = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    sid = h.post("/sandboxes", json={"policy": base_policy().model_dump(mode="json")}).json()["sandbox_id"]
    follow = subprocess.Popen([*STOCKADE, "logs", sid, "--follow", "--data-dir", str(server.data_dir)],
                              env=server.env, stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        with stopped_after(SETTLE, follow.kill, "`logs --follow` to print the sandbox's creation"):
            assert "sandbox.create" in follow.stdout.readline()
        h.post(f"/sandboxes/{sid}/commands", json={"cmd": "echo followed"})
        seen = ""
        with stopped_after(SETTLE, follow.kill, "`logs --follow` to print the command"):
            for line in follow.stdout:  # ends at EOF too: a follower that exits does not spin here
                seen += line
                if "followed" in seen:
                    break
        assert "$ echo followed" in seen, seen
    finally:
        follow.kill()
        follow.wait()
        h.delete(f"/sandboxes/{sid}")


def test_graceful_shutdown_kills_sandboxes_and_flushes_the_log(server: ServerProcess) -> None:
    key = server.cli("keys", "create", "--tenant", "acme").stdout.strip()
    server.start()
    h = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    info = h.post("/sandboxes", json={"policy": base_policy().model_dump(mode="json")}).json()
    assert h.post(f"/sandboxes/{info['sandbox_id']}/commands", json={"cmd": "echo last words"}).status_code == 200
    server.stop(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert server.proc is not None and server.proc.returncode in (0, -signal.SIGTERM)
    wait_until(lambda: not _host_traces(info), SETTLE, "the sandbox to leave no trace after a graceful stop",
               show=lambda: _host_traces(info))
    logs = server.cli("logs", info["sandbox_id"], "--type", "command.end")
    assert "last words" in logs.stdout
    assert "its owner shut down" in server.cli("logs", info["sandbox_id"], "--type", "sandbox.end").stdout


def test_keys_cli_lists_and_revokes_without_showing_keys(server: ServerProcess) -> None:
    key = server.cli("keys", "create", "--tenant", "acme", "--name", "ci").stdout.strip()
    key_id = key.split("_")[1]
    listed = server.cli("keys", "list").stdout
    assert key_id in listed and "acme" in listed and "active" in listed and key.split("_", 2)[2] not in listed
    assert server.cli("keys", "revoke", key_id).returncode == 0
    assert "revoked" in server.cli("keys", "list").stdout
    assert server.cli("keys", "revoke", key_id).returncode == 1
    bad = server.cli("keys", "create", "--tenant", "../etc")
    assert bad.returncode == 2 and "--tenant" in bad.stderr
    missing = server.cli("logs", "sbx-0000000000000000")
    assert missing.returncode == 1 and "no events" in missing.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_every_answer_a_client_saw_is_in_the_audit_log_after_a_kill_under_load(server: ServerProcess,
                                                                                sig: int) -> None:
    """Issue 18.3: with a 5 ms batch window, answers given in the last instants before a SIGKILL had no
    record. Now an answer waits for its records' commit: clients run commands and writes until the server
    dies under them, and every command and write they saw answered is in the log the successor reads."""
    import threading

    key = server.cli("keys", "create", "--tenant", "acme").stdout.strip()
    server.start()
    headers = {"Authorization": f"Bearer {key}"}
    h = httpx.Client(base_url=server.url, headers=headers, timeout=30)
    sids = [h.post("/sandboxes", json={"policy": base_policy().model_dump(mode="json")}).json()["sandbox_id"]
            for _ in range(2)]
    answered_pids: dict[str, list[int]] = {sid: [] for sid in sids}
    answered_writes: dict[str, list[str]] = {sid: [] for sid in sids}
    stop = threading.Event()

    def client(sid: str, n: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 3:
                        r = c.post(f"/sandboxes/{sid}/commands", json={"argv": ["true"]})
                        if r.status_code == 200:
                            answered_pids[sid].append(r.json()["pid"])
                    else:
                        path = f"/tmp/w{n}-{i}"
                        r = c.put(f"/sandboxes/{sid}/files", params={"path": path}, content=b"x")
                        if r.status_code == 200:
                            answered_writes[sid].append(path)
                except httpx.HTTPError:
                    return  # the server is gone

    threads = [threading.Thread(target=client, args=(sids[n % 2], n)) for n in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(map(len, answered_pids.values())) >= 60, SETTLE, "60 answered commands",
               show=lambda: sum(map(len, answered_pids.values())))
    server.stop(sig)
    stop.set()
    for t in threads:
        t.join(30)
    server.start()
    h = httpx.Client(base_url=server.url, headers=headers, timeout=30)
    for sid in sids:
        events: list[dict[str, Any]] = []
        after = 0
        while page := h.get("/events", params={"sandbox_id": sid, "after_id": after, "limit": 5000}).json():
            events += page
            after = page[-1]["id"]
        ended = {e["data"]["pid"] for e in events if e["type"] == "command.end"}
        written = {e["data"]["path"] for e in events if e["type"] == "file.write"}
        lost_cmds = [p for p in answered_pids[sid] if p not in ended]
        lost_writes = [p for p in answered_writes[sid] if p not in written]
        assert answered_pids[sid] and lost_cmds == [], f"{len(lost_cmds)} of {len(answered_pids[sid])} commands"
        assert lost_writes == [], f"{len(lost_writes)} of {len(answered_writes[sid])} writes"
    server.stop(signal.SIGTERM)
