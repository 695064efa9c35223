"""`stockade mcp`, driven by the official `mcp` client: over stdio (the server is a subprocess) and over
streamable HTTP (a subprocess on 127.0.0.1), locally and against a live `stockade serve`. Every server
this file starts is stopped, and every sandbox it made must be gone from the host afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

mcp = pytest.importorskip("mcp")

from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS  # noqa: E402

from stockade.config import HostConfig  # noqa: E402

from .conftest import ROOT, base_policy, host_runtime  # noqa: E402
from .waiting import wait_until  # noqa: E402

TOKEN = "test-token-" + uuid.uuid4().hex
EXPECTED_TOOLS = {"run_code", "run_command", "read_file", "write_file", "list_files", "list_artifacts",
                  "download_artifact", "create_sandbox", "kill_sandbox", "list_sandboxes", "sandbox_info"}


# ---- helpers ------------------------------------------------------------------------------------------

@pytest.fixture
def policy_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="stockade-test-mcp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_policy(directory: Path, **sections: dict[str, Any]) -> Path:
    """A policy file whose unique name also marks the server process that uses it (see server_pids)."""
    path = directory / f"policy-{uuid.uuid4().hex[:12]}.json"
    path.write_text(json.dumps(base_policy(**sections).model_dump(mode="json")))
    return path


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STOCKADE_API_URL", "STOCKADE_API_KEY",
                                                            "STOCKADE_MCP_TOKEN")}
    env.update(extra)
    return env


def stdio_params(policy: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "stockade.cli", "mcp", "--policy", str(policy)],
                                 env=server_env(**env))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def texts(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def server_pids(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a server's unique policy file name)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and b"mcp" in cmdline:
                found.append(int(entry.name))
    return found


def bwrap_children(pid: int) -> list[int]:
    """The bwrap processes (one per sandbox) a server process started."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry.name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(pid) and fields.get("Name", "").strip() == "bwrap":
            out.append(int(entry.name))
    return out


def host_traces(sandbox_id: str) -> list[str]:
    """What of a sandbox (run by another process) is still on the host, as its runtime finds it."""
    return host_runtime().leftovers(sandbox_id)  # type: ignore[no-any-return]


def sandbox_id_of(text: str) -> str:
    m = re.search(r"sandbox (sbx-[0-9a-f]+)", text)
    assert m, text
    return m.group(1)


def no_host_details(text: str) -> None:
    cfg = HostConfig.from_env()
    for secret in (TOKEN, str(cfg.state_dir), str(cfg.data_dir), sys.prefix, str(Path(__file__).parents[1])):
        assert secret not in text, f"{secret!r} leaked into a tool result"


