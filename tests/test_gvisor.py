"""The gvisor runtime's own facts, beside the conformance suite (which runs in full against it): which runsc
and platform, what it newly hides of the host, a runsc too old refused with the reason, and its
pieces (the bundle, the OCI seccomp profile, the byte-relay egress) on their own."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from stockade import Policy, PolicyError, Sandbox, SandboxUnavailableError
from stockade.runtime.jail import seccomp

from .conftest import ROOT, base_policy

RUNSC_INSTALLED = any(os.access(p, os.X_OK) for p in ("/usr/local/bin/runsc", "/usr/bin/runsc")) or bool(
    os.environ.get("STOCKADE_RUNSC"))
# (as root: an ordinary user's gVisor is rootless, checked by its own test below and by the conformance suite)
needs_gvisor = pytest.mark.skipif(not (ROOT and RUNSC_INSTALLED), reason="checks gVisor as root, with runsc")


@pytest.fixture
def gsb():
    sb = Sandbox.create(policy=base_policy(), runtime="gvisor")
    yield sb
    sb.kill()


@needs_gvisor
def test_info_names_the_runtime_runsc_and_platform(gsb):
    facts = gsb.info().runtime
    assert facts["runtime"] == "gvisor"
    assert facts["platform"] in ("systrap", "ptrace", "kvm") and facts["platform"] == facts["runsc"]["platform"]
    assert os.path.isfile(facts["runsc"]["path"]) and facts["seccomp"] is True


@needs_gvisor
def test_the_host_kernel_identity_load_and_boot_are_invisible(gsb):
    """What gVisor adds over the jail: the sandbox's kernel is the Sentry, so even uname(2), which no
    /proc mask can reach, names gVisor's kernel, not the host's."""
    host = os.uname()
    out = gsb.commands.run("uname -r; uname -v; cat /proc/sys/kernel/osrelease").stdout.split("\n")
    assert host.release not in out[0] and host.version not in out[1] and out[0] == out[2]
    assert gsb.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() != \
        Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert gsb.commands.run("cat /proc/loadavg").stdout.split()[:3] == ["0.00"] * 3
    uptime = float(gsb.commands.run("cut -d' ' -f1 /proc/uptime").stdout)
    assert uptime < float(Path("/proc/uptime").read_text().split()[0]) and uptime < 600


@needs_gvisor
def test_the_agent_runs_under_an_identity_commands_cannot_signal(gsb):
    # real and saved uid 0 (the Sentry's root, no capability left in its bounding set), effective 1000
    status = dict(line.split(":", 1) for line in gsb.files.read("/proc/1/status").splitlines())
    assert status["Uid"].split() == ["0", "1000", "0", "1000"]
    assert int(status["CapBnd"], 16) == 0
    r = gsb.commands.run("kill -9 1; kill -STOP 1; echo $?")
    assert "Operation not permitted" in r.stderr
    assert gsb.commands.run("echo alive").stdout == "alive\n"
    # a command's own ids: all 1000, no capability
    mine = dict(line.split(":", 1) for line in gsb.commands.run("cat /proc/self/status").stdout.splitlines())
    assert mine["Uid"].split() == ["1000"] * 4 and int(mine["CapPrm"], 16) == 0


@pytest.mark.skipif(not ROOT or not os.path.exists(os.environ.get("STOCKADE_TEST_OLD_RUNSC", "/usr/bin/runsc")),
                    reason="needs root and Debian 12's runsc (CI installs it)")
def test_a_runsc_without_pass_fd_is_refused_with_the_reason(tmp_path, monkeypatch):
    from stockade.config import HostConfig
    from stockade.runtime.gvisor.runtime import GvisorRuntime

    old = os.environ.get("STOCKADE_TEST_OLD_RUNSC", "/usr/bin/runsc")
    monkeypatch.setenv("STOCKADE_RUNSC", old)
    config = HostConfig.from_env()
    config = type(config)(state_dir=tmp_path / "state", data_dir=tmp_path / "data", sandbox_env=config.sandbox_env,
                          host_groups={})
    from stockade.runtime.gvisor import runsc

    if "-pass-fd" in runsc._run_flags(old):
        pytest.skip(f"{old} is a current runsc")
    with pytest.raises(SandboxUnavailableError, match="too old.*--pass-fd") as info:
        GvisorRuntime(config)
    assert "outlive" in str(info.value) and "/proc/1" in str(info.value)  # what it was measured to miss
    assert "go install gvisor.dev/gvisor/runsc" in info.value.advice


@pytest.mark.skipif(ROOT or not RUNSC_INSTALLED, reason="what an ordinary user gets: rootless runsc")
def test_an_ordinary_user_gets_rootless_gvisor_and_is_told_what_it_gives_up():
    from stockade.errors import UnenforceableError

    with pytest.raises(UnenforceableError) as info:  # no cgroups: refused unless the policy accepts it
        Sandbox.create(policy=Policy(), runtime="gvisor")
    assert "limits.memory/pids/cpu" in str(info.value) and "rootless" in str(info.value)
    sb = Sandbox.create(policy=base_policy(), runtime="gvisor")
    try:
        facts = sb.info().runtime
        assert facts["rootless"] is True and facts["host_uid"] == os.geteuid()
        assert facts["workspace_backing"] == "tmpfs" and facts["controls"] == dict.fromkeys(facts["controls"], False)
        assert "gvisor" in sb.commands.run("uname -r").stdout
        assert sb.commands.run("id -u; echo x > /home/user/f && cat /home/user/f").stdout == "1000\nx\n"
        r = sb.commands.run("kill -9 1; echo $?")   # the agent is as out of reach as under root
        assert "Operation not permitted" in r.stderr and sb.commands.run("echo alive").stdout == "alive\n"
        # RLIMIT_NPROC in the Sentry holds limits.pids without a pids cgroup
        limits = sb.commands.run("grep 'Max processes' /proc/self/limits").stdout.split()
        assert limits[2] == limits[3] == str(Policy().limits.pids - 1), limits
    finally:
        sb.kill()
    with pytest.raises(PolicyError) as refused:
        Sandbox.create(policy=base_policy(), runtime="gvisor", template="anything")
    assert refused.value.field == "template" and "as root only" in str(refused.value)


def test_the_oci_profile_carries_the_jail_rules():
    """The Sentry applies the same denylist (runsc --oci-seccomp): every name, the clone namespace flags,
    the subreaper guard, socket families, the terminal ioctls and personality; never clone3 (see the
    profile's docstring)."""
    profile = seccomp.oci_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    rules = profile["syscalls"]
    named = {n for r in rules if not r["args"] for n in r["names"]}
    assert named == set(seccomp.DENIED) and "clone3" not in {n for r in rules for n in r["names"]}
    clone_flags = {r["args"][0]["value"] for r in rules if r["names"] == ["clone"]}
    assert clone_flags == {*seccomp.NAMESPACE_FLAGS.values(), seccomp.CLONE_PARENT}
    ioctls = {r["args"][0]["valueTwo"] for r in rules if r["names"] == ["ioctl"]}
    assert ioctls == {seccomp.TIOCSTI, seccomp.TIOCLINUX, seccomp.TIOCSETD}
    assert all(r["action"] == "SCMP_ACT_ERRNO" for r in rules)
    json.dumps(profile)


def test_the_bundle_is_read_only_with_the_policy_sizes_and_no_host_path_but_the_allowlist(tmp_path):
    from stockade.runtime.base import SandboxLayout
    from stockade.runtime.gvisor import bundle
    from stockade.runtime.jail import rootfs

    policy = Policy.model_validate({"limits": {"memory": "96MiB", "cpus": 0.5, "pids": 40},
                                    "filesystem": {"workspace_size": "300MiB", "tmp_size": "50MiB"}})
    static = bundle.Static.build(tmp_path / "static", {"agent.zip": b"PK"}, b"# helper")
    b = tmp_path / "b"
    b.mkdir()
    bundle.write(b, policy=policy, layout=SandboxLayout(egress_relay=True), static=static,
                 image=rootfs.system_image(), sandbox_env=None, egress_dir=None,
                 files={"/opt/stockade/ca.pem": b"CA"}, cgroups_path="/stockade/x", host_pids=552, cpus=[0],
                 channel_fd=3, mounts_checked=[])
    config = json.loads((b / "config.json").read_text())
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert config["process"]["noNewPrivileges"] is True and config["process"]["env"] == []
    assert config["process"]["args"][-1] == "3"
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert "size=314572800" in mounts["/home/user"]["options"] and "size=52428800" in mounts["/tmp"]["options"]
    for m in config["mounts"]:
        if m["type"] == "bind":
            assert "ro" in m["options"], m
            assert (m["source"] in rootfs.system_image().binds or m["source"].startswith(str(tmp_path))), m
    res = config["linux"]["resources"]
    assert res["memory"]["limit"] == 96 << 20 and res["cpu"] == {"quota": 50_000, "period": 100_000, "cpus": "0"}
    assert config["linux"]["cgroupsPath"] == "/stockade/x" and "seccomp" in config["linux"]


def test_the_relay_listener_takes_a_selector_then_hands_the_stream_over(tmp_path):
    """gVisor's egress: one stream per connection, a selector byte first; no byte, a bad byte or silence
    past the deadline closes it without calling the broker."""
    from stockade.runtime.gvisor import egress

    async def main() -> list[tuple[bytes, bytes]]:
        seen: list[tuple[bytes, bytes]] = []

        async def handler(sock: socket.socket, kind: bytes) -> None:
            data = await asyncio.get_running_loop().sock_recv(sock, 100)
            seen.append((kind, data))
            sock.close()

        listener = egress.StreamListener(tmp_path / "net", handler)
        listener.start()
        egress.SELECTOR_TIMEOUT, old = 0.3, egress.SELECTOR_TIMEOUT
        try:
            for first in (b"Hhello", b"Sworld", b"Xbad", b"", None):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(str(listener.socket_path))
                if first is not None:
                    c.sendall(first)
                    if not first:
                        c.shutdown(socket.SHUT_WR)
                await asyncio.sleep(0.5 if first is None else 0.05)
                c.close()
            await asyncio.sleep(0.1)
        finally:
            egress.SELECTOR_TIMEOUT = old
            await listener.stop()
        assert not (tmp_path / "net").exists()
        return seen

    assert asyncio.run(main()) == [(b"H", b"hello"), (b"S", b"world")]


@needs_gvisor
def test_a_server_whose_default_is_gvisor_hands_out_warm_gvisor_sandboxes():
    from stockade.runtime.gvisor.runtime import GvisorRuntime
    from stockade.sdk.transports.remote import RemoteTransport

    from .server_support import RunningServer
    from .waiting import wait_until

    server = RunningServer(runtime=GvisorRuntime(), warm_pool=1,
                           warm_pool_policy=base_policy().model_dump(mode="json"))
    try:
        pool = server.server.manager.pools[None]  # type: ignore[union-attr]
        assert pool is not None
        wait_until(lambda: len(pool.ready) == 1, 60, "the warm pool to fill")
        warm_id = pool.ready[0][0].id
        transport = RemoteTransport(server.url, server.key("alice"))
        sb = Sandbox.create(policy=base_policy(), transport=transport, envs={"GREETING": "warm"})
        try:
            assert sb.sandbox_id == warm_id and sb.info().runtime["runtime"] == "gvisor"
            r = sb.commands.run("echo $GREETING; uname -r")
            assert r.stdout.split()[0] == "warm" and r.stdout.split()[1] != os.uname().release
        finally:
            sb.kill()
    finally:
        server.stop()


@needs_gvisor
def test_the_workspace_is_disk_its_size_is_enospc_not_an_oom_and_nothing_is_left():
    from .conftest import sandbox_traces

    sb = Sandbox.create(policy=base_policy(limits={"memory": "256MiB"},
                                           filesystem={"workspace_size": "600MiB", "tmp_size": "32MiB"}),
                        runtime="gvisor")
    try:
        facts = sb.info().runtime
        if facts["workspace_backing"] != "disk image":
            pytest.fail(f"gVisor's workspace is {facts['workspace_backing']} on this root host")
        r = sb.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M count=700", timeout=120)
        assert r.exit_code != 0 and "No space left" in r.stderr, r.stderr
        assert 500 << 20 < int(sb.commands.run("stat -c %s /home/user/fill").stdout) <= 600 << 20
        r = sb.commands.run("dd if=/dev/zero of=/tmp/fill bs=1M count=64")
        assert "No space left" in r.stderr and int(sb.commands.run("stat -c %s /tmp/fill").stdout) <= 32 << 20
        assert sb.commands.run("echo alive").stdout == "alive\n"
        assert sb.commands.run("stat -c %U /home/user /home/user/fill").stdout.split() == ["user", "user"]
    finally:
        sb.kill()
    assert sandbox_traces(facts, sb.sandbox_id) == []
