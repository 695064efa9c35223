"""Every SDK call, sync and async."""

from __future__ import annotations

import asyncio
import io
import signal

import pytest

from stockade import AsyncSandbox, CommandError, PathNotFoundError, Sandbox

from .conftest import ROOT, base_policy
from .waiting import read_until


def test_commands_run_basics(sandbox: Sandbox):
    r = sandbox.commands.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code, r.truncated, r.timed_out) == ("out\n", "err\n", 3, False, False)
    assert sandbox.commands.run(["printf", "%s|", "a b", "$HOME"]).stdout == "a b|$HOME|"


def test_commands_run_env_cwd_stdin(make_sandbox):
    sb = make_sandbox(envs={"SANDBOX_WIDE": "1"})
    sb.files.make_dir("work/sub")
    r = sb.commands.run("echo $SANDBOX_WIDE $ONE; pwd; cat", envs={"ONE": "uno"}, cwd="work/sub", stdin="piped\n")
    assert r.stdout == "1 uno\n/home/user/work/sub\npiped\n"
    big = b"x" * (1 << 20)
    assert sb.commands.run("wc -c", stdin=big).stdout.strip() == str(len(big))


def test_check_raises_command_error(sandbox: Sandbox):
    with pytest.raises(CommandError) as err:
        sandbox.commands.run("echo boom >&2; exit 2", check=True)
    assert err.value.result.exit_code == 2 and "boom" in str(err.value)


def test_check_raises_timeout_error_on_timeout(sandbox: Sandbox):
    import stockade

    with pytest.raises(stockade.TimeoutError) as err:
        sandbox.commands.run("sleep 5", timeout=0.5, check=True)
    assert isinstance(err.value, TimeoutError) and err.value.result.timed_out


@pytest.mark.skipif(ROOT, reason="checks the unprivileged default; as root every control is available")
def test_unprivileged_default_policy_refuses_missing_controls_clearly():
    from stockade import UnenforceableError

    with pytest.raises(UnenforceableError) as err:
        Sandbox.create()
    assert "limits.memory/pids/cpu" in str(err.value) and "allow_missing_controls" in err.value.advice


def test_streaming_callbacks(sandbox: Sandbox):
    out, err = [], []
    r = sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.05; done; echo e >&2",
                             on_stdout=out.append, on_stderr=err.append)
    assert "".join(out) == "1\n2\n3\n" and "".join(err) == "e\n"
    assert r.stdout == "1\n2\n3\n"


def test_background_handle(sandbox: Sandbox):
    h = sandbox.commands.run("read line; echo got:$line; sleep 60", background=True)
    assert h.pid > 1
    assert any(p.pid == h.pid for p in sandbox.commands.list())
    h.send_stdin("hello\n")
    read_until(h, lambda: "got:hello" in h.stdout, 10, "the command to echo its stdin")
    assert h.kill() is True
    r = h.wait()
    assert r.exit_code == -signal.SIGKILL and "got:hello" in r.stdout
    assert all(p.pid != h.pid for p in sandbox.commands.list())
    assert sandbox.commands.kill(h.pid) is False


def test_background_stdin_close_and_wait(sandbox: Sandbox):
    h = sandbox.commands.run("cat", background=True)
    h.send_stdin(b"abc")
    h.close_stdin()
    assert h.wait().stdout == "abc"


def test_send_signal(sandbox: Sandbox):
    h = sandbox.commands.run("trap 'echo term; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
                             background=True)
    read_until(h, lambda: "ready" in h.stdout, 10, "the trap to be set")  # a signal before it would kill sh
    assert sandbox.commands.send_signal(h.pid, signal.SIGTERM)
    assert h.wait().stdout == "ready\nterm\n"


def test_files_roundtrip(sandbox: Sandbox):
    info = sandbox.files.write("dir/a.txt", "héllo")
    assert (info.name, info.path, info.type, info.size) == ("a.txt", "/home/user/dir/a.txt", "file", 6)
    assert sandbox.files.read("dir/a.txt") == "héllo"
    assert sandbox.files.read("/home/user/dir/a.txt", format="bytes") == "héllo".encode()
    payload = bytes(range(256)) * 4096  # 1 MiB, streamed from a file object
    sandbox.files.write("bin", io.BytesIO(payload))
    assert sandbox.files.read("bin", format="bytes") == payload
    assert b"".join(sandbox.files.read("bin", format="stream")) == payload
    names = {e.name: e.type for e in sandbox.files.list(".")}
    venv = sandbox.info().runtime["python_venv"]  # the workspace venv pip installs into (environment.py)
    assert names == {"dir": "dir", "bin": "file", **({".local": "dir"} if venv == "/home/user/.local" else {})}
    deep = {e.path for e in sandbox.files.list("/home/user", depth=2)}
    assert "/home/user/dir/a.txt" in deep
    assert sandbox.files.exists("dir") and not sandbox.files.exists("nope")
    assert sandbox.files.make_dir("new/deeper") is True and sandbox.files.make_dir("new/deeper") is False
    moved = sandbox.files.rename("dir/a.txt", "new/b.txt")
    assert moved.path == "/home/user/new/b.txt" and not sandbox.files.exists("dir/a.txt")
    sandbox.files.remove("new")
    assert not sandbox.files.exists("new/b.txt")
    with pytest.raises(PathNotFoundError):
        sandbox.files.read("new/b.txt")
    with pytest.raises(PathNotFoundError):
        sandbox.files.remove("new")