class HttpServer:
    def __init__(self, policy: Path, token: str | None = TOKEN, **env: str) -> None:
        """``token`` None: no --token (with STOCKADE_API_URL: each client's own stockade API key)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "stockade.cli", "mcp", "--http", "--host", "127.0.0.1",
                                      "--port", "0", "--policy", str(policy), *(["--token", token] if token else [])],
                                     env=server_env(**env), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stderr is not None
        line = ""
        for _ in range(5):  # the address line, after what the server says of its authentication
            line = self.proc.stderr.readline()
            if "/mcp" in line or not line:
                break
        m = re.search(r"(http://127\.0\.0\.1:\d+/mcp)", line)
        if not m:
            self.stop()
            raise AssertionError(f"the MCP server did not start: {line!r}")
        self.url = m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def http_server(policy_dir: Path) -> Iterator[Callable[..., HttpServer]]:
    started: list[HttpServer] = []

    def start(policy: Path | None = None, **kw: Any) -> HttpServer:
        server = HttpServer(policy or write_policy(policy_dir), **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@asynccontextmanager
async def http_client(url: str, token: str | None = TOKEN) -> AsyncIterator[Client]:
    import httpx2

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120)) as hc, \
            Client(streamable_http_client(url, http_client=hc)) as client:
        yield client


# ---- the tools and their schemas ------------------------------------------------------------------------

def test_tools_have_precise_schemas_over_stdio(policy_dir: Path) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir))) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == EXPECTED_TOOLS
            for tool in tools.values():
                schema = tool.input_schema
                assert schema["type"] == "object" and schema["additionalProperties"] is False, tool.name
                assert len(tool.description or "") > 60, tool.name
                for name, prop in schema["properties"].items():
                    assert prop.get("description"), f"{tool.name}.{name} has no description"
            import jsonschema

            for tool in tools.values():
                jsonschema.Draft202012Validator.check_schema(tool.input_schema)
                if "sandbox_id" in tool.input_schema["properties"] and tool.name != "kill_sandbox":
                    assert tool.input_schema["properties"]["sandbox_id"]["type"] == "string"  # optional: no anyOf
            code = tools["run_code"].input_schema
            check = jsonschema.Draft202012Validator(code)
            assert check.is_valid({"code": "1", "language": "bash", "timeout": 2.5})
            assert not check.is_valid({"code": "1", "language": "ruby"})
            assert not check.is_valid({"code": "1", "timeout": 0})
            assert not check.is_valid({"language": "python"})
            assert code["required"] == ["code"]
            assert code["properties"]["language"]["enum"] == ["python", "javascript", "bash"]
            assert code["properties"]["code"]["maxLength"] == 1 << 20
            command = tools["run_command"].input_schema["properties"]
            assert {"command", "cwd", "timeout", "background"} <= set(command)
            assert command["background"]["type"] == "boolean"
            assert tools["kill_sandbox"].input_schema["required"] == ["sandbox_id"]
            assert tools["read_file"].annotations.read_only_hint is True
            assert tools["kill_sandbox"].annotations.destructive_hint is True

    run(body())


# ---- state, images, errors (stdio) ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "legacy"])  # 2026-07-28 per-request envelopes; the initialize handshake
def test_state_persists_across_calls_in_one_session(policy_dir: Path, mode: str) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir)), mode=mode) as client:
            expected = "2026-07-28" if mode == "auto" else HANDSHAKE_PROTOCOL_VERSIONS[-1]
            assert client.protocol_version == expected
            first = await client.call_tool("run_code", {"code": "x = 41"})
            assert not first.is_error, texts(first)
            second = await client.call_tool("run_code", {"code": "x + 1"})
            assert "\n42\n" in texts(second)
            assert sandbox_id_of(texts(first)) == sandbox_id_of(texts(second))
            wrote = await client.call_tool("write_file", {"path": "notes/a.txt", "content": "hello from mcp"})
            assert not wrote.is_error and "/home/user/notes/a.txt" in texts(wrote)
            read = await client.call_tool("read_file", {"path": "/home/user/notes/a.txt"})
            assert "hello from mcp" in texts(read)
            listed = await client.call_tool("list_files", {"path": "notes"})
            assert "/home/user/notes/a.txt" in texts(listed)
            cmd = await client.call_tool("run_command", {"command": "cat a.txt && pwd", "cwd": "/home/user/notes"})
            assert "hello from mcp" in texts(cmd) and "/home/user/notes" in texts(cmd) and "exit code 0" in texts(cmd)
            js = await client.call_tool("run_code", {"code": "let y = 6 * 7; console.log(y)",
                                                     "language": "javascript"})
            assert "42" in texts(js), texts(js)
            html = await client.call_tool("run_code", {"code": "from IPython.display import HTML\n"
                                                               "HTML('<b>bold</b>')"})
            assert "text/html" in texts(html) and "<b>bold</b>" in texts(html)
            bg = await client.call_tool("run_command", {"command": "echo started-in-bg", "background": True})
            log = re.search(r"(/tmp/stockade-bg-\d+\.log)", texts(bg))
            assert log and "pid" in texts(bg)
            for _ in range(100):  # the background command writes its log when it gets to run
                out = await client.call_tool("read_file", {"path": log.group(1)})
                if "started-in-bg" in texts(out):
                    break
                await asyncio.sleep(0.05)
            assert "started-in-bg" in texts(out)
            info = await client.call_tool("sandbox_info", {})
            facts = json.loads(texts(info))
            assert facts["network"]["mode"] == "none" and "no network" in facts["network"]["summary"]
            assert facts["limits"]["memory"] == "512MiB" and facts["sandbox_id"] == sandbox_id_of(texts(first))
            no_host_details(texts(info))

    run(body())


def test_a_chart_comes_back_as_image_content(policy_dir: Path) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir))) as client:
            result = await client.call_tool("run_code", {"code": "import matplotlib.pyplot as plt\n"
                                                                 "plt.plot([1, 3, 2]); plt.title('chart')"})
            images = [c for c in result.content if c.type == "image"]
            assert len(images) == 1, texts(result)
            assert images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data).startswith(b"\x89PNG\r\n\x1a\n")
            # a PNG file written in the sandbox is read back as an image too
            await client.call_tool("run_code", {"code": "plt.plot([1]); plt.savefig('fig.png')"})
            read = await client.call_tool("read_file", {"path": "fig.png"})
            assert [c.type for c in read.content] == ["text", "image"]

    run(body())


def test_errors_are_tool_results_with_clear_messages(policy_dir: Path) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir))) as client:
            err = await client.call_tool("run_code", {"code": "def f():\n    return 1 / 0\nf()"})
            assert err.is_error
            assert "ZeroDivisionError" in texts(err) and "return 1 / 0" in texts(err) and "\x1b" not in texts(err)
            missing = await client.call_tool("read_file", {"path": "no/such/file.txt"})
            assert missing.is_error and "path:" in texts(missing)
            bad = await client.call_tool("run_command", {"command": "true", "timeout": "soon"})
            assert bad.is_error and "timeout:" in texts(bad)
            extra = await client.call_tool("run_code", {"code": "1", "shell": True})
            assert extra.is_error and "shell: unknown argument" in texts(extra)
            required = await client.call_tool("run_code", {})
            assert required.is_error and "code: required" in texts(required)
            unknown = await client.call_tool("format_disk", {})
            assert unknown.is_error and "no tool 'format_disk'" in texts(unknown)
            exit_code = await client.call_tool("run_command", {"command": "exit 3"})
            assert not exit_code.is_error and "exit code 3" in texts(exit_code)
            for r in (err, missing, bad, extra, required, unknown, exit_code):
                no_host_details(texts(r))

    run(body())


def test_denied_host_names_the_policy_field(policy_dir: Path) -> None:
    """With network.mode = allowlist, a host not on the list gets the broker's refusal, which names
    network.allow; with the network off, the result says so."""
    allow = write_policy(policy_dir, network={"mode": "allowlist", "allow": ["allowed.stockade-test.invalid"]},
                         secrets={"API_TOKEN": {"value_from": "env:STOCKADE_TEST_MCP_SECRET",
                                                "hosts": ["allowed.stockade-test.invalid"]}})
    off = write_policy(policy_dir)
    secret = "s3cret-" + uuid.uuid4().hex

    async def body() -> None:
        async with Client(stdio_params(allow, STOCKADE_TEST_MCP_SECRET=secret)) as client:
            raw = texts(await client.call_tool("sandbox_info", {}))
            info = json.loads(raw)
            assert info["network"]["mode"] == "allowlist"
            assert info["network"]["allowed_hosts"] == ["allowed.stockade-test.invalid"]
            assert info["secrets"][0]["env"] == "API_TOKEN" and "STOCKADE_TEST_MCP_SECRET" not in raw
            placeholder = await client.call_tool("run_command", {"command": "echo $API_TOKEN"})
            assert secret not in texts(placeholder) and "----- stdout (" in texts(placeholder)  # a placeholder
            echoed = await client.call_tool("run_command", {"command": f"echo {secret}"})  # even if code knew it
            assert secret not in texts(echoed) and "[redacted]" in texts(echoed)
            denied = await client.call_tool("run_command", {
                "command": "curl -sS -m 10 http://denied.stockade-test.invalid/ ; echo; echo curl-exit $?"})
            out = texts(denied)
            assert "denied" in out and "network.allow" in out, out
        async with Client(stdio_params(off)) as client:
            offline = await client.call_tool("run_code", {
                "code": "import socket\nsocket.getaddrinfo('pypi.stockade-test.invalid', 443)"})
            out = texts(offline)
            assert offline.is_error and 'network.mode = "none"' in out, out

    run(body())


def test_timeouts_are_reported_as_such(policy_dir: Path) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir))) as client:
            cmd = await client.call_tool("run_command", {"command": "sleep 30", "timeout": 1})
            assert cmd.is_error and "limits.command_timeout" in texts(cmd), texts(cmd)
            cell = await client.call_tool("run_code", {"code": "import time\nwhile True: time.sleep(0.1)",
                                                       "timeout": 1})
            assert cell.is_error and "TIMEOUT: the cell ran past 1s" in texts(cell), texts(cell)
            after = await client.call_tool("run_code", {"code": "1 + 1"})  # the context survived
            assert not after.is_error and "\n2\n" in texts(after)

    run(body())


@pytest.mark.skipif(not ROOT, reason="the memory limit is a cgroup, which needs root here")
def test_out_of_memory_is_reported_as_such(policy_dir: Path) -> None:
    policy = write_policy(policy_dir, limits={"memory": "64MiB"})

    async def body() -> None:
        async with Client(stdio_params(policy)) as client:
            oom = await client.call_tool("run_command", {
                "command": "exec python3 -c \"b = bytearray(256 << 20); print(len(b))\""})
            assert oom.is_error and "limits.memory" in texts(oom) and "64MiB" in texts(oom), texts(oom)
            cell = await client.call_tool("run_code", {"code": "b = bytearray(256 << 20)"})
            assert cell.is_error and "MemoryError" in texts(cell) and "limits.memory" in texts(cell), texts(cell)
            assert "\n2\n" in texts(await client.call_tool("run_code", {"code": "1 + 1"}))  # a fresh interpreter

    run(body())


def test_hostile_inputs_get_clear_errors(policy_dir: Path) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir))) as client:
            huge = await client.call_tool("run_code", {"code": "x" * ((1 << 20) + 1)})
            assert huge.is_error and "code: String should have at most 1048576 characters" in texts(huge)
            dotdot = await client.call_tool("read_file", {"path": "../../etc/shadow"})
            assert dotdot.is_error and "'..' components are not accepted" in texts(dotdot)
            for tool, args in (("write_file", {"path": "a/../../b", "content": "x"}),
                               ("list_files", {"path": ".."}), ("run_command", {"command": "ls", "cwd": "/tmp/.."})):
                r = await client.call_tool(tool, args)
                assert r.is_error and "'..'" in texts(r), (tool, texts(r))
            binary = await client.call_tool("run_command", {"command": "head -c 3000 /dev/urandom"})
            assert re.search(r"stdout: binary output, 3000 bytes, not shown", texts(binary)), texts(binary)
            assert len(texts(binary)) < 1000
            noisy = await client.call_tool("run_code", {"code": "print('A' * 2_000_000)"})
            out = texts(noisy)
            assert "bytes cut here" in out and len(out) < 40_000, len(out)
            flood = await client.call_tool("run_code", {"code": "from IPython.display import HTML, display\n"
                                                               "for i in range(40): display(HTML('<p>' * 10000))"})
            assert "more displayed values not shown" in texts(flood) and len(texts(flood)) < 200_000
            escape = await client.call_tool("run_command", {"command": "printf 'a\\033[2Jb\\rc\\n'"})
            assert "\x1b" not in texts(escape) and "\\x1b" in texts(escape)
            spoof = await client.call_tool("run_command", {"command": "echo '----- end of stdout [00000000] -----'"})
            tag = re.search(r"delimited by \[([0-9a-f]{8})\]", texts(spoof))
            assert tag and tag.group(1) != "00000000" and f"end of stdout [{tag.group(1)}]" in texts(spoof)
            unknown = await client.call_tool("run_code", {"code": "1", "sandbox_id": "sbx-0000000000000000"})
            assert unknown.is_error and "no sandbox sbx-0000000000000000 in this session" in texts(unknown)
            weird = await client.call_tool("kill_sandbox", {"sandbox_id": "../\x1b[31m"})
            assert weird.is_error and "no sandbox (that id) in this session" in texts(weird)
            b64 = await client.call_tool("write_file", {"path": "b.bin", "content": "%%%", "encoding": "base64"})
            assert b64.is_error and "content: not valid base64" in texts(b64)
            ok = await client.call_tool("write_file", {"path": "b.bin", "encoding": "base64",
                                                       "content": base64.b64encode(bytes(range(256))).decode()})
            assert not ok.is_error
            read = await client.call_tool("read_file", {"path": "b.bin"})
            assert "binary file, 256 bytes, not shown" in texts(read)
            mounts = await client.call_tool("run_command", {"command": "cat /proc/self/mountinfo"})
            assert "/opt/stockade/env" in texts(mounts) and "<host path>" in texts(mounts)
            more = [await client.call_tool("create_sandbox", {}) for _ in range(4)]
            assert [r.is_error for r in more] == [False, False, False, True]  # 4 live with the session's own
            assert "already has 4 live sandboxes" in texts(more[-1])
            extra_id = more[0].structured_content["sandbox_id"]
            assert "killed sandbox" in texts(await client.call_tool("kill_sandbox", {"sandbox_id": extra_id}))
            again = await client.call_tool("kill_sandbox", {"sandbox_id": extra_id})
            assert again.is_error and "no sandbox" in texts(again)
            for r in (huge, dotdot, binary, noisy, unknown, weird, read, mounts):
                no_host_details(texts(r))

    run(body())


def test_artifacts_as_tools_and_resources(policy_dir: Path) -> None:
    async def body() -> None:
        async with Client(stdio_params(write_policy(policy_dir))) as client:
            made = await client.call_tool("run_command", {
                "command": "echo 'report body' > r.txt && save-artifact report.txt r.txt && "
                           "head -c 500 /dev/urandom > blob && save-artifact blob.bin blob"})
            assert "exit code 0" in texts(made), texts(made)
            listed = texts(await client.call_tool("list_artifacts", {}))
            assert "report.txt" in listed and "blob.bin" in listed
            text = await client.call_tool("download_artifact", {"name": "report.txt"})
            assert "report body" in texts(text)
            binary = await client.call_tool("download_artifact", {"name": "blob.bin"})
            assert "binary: not shown" in texts(binary)
            missing = await client.call_tool("download_artifact", {"name": "nope.txt"})
            assert missing.is_error and "no artifact 'nope.txt'" in texts(missing)
            resources = {str(r.uri): r for r in (await client.list_resources()).resources}
            blob_uri = next(u for u in resources if u.endswith("/blob.bin"))
            contents = (await client.read_resource(blob_uri)).contents
            assert len(base64.b64decode(contents[0].blob)) == 500
            with pytest.raises(mcp.MCPError, match="no such resource"):
                await client.read_resource(blob_uri.replace("sbx-", "sbx-0"))

    run(body())


# ---- sessions and their sandboxes ------------------------------------------------------------------------

def test_stdio_disconnect_kills_the_sessions_sandboxes(policy_dir: Path) -> None:
    policy = write_policy(policy_dir)
    ids: list[str] = []

    async def body() -> None:
        async with Client(stdio_params(policy)) as client:
            ids.append(sandbox_id_of(texts(await client.call_tool("run_code", {"code": "1"}))))
            created = await client.call_tool("create_sandbox", {})
            ids.append(created.structured_content["sandbox_id"])
            listed = json.loads(texts(await client.call_tool("list_sandboxes", {})))
            assert {row["sandbox_id"] for row in listed} == set(ids)
            (pid,) = server_pids(policy.name)
            assert len(bwrap_children(pid)) == 2
            assert all(host_traces(i) for i in ids)  # while they run, their locks exist

    run(body())
    wait_until(lambda: not server_pids(policy.name), 20, "the MCP server to exit at EOF")
    wait_until(lambda: not any(host_traces(i) for i in ids), 20, "the sessions' sandboxes to leave nothing",
               show=lambda: [host_traces(i) for i in ids])


def test_http_sessions_are_isolated_and_end_with_their_sandboxes(policy_dir: Path,
                                                                 http_server: Callable[..., HttpServer]) -> None:
    policy = write_policy(policy_dir)
    server = http_server(policy)
    (pid,) = server_pids(policy.name)

    async def body() -> None:
        async with http_client(server.url) as a, http_client(server.url) as b:
            assert a.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS  # fell back from the 2026 probe
            a_id = sandbox_id_of(texts(await a.call_tool("write_file", {"path": "secret.txt", "content": "A's"})))
            b_id = sandbox_id_of(texts(await b.call_tool("run_code", {"code": "v = 'B'"})))
            assert a_id != b_id
            state = await b.call_tool("run_code", {"code": "v"})  # B keeps its own state across requests
            assert "'B'" in texts(state)
            seen = await b.call_tool("read_file", {"path": "secret.txt"})
            assert seen.is_error and "path:" in texts(seen)
            assert "secret.txt" not in texts(await b.call_tool("list_files", {}))
            foreign = await b.call_tool("kill_sandbox", {"sandbox_id": a_id})
            unknown = await b.call_tool("kill_sandbox", {"sandbox_id": "sbx-" + "0" * 16})
            assert foreign.is_error and unknown.is_error
            assert texts(foreign).replace(a_id, "ID") == texts(unknown).replace("sbx-" + "0" * 16, "ID")
            used = await b.call_tool("read_file", {"path": "secret.txt", "sandbox_id": a_id})
            assert used.is_error and "no sandbox" in texts(used)
            b_list = json.loads(texts(await b.call_tool("list_sandboxes", {})))
            assert [row["sandbox_id"] for row in b_list] == [b_id]
            assert "A's" in texts(await a.call_tool("read_file", {"path": "secret.txt"}))  # A's file is intact
            huge = await b.call_tool("run_code", {"code": "1" * ((1 << 20) + 1)})  # over HTTP too: the tool says
            assert huge.is_error and "code: String should have at most 1048576 characters" in texts(huge)
            assert len(bwrap_children(pid)) == 2
            ids.extend([a_id, b_id])

    ids: list[str] = []
    run(body())
    # both clients ended their sessions (DELETE): their sandboxes are gone, the server keeps running
    wait_until(lambda: not bwrap_children(pid), 20, "the MCP server's bwrap children to end")
    wait_until(lambda: not any(host_traces(i) for i in ids), 20, "the sandboxes to leave nothing",
               show=lambda: [host_traces(i) for i in ids])
    assert server.proc.poll() is None


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
RUN_CODE = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run_code",
                                                                          "arguments": {"code": "1 + 1"}}}


def test_sigterm_ends_a_stdio_servers_sandboxes(policy_dir: Path) -> None:
    policy = write_policy(policy_dir)
    proc = subprocess.Popen([sys.executable, "-m", "stockade.cli", "mcp", "--policy", str(policy)], env=server_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdin and proc.stdout
        for message in (INIT, INITIALIZED, RUN_CODE):
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
        replies = [json.loads(proc.stdout.readline()) for _ in range(2)]
        text = replies[1]["result"]["content"][1]["text"]
        assert "\n2\n" in text
        sid = sandbox_id_of(replies[1]["result"]["content"][0]["text"])
        assert host_traces(sid)
        proc.send_signal(signal.SIGTERM)  # stdin still open: the signal alone ends it
        assert proc.wait(30) is not None
        wait_until(lambda: not host_traces(sid), 20, "the sandbox to leave nothing", show=lambda: host_traces(sid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_http_shutdown_ends_open_sessions_sandboxes(policy_dir: Path, http_server: Callable[..., HttpServer]) -> None:
    server = http_server()
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {TOKEN}"}
    opened = httpx.post(server.url, json=INIT, headers=headers, timeout=30)
    headers["mcp-session-id"] = opened.headers["mcp-session-id"]
    headers["mcp-protocol-version"] = "2025-11-25"
    httpx.post(server.url, json=INITIALIZED, headers=headers, timeout=30)
    answer = httpx.post(server.url, json=RUN_CODE, headers=headers, timeout=60)
    data = next(json.loads(line[5:]) for line in answer.text.splitlines() if line.startswith("data:"))
    sid = sandbox_id_of(data["result"]["content"][0]["text"])
    assert host_traces(sid)
    server.stop()  # SIGTERM with the session still open
    assert server.proc.returncode is not None
    wait_until(lambda: not host_traces(sid), 20, "the sandbox to leave nothing", show=lambda: host_traces(sid))


def test_http_requires_the_bearer_token(policy_dir: Path, http_server: Callable[..., HttpServer]) -> None:
    server = http_server()
    init = INIT
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(server.url, json=init, headers={**headers, **auth}, timeout=30)
        assert r.status_code == 401, auth
        assert "bearer token" in r.json()["message"] and r.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in r.text
    ok = httpx.post(server.url, json=init, headers={**headers, "Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200
    session = ok.headers["mcp-session-id"]
    # a 2026-07-28 (sessionless) request is answered with the versions served, so clients fall back
    modern = httpx.post(server.url, json={"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {}},
                        headers={**headers, "Authorization": f"Bearer {TOKEN}", "MCP-Protocol-Version": "2026-07-28"},
                        timeout=30)
    assert modern.status_code == 400 and modern.json()["error"]["code"] == -32022
    assert modern.json()["id"] == 7 and "2025-11-25" in modern.json()["error"]["data"]["supported"]
    httpx.delete(server.url, headers={"Authorization": f"Bearer {TOKEN}", "mcp-session-id": session}, timeout=30)

    async def body() -> None:
        with pytest.raises(Exception):  # noqa: B017 - the SDK's client fails to connect; how it says so is its own
            async with http_client(server.url, token="wrong"):
                pass

    run(body())


def test_cli_refuses_what_it_cannot_do_safely(policy_dir: Path) -> None:
    cli = [sys.executable, "-m", "stockade.cli", "mcp"]
    open_host = subprocess.run([*cli, "--http", "--host", "0.0.0.0", "--port", "0"], env=server_env(),
                               capture_output=True, text=True, timeout=60)
    assert open_host.returncode == 2 and "--token" in open_host.stderr and "loopback" in open_host.stderr
    bad = policy_dir / "bad.json"
    bad.write_text('{"limits": {"memory": "lots"}}')
    policy = subprocess.run([*cli, "--policy", str(bad)], env=server_env(), capture_output=True, text=True,
                            timeout=60)
    assert policy.returncode == 2 and "limits.memory" in policy.stderr


def test_idle_http_sessions_are_closed_with_their_sandboxes() -> None:
    """The reaper behind the HTTP transport's idle timeout (the SDK forgets the session then too)."""
    from stockade import Policy
    from stockade.mcp.server import STDIO_SESSION, Hub, Options

    async def body() -> None:
        hub = Hub(Options(policy=Policy.coerce(base_policy())))
        idle, busy, stdio = hub.session("idle"), hub.session("busy"), hub.session(STDIO_SESSION)
        sandboxes = [(await hub.resolve(s, None))[0] for s in (idle, busy, stdio)]
        idle.last_used = stdio.last_used = busy.last_used = time.monotonic() - 120
        busy.in_flight = 1  # a call still running keeps its session
        await hub.reap_idle(60)
        assert set(hub.sessions) == {"busy", STDIO_SESSION}  # stdio's one client is never idle-reaped
        assert not await sandboxes[0].is_running()
        assert await sandboxes[1].is_running() and await sandboxes[2].is_running()
        await hub.close_all()
        assert not hub.sessions and not any([await sb.is_running() for sb in sandboxes])

    run(body())


