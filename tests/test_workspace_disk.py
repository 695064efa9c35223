"""The workspace is disk: /home/user and /tmp are ext4 images on the host's disk (as root), so filling them
ends in ENOSPC at their sizes, not in an OOM kill; nothing of them survives a stop or a crash and sweep;
no sandbox reaches another's; a symlink a sandbox plants does not steer the teardown. Unprivileged, the
tmpfs fallback is in force and said to be."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stockade import Sandbox
from stockade.errors import SandboxUnavailableError, StockadeError
from stockade.runtime.jail import workspace
from stockade.runtime.jail.config import JailConfig
from stockade.runtime.jail.host_mounts import HostMounts
from stockade.runtime.jail.runtime import JailRuntime

from .conftest import ROOT, host_runtime, sandbox_traces
from .waiting import wait_until

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/ns/user"), reason="needs user namespaces")
as_root = pytest.mark.skipif(not ROOT, reason="workspace images need loop devices and mounts: root only")

REPO = Path(__file__).resolve().parents[1]


def _oom_kills(sb: Sandbox) -> int | None:
    from stockade.sdk.portal import portal
    from stockade.sdk.sandbox import _transport

    async def get() -> int | None:
        manager = await _transport(None).manager()
        return manager.sandboxes[sb.sandbox_id].runtime.oom_kills()  # type: ignore[no-any-return]

    return portal().call(get())


@as_root
def test_filling_the_workspace_past_the_memory_limit_ends_in_enospc_not_an_oom_kill(make_sandbox):
    sb = make_sandbox(limits={"memory": "256MiB"}, filesystem={"workspace_size": "600MiB"})
    assert sb.info().runtime["workspace_backing"] == "disk image"
    r = sb.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M count=1000", timeout=120)
    assert r.exit_code == 1 and "No space left on device" in r.stderr, (r.exit_code, r.stderr)
    assert r.limit is None, r.error
    # far more than the memory limit was written, and the sandbox lives on without an OOM kill
    written = int(sb.commands.run("stat -c %s /home/user/fill").stdout)
    assert written > 500 << 20
    assert _oom_kills(sb) == 0
    assert sb.is_running()
    assert sb.commands.run("rm /home/user/fill && echo x > /home/user/after && cat /home/user/after").stdout == "x\n"


@as_root
def test_home_and_tmp_are_bounded_each_by_its_own_size(make_sandbox):
    sb = make_sandbox(filesystem={"workspace_size": "24MiB", "tmp_size": "8MiB"})
    r = sb.commands.run("dd if=/dev/zero of=/tmp/fill bs=1M count=64")
    assert r.exit_code != 0 and "No space left" in r.stderr
    assert (6 << 20) < int(sb.commands.run("stat -c %s /tmp/fill").stdout) <= 8 << 20
    # a full /tmp takes nothing of the workspace, which fills up at its own size
    assert sb.commands.run("dd if=/dev/zero of=/home/user/a bs=1M count=16 && echo ok").stdout.endswith("ok\n")
    r = sb.commands.run("dd if=/dev/zero of=/home/user/b bs=1M count=64")
    assert "No space left" in r.stderr
    total = sum(int(x) for x in sb.commands.run("stat -c %s /home/user/a /home/user/b").stdout.split())
    assert (20 << 20) < total <= 24 << 20
    # both are the sandbox user's, as the tmpfs were; /dev/shm stays a tmpfs
    out = sb.commands.run("stat -c '%U %a' /home/user /tmp; stat -f -c %T /home/user /tmp /dev/shm").stdout
    assert out.split("\n")[:5] == ["user 755", "user 1777", "ext2/ext3", "ext2/ext3", "tmpfs"]


@as_root
def test_stop_leaves_no_image_mount_or_loop_device(make_sandbox):
    sb = make_sandbox()
    described = sb.info().runtime
    sb.commands.run("echo data > /home/user/f; echo data > /tmp/f")
    traces = sandbox_traces(described, sb.sandbox_id)
    for what in ("workspace mount directory", "mount ", "loop device "):
        assert any(t.startswith(what) for t in traces), traces
    assert sum(t.startswith("loop device") for t in traces) == 2
    # both devices clear themselves when their filesystems go (so a crash cannot leak them)
    devices = workspace.loop_devices(host_runtime().config.data_dir, sb.sandbox_id)
    assert len(devices) == 2 and all(workspace.autoclears(dev) for dev in devices)
    # the images have no names: they live exactly as long as their loop devices
    assert not any(t.startswith("workspace image") for t in traces)
    sb.kill()
    assert sandbox_traces(described, sb.sandbox_id) == []


CREATOR = """
import json, sys, time
sys.path[:0] = {path!r}
from stockade import Sandbox
sb = Sandbox.create(policy={{"filesystem": {{"workspace_size": "64MiB"}}}}, timeout=600)
sb.commands.run("dd if=/dev/zero of=/home/user/f bs=1M count=8; echo x > /tmp/f")
print(sb.sandbox_id, json.dumps(sb.info().runtime), flush=True)
time.sleep(600)
"""


@as_root
def test_a_crashed_owner_s_images_mounts_and_loop_devices_go_with_the_sweep():
    proc = subprocess.Popen([sys.executable, "-c", CREATOR.format(path=[str(REPO), str(REPO / "src")])],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sandbox_id, facts = line.split(" ", 1)
    described = json.loads(facts)
    wait_until(lambda: not [t for t in sandbox_traces(described, sandbox_id) if "process" in t], 10,
               "the orphaned sandbox's processes to end")
    left = sandbox_traces(described, sandbox_id)
    assert sum(t.startswith("loop device") for t in left) == 2, left
    assert any(t.startswith("mount ") for t in left), left
    swept = asyncio.run(JailRuntime().sweep_stale())
    assert sandbox_id in swept
    assert sandbox_traces(described, sandbox_id) == []


def _stale_loop_device(runtime: JailRuntime, formatted: bool = False) -> tuple[str, Path, str]:
    """(a sandbox id no owner holds, its workspace image under its name, a loop device of it without
    autoclear): what a start killed midway on a kernel before 5.8 leaves."""
    name = f"sbx-stale{secrets.token_hex(4)}"
    images = runtime.config.data_dir / "workspaces"
    images.mkdir(mode=0o700, exist_ok=True)
    image = images / f"{name}-disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    if formatted:
        subprocess.run([workspace.mkfs_path() or "mkfs.ext4", "-q", str(image)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                         check=True).stdout.strip()
    return name, image, dev


@as_root
def test_the_sweep_removes_an_image_and_a_loop_device_a_start_killed_midway_left(tmp_path):
    """A start killed between creating an image and unlinking it leaves the name; one killed between
    attaching it and setting autoclear (kernels before 5.8) leaves a loop device nobody mounted."""
    runtime = JailRuntime()
    name, image, dev = _stale_loop_device(runtime)
    try:
        left = runtime.leftovers(name)
        assert f"loop device {dev} backed by {image}" in left and f"workspace image {image}" in left, left
        assert name in asyncio.run(runtime.sweep_stale())
        wait_until(lambda: not runtime.leftovers(name), 10, "the loop device to detach",
                   show=lambda: runtime.leftovers(name))
        assert not image.exists()
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink(missing_ok=True)


@as_root
def test_the_sweep_never_detaches_a_loop_device_that_is_mounted(tmp_path):
    """A workspace image is mounted with its loop device named by descriptor (/proc/self/fd/N, which is
    what the sandbox's mountinfo shows): the sweep must tell a mounted device by its number, not its name."""
    import ctypes

    runtime = JailRuntime()
    name, image, dev = _stale_loop_device(runtime, formatted=True)
    point = tmp_path / "mnt"
    point.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(dev, os.O_RDWR)
    try:
        assert libc.mount(f"/proc/self/fd/{fd}".encode(), str(point).encode(), b"ext4", 0, None) == 0
        assert dev in workspace.mounted_devices()
        asyncio.run(runtime.sweep_stale())
        backing = Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
        assert backing.exists() and name in backing.read_text(), "the sweep detached a mounted device"
    finally:
        os.close(fd)
        libc.umount2(str(point).encode(), 2)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink(missing_ok=True)


@as_root
def test_a_sandbox_cannot_reach_another_s_workspace(make_sandbox):
    a, b = make_sandbox(), make_sandbox()
    a.commands.run("echo secret-a > /home/user/mine; echo tmp-a > /tmp/mine")
    assert b.commands.run("cat /home/user/mine /tmp/mine 2>&1; ls -A /home/user /tmp").stdout.count("secret") == 0
    # on the host, A's images are closed to B's uid (and so to every uid but A's and root)
    runtime = host_runtime()
    base = runtime.workspace_dir / a.sandbox_id
    b_uid = b.info().runtime["host_uid"]
    probe = subprocess.run(["cat", str(base / "disk/home/mine")], capture_output=True, text=True,
                           preexec_fn=lambda: (os.setgroups([]), os.setresgid(b_uid, b_uid, b_uid),
                                               os.setresuid(b_uid, b_uid, b_uid)))
    assert probe.returncode != 0 and "Permission denied" in probe.stderr, probe
    for name in ("disk", "tmp"):
        st = os.stat(base / name)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o710)