def test_partial_stream_read_then_other_calls(sandbox: Sandbox):
    sandbox.files.write("big", b"y" * (4 << 20))
    stream = sandbox.files.read("big", format="stream")
    first = next(stream)
    assert first == b"y" * len(first)
    assert sandbox.commands.run("echo interleaved").stdout == "interleaved\n"  # no head-of-line blocking
    stream.close()  # abandoning a read cancels it in the agent
    assert sandbox.files.read("big", format="bytes") == b"y" * (4 << 20)


def test_info_and_metadata(make_sandbox):
    sb = make_sandbox(metadata={"user": "alice"}, timeout=120)
    info = sb.info()
    assert info.sandbox_id == sb.id and info.metadata == {"user": "alice"} and info.state == "running"
    assert 100 < (info.end_at - info.started_at).total_seconds() <= 121
    assert info.policy["limits"]["memory"] == "512MiB"
    assert info.runtime["seccomp"] is True
    assert sb.is_running()


def test_async_sandbox_mirrors_the_sync_api():
    async def main() -> None:
        async with await AsyncSandbox.create(policy=base_policy()) as sb:
            r = await sb.commands.run("echo $X", envs={"X": "async"})
            assert r.stdout == "async\n"
            chunks: list[str] = []
            r = await sb.commands.run("echo a; echo b", on_stdout=chunks.append)
            assert "".join(chunks) == "a\nb\n"
            h = await sb.commands.run("cat", background=True)
            await h.send_stdin("zz")
            await h.close_stdin()
            assert (await h.wait()).stdout == "zz"
            await sb.files.write("f", b"data")
            assert await sb.files.read("f") == "data"
            venv = (await sb.info()).runtime["python_venv"]
            assert {e.name for e in await sb.files.list(".")} == {"f", *([".local"] if venv else [])}
            assert await sb.files.exists("f")
            assert any(i.sandbox_id == sb.id for i in await AsyncSandbox.list())
            assert (await AsyncSandbox.connect(sb.id)).id == sb.id
            await sb.set_timeout(100)
            assert await sb.is_running()
            # concurrency within one sandbox
            results = await asyncio.gather(*(sb.commands.run(f"echo {i}") for i in range(10)))
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]
        assert not await sb.is_running()

    asyncio.run(main())


def test_argv_commands_are_looked_up_in_the_commands_path(sandbox: Sandbox):
    sandbox.files.write("bin/hello", "#!/bin/sh\necho from-my-path\n")
    sandbox.commands.run("chmod +x bin/hello")
    r = sandbox.commands.run(["hello"], envs={"PATH": "/home/user/bin:/usr/bin:/bin"})
    assert r.stdout == "from-my-path\n"
    assert sandbox.commands.run(["hello"]).exit_code == 127
    assert sandbox.commands.run(["which", "save-artifact"]).stdout == "/opt/stockade/bin/save-artifact\n"


def test_concurrent_first_calls_share_one_manager() -> None:
    """Many sandboxes created at once on a fresh transport all live in the one manager that serves them."""
    from stockade.sdk.portal import portal
    from stockade.sdk.transports.local import LocalTransport

    transport = LocalTransport()

    async def many() -> None:
        # (a timeout, so that sandboxes a broken transport strands in a manager it dropped still end soon)
        made = await asyncio.gather(*(AsyncSandbox.create(base_policy(), timeout=60, transport=transport)
                                      for _ in range(4)), return_exceptions=True)
        sandboxes = [sb for sb in made if isinstance(sb, AsyncSandbox)]
        try:
            assert len(sandboxes) == 4, made
            managers = [await transport.manager() for _ in range(3)]
            assert all(m is managers[0] for m in managers)  # one manager, kept
            assert sorted(managers[0].sandboxes) == sorted(sb.id for sb in sandboxes)  # holding every one
            outs = await asyncio.gather(*(sb.commands.run("echo ok") for sb in sandboxes))
            assert [r.stdout for r in outs] == ["ok\n"] * 4
        finally:
            for sb in sandboxes:
                await sb.kill()

    try:
        asyncio.run(many())
    finally:
        portal().call(transport.close())


def test_info_policy_shows_the_effective_lifetime_timeout():
    with Sandbox.create(policy=base_policy(), timeout=120) as sb:
        assert sb.info().policy["lifetime"]["timeout"] == "2m"
        sb.set_timeout(90)
        assert sb.info().policy["lifetime"]["timeout"] == "90s"


def test_missing_controls_error_gives_the_sdk_argument_that_accepts_them():
    # the check itself, on a runtime that sees no usable cgroup (as an ordinary user's does)
    from stockade import Policy, UnenforceableError
    from stockade.runtime import cgroups
    from stockade.runtime.base import SandboxSpec
    from stockade.runtime.jail.runtime import JailRuntime

    rt = JailRuntime()
    rt.cgroups = cgroups.CgroupHost(None, problems={c: "not delegated" for c in cgroups.CONTROLLERS})
    with pytest.raises(UnenforceableError) as err:
        asyncio.run(rt.start(SandboxSpec("sb-test-missing", Policy())))
    assert 'Sandbox.create(policy={"allow_missing_controls": ["memory", "pids", "cpu"]})' in err.value.advice