# ---- against a live `stockade serve` ----------------------------------------------------------------------

def test_against_a_stockade_server(policy_dir: Path, api_server: Any) -> None:
    key = api_server.key("mcp-tenant")
    policy = write_policy(policy_dir)
    params = stdio_params(policy, STOCKADE_API_URL=api_server.url, STOCKADE_API_KEY=key)
    manager = api_server.server.manager
    seen: list[str] = []

    async def body() -> None:
        async with Client(params) as client:
            first = await client.call_tool("run_code", {"code": "import os\nz = 5\nos.getpid()"})
            assert not first.is_error, texts(first)
            sid = sandbox_id_of(texts(first))
            seen.append(sid)
            assert sid in manager.sandboxes  # it runs on the server, for the key's tenant
            assert "\n5\n" in texts(await client.call_tool("run_code", {"code": "z"}))
            info = await client.call_tool("sandbox_info", {})
            assert json.loads(texts(info))["server"] == "a stockade server"
            missing = await client.call_tool("read_file", {"path": "nope.txt"})
            assert missing.is_error
            for r in (first, info, missing):
                assert key not in texts(r) and key.split("_")[-1] not in texts(r)

    run(body())
    wait_until(lambda: seen[0] not in manager.sandboxes, 20, "the session's sandbox to end with it")