@as_root
def test_a_planted_symlink_does_not_steer_the_teardown(make_sandbox, shared_dir):
    canary = shared_dir / "canary"
    canary.mkdir()
    (canary / "keep").write_text("host file")
    sb = make_sandbox()
    described = sb.info().runtime
    r = sb.commands.run(f"ln -s {canary} /home/user/link && ln -s {canary}/keep /tmp/link && "
                        f"ln -s {canary} /home/user/disk && mkdir -p /home/user/d/e && ln -s / /home/user/d/e/root "
                        "&& echo planted")
    assert r.stdout == "planted\n", r.stderr
    sb.kill()
    assert (canary / "keep").read_text() == "host file"
    assert sandbox_traces(described, sb.sandbox_id) == []


def test_the_backing_is_chosen_and_the_fallback_says_why():
    assert workspace.choose(False, "auto") == workspace.Backing(False, "loop devices and mounts need root")
    assert workspace.choose(True, "tmpfs") == workspace.Backing(False, "STOCKADE_WORKSPACE=tmpfs")
    with pytest.raises(SandboxUnavailableError, match="STOCKADE_WORKSPACE=disk, but loop devices"):
        workspace.choose(False, "disk")


def test_a_bad_workspace_setting_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("STOCKADE_WORKSPACE", "ramdisk")
    with pytest.raises(StockadeError, match="STOCKADE_WORKSPACE='ramdisk'"):
        JailConfig.from_env()