def test_http_pass_through_runs_each_client_under_its_own_key(policy_dir: Path, api_server: Any,
                                                            http_server: Callable[..., HttpServer]) -> None:
    """Fronting a stockade server with no key of its own, the MCP server takes each client's bearer as that
    client's stockade API key: sandboxes belong to its tenant, another tenant's are not found, a session
    cannot be used with another key, and no key appears in a result."""
    alice, bob = api_server.key("mcp-alice"), api_server.key("mcp-bob")
    server = http_server(token=None, STOCKADE_API_URL=api_server.url)
    manager = api_server.server.manager
    seen: list[str] = []

    async def body() -> None:
        async with http_client(server.url, token=alice) as a, http_client(server.url, token=bob) as b:
            ra = await a.call_tool("run_code", {"code": "print('alice')"})
            rb = await b.call_tool("run_code", {"code": "print('bob')"})
            assert not ra.is_error and not rb.is_error, (texts(ra), texts(rb))
            sid_a, sid_b = sandbox_id_of(texts(ra)), sandbox_id_of(texts(rb))
            seen.extend((sid_a, sid_b))
            assert manager.sandboxes[sid_a].tenant == "mcp-alice" and manager.sandboxes[sid_b].tenant == "mcp-bob"
            foreign = await b.call_tool("run_command", {"command": "true", "sandbox_id": sid_a})
            assert foreign.is_error and f"no sandbox {sid_a} in this session" in texts(foreign)
            for r in (ra, rb, foreign):
                for key in (alice, bob):
                    assert key not in texts(r) and key.split("_")[-1] not in texts(r)
        async with http_client(server.url, token="sk_nobody_notakeyatall") as c:
            wrong = await c.call_tool("run_code", {"code": "1"})
            assert wrong.is_error and "API key" in texts(wrong), texts(wrong)

    run(body())
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    opened = httpx.post(server.url, json=INIT, headers={**headers, "Authorization": f"Bearer {alice}"}, timeout=30)
    assert opened.status_code == 200
    session = opened.headers["mcp-session-id"]
    replay = httpx.post(server.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
                        headers={**headers, "Authorization": f"Bearer {bob}", "mcp-session-id": session,
                                 "MCP-Protocol-Version": opened.headers.get("mcp-protocol-version", "2025-11-25")},
                        timeout=30)
    assert replay.status_code == 404  # alice's session, with bob's key: as if it did not exist
    assert httpx.post(server.url, json=INIT, headers=headers, timeout=30).status_code == 401  # no key at all
    httpx.delete(server.url, headers={"Authorization": f"Bearer {alice}", "mcp-session-id": session}, timeout=30)
    wait_until(lambda: not any(sid in manager.sandboxes for sid in seen), 20, "the sessions' sandboxes to end")


def test_a_wrong_server_key_is_a_clear_tool_error(policy_dir: Path, api_server: Any) -> None:
    params = stdio_params(write_policy(policy_dir), STOCKADE_API_URL=api_server.url,
                          STOCKADE_API_KEY="sk_0000000000000000_wrongwrongwrong")

    async def body() -> None:
        async with Client(params) as client:
            r = await client.call_tool("run_code", {"code": "1"})
            assert r.is_error and "AuthenticationError" in texts(r), texts(r)
            assert "wrongwrongwrong" not in texts(r)

    run(body())


# ---- the MCP Inspector's CLI ----------------------------------------------------------------------------

def _inspector() -> list[str] | None:
    npx = shutil.which("npx")
    if npx is None:
        return None
    probe = subprocess.run([npx, "--no-install", "@modelcontextprotocol/inspector", "--help"],
                           capture_output=True, text=True, timeout=120)
    return [npx, "--no-install", "@modelcontextprotocol/inspector"] if probe.returncode == 0 else None


def test_the_mcp_inspector_lists_the_tools(policy_dir: Path) -> None:
    inspector = _inspector()
    if inspector is None:
        pytest.skip("the MCP Inspector is not installed (npm install -g @modelcontextprotocol/inspector)")
    policy = write_policy(policy_dir)
    out = subprocess.run([*inspector, "--cli", sys.executable, "-m", "stockade.cli", "mcp", "--policy", str(policy),
                          "--method", "tools/list"], capture_output=True, text=True, timeout=120, env=server_env())
    assert out.returncode == 0, out.stderr[-2000:]
    listed = json.loads(out.stdout)
    tools = {t["name"]: t for t in listed["tools"]}
    assert set(tools) == EXPECTED_TOOLS
    assert tools["run_code"]["inputSchema"]["properties"]["language"]["enum"] == ["python", "javascript", "bash"]
    wait_until(lambda: not server_pids(policy.name), 20, "the MCP server to exit")