TMPFS_CREATOR = """
import json, sys
sys.path[:0] = {path!r}
from stockade import Sandbox
from tests.conftest import base_policy
with Sandbox.create(policy=base_policy(filesystem={{"workspace_size": "8MiB"}})) as sb:
    r = sb.commands.run("stat -f -c %T /home/user /tmp; dd if=/dev/zero of=/home/user/f bs=1M count=64")
    print(json.dumps([sb.info().runtime["workspace_backing"], r.stdout, r.stderr]))
"""


def test_the_tmpfs_fallback_is_bounded_and_reported():
    """Unprivileged this is the default; as root STOCKADE_WORKSPACE=tmpfs asks for it."""
    env = {**os.environ, "STOCKADE_WORKSPACE": "tmpfs"}
    out = subprocess.run([sys.executable, "-c", TMPFS_CREATOR.format(path=[str(REPO), str(REPO / "src")])],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    backing, stdout, stderr = json.loads(out.stdout.splitlines()[-1])
    assert backing == "tmpfs"
    assert stdout == "tmpfs\ntmpfs\n" and "No space left" in stderr
    doctor = subprocess.run([sys.executable, "-m", "stockade.cli", "doctor"], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert "[WEAK] workspace: /home/user, /tmp and /dev/shm are tmpfs (STOCKADE_WORKSPACE=tmpfs), charged to " \
           "the memory cgroup" in doctor.stdout, doctor.stdout


EGRESS_CREATOR = """
import json, os, sys
sys.path[:0] = {path!r}
from stockade import Sandbox
from tests.conftest import base_policy
with Sandbox.create(policy=base_policy(network={{"mode": "allowlist", "allow": ["egress.test"]}})) as sb:
    info = sb.info().runtime
    print(json.dumps([sb.sandbox_id, info["host_uid"], info["host_mounts"]]), flush=True)
    sys.stdin.readline()
"""
PROBE = """
import socket, sys
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


@as_root
@pytest.mark.parametrize("backing", ["disk", "tmpfs"])
def test_no_other_host_user_reaches_a_sandbox_broker_socket(backing):
    """The broker's socket is 0666 (the sandbox's uid connects): the directory it is in must let only the
    sandbox's bwrap pass. A local user connecting to it would use the sandbox's egress, secrets and all."""
    from stockade.runtime.jail.runtime import JailRuntime

    env = {**os.environ, "STOCKADE_WORKSPACE": backing}
    proc = subprocess.Popen([sys.executable, "-c", EGRESS_CREATOR.format(path=[str(REPO), str(REPO / "src")])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        sandbox_id, host_uid, host_mounts = json.loads(proc.stdout.readline())
        assert host_mounts == (backing == "disk")
        state = JailRuntime().config.state_dir
        sockets = [p for p in (state / "net" / sandbox_id / "broker.sock",
                               state / "workspace" / sandbox_id / "run" / "net" / "broker.sock") if p.exists()]
        # with the disk workspace the socket's mount is detached from the host once the sandbox runs: no
        # host path leads to it at all
        assert (sockets == []) == (backing == "disk"), sockets
        for sock in sockets:
            st = os.stat(sock.parent)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, host_uid, 0o710), st
            for uid in (65534, host_uid + 1):
                probe = subprocess.run(["/usr/bin/python3", "-I", "-c", PROBE, str(sock)], capture_output=True,
                                       text=True, timeout=30, preexec_fn=lambda uid=uid: (
                                           os.setgroups([]), os.setresgid(uid, uid, uid), os.setresuid(uid, uid, uid)))
                assert probe.stdout.strip() == "PermissionError", (uid, probe)
    finally:
        proc.communicate("\n", timeout=60)


def test_describe_reports_the_backing(sandbox):
    assert sandbox.info().runtime["workspace_backing"] == ("disk image" if ROOT else "tmpfs")


def test_images_are_sparse_and_made_from_one_blank_per_size(make_sandbox):
    if not ROOT:
        pytest.skip("workspace images need loop devices and mounts: root only")
    make_sandbox(filesystem={"workspace_size": "40MiB", "tmp_size": "12MiB"})
    blanks = host_runtime().config.data_dir / "workspaces" / "blank"
    for size in (40 << 20, 12 << 20):
        blank = blanks / f"{workspace.FORMAT}-{size}.img"
        st = blank.stat()
        assert st.st_size == size and st.st_blocks * 512 < size // 4, (blank, st.st_blocks)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o400)


@as_root
def test_doctor_says_when_the_data_directory_holding_the_images_is_memory():
    data = Path("/dev/shm") / f"stockade-test-data-{secrets.token_hex(4)}"
    data.mkdir(mode=0o755)
    try:
        doctor = subprocess.run([sys.executable, "-m", "stockade.cli", "doctor"], capture_output=True, text=True,
                                env={**os.environ, "STOCKADE_DATA_DIR": str(data),
                                     "PYTHONPATH": str(REPO / "src")}, timeout=120)
    finally:
        data.rmdir()
    assert f"[WEAK] workspace: /home/user and /tmp are ext4 images under {data}/workspaces, but that is on " \
           "tmpfs" in doctor.stdout, doctor.stdout


@as_root
def test_an_image_the_host_cannot_make_is_a_clear_error_naming_the_field():
    """ext4 files end at 16 TiB: a workspace larger than the host's filesystem can hold is refused."""
    with pytest.raises(SandboxUnavailableError) as err:
        Sandbox.create(policy={"filesystem": {"workspace_size": "64TiB"}})
    assert "filesystem.workspace_size" in str(err.value) and "workspace image" in str(err.value), err.value
    blanks = host_runtime().config.data_dir / "workspaces" / "blank"
    assert not list(blanks.glob(f"*-{64 << 40}.img*"))  # no half-made blank left


@as_root
def test_the_host_holds_no_mount_of_a_running_sandbox_dev_or_files(make_sandbox):
    """Once bwrap has bound them, the host's mounts of /dev, /dev/shm and the files are detached: the
    sandbox's copies are the last, so a crashed owner leaves no /dev/shm holding memory on the host."""
    sb = make_sandbox()
    assert sb.commands.run("head -c 4194304 /dev/zero > /dev/shm/f && ls -s /dev/shm/f").exit_code == 0
    run = host_runtime().workspace_dir / sb.sandbox_id / "run"
    assert workspace.mounts_under(run) == [] and list(run.iterdir()) == []
    assert " /dev/shm " in sb.commands.run("cat /proc/self/mountinfo").stdout


def test_binds_at_under_or_over_a_mount_beneath_a_view_are_the_host_own(tmp_path):
    """overlayfs does not cross mounts: a view of /usr would show the directory a mount beneath it
    covers, so a bind there (or above it) reads the host's own path."""
    mounts = HostMounts(tmp_path, 0, 1 << 20)
    mounts._views = {"/usr": "/V/0", "/etc": "/V/1", "/opt/env": "/V/2"}
    mounts._beneath = {"/usr": ["/usr/local", "/usr/share/zoneinfo"], "/etc": [], "/opt/env": []}
    assert mounts.through("/usr/bin") == "/V/0/bin" and mounts.through("/etc/ssl/certs") == "/V/1/ssl/certs"
    assert mounts.through("/opt/env") == "/V/2"
    for own in ("/usr/share", "/usr/local", "/usr/local/bin", "/usr/share/zoneinfo/UTC", "/usr", "/opt/envx",
                "/usrx/bin", "/var/lib"):
        assert mounts.through(own) == own, own


@as_root
def test_a_view_of_a_directory_with_a_mount_beneath_names_it(tmp_path):
    import ctypes

    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "bin").mkdir()
    (source / "sub" / "under").write_text("covered")
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"none", str(source / "sub").encode(), b"tmpfs", 0, b"size=1m") == 0
    base = tmp_path / "ws"
    base.mkdir()
    try:
        mounts = HostMounts(base, 0, 1 << 20)
        mounts.create([str(source)])
        assert mounts.through(str(source / "sub")) == str(source / "sub")
        view = Path(mounts.through(str(source / "bin")))
        assert view != source / "bin" and view.is_dir() and workspace.mounts_under(base / "run")
    finally:
        workspace.remove(base)
        libc.umount2(str(source / "sub").encode(), 2)
    assert not (base / "run").exists() and workspace.mounts_under(base) == []
