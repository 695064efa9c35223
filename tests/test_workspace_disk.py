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


@as_root
def test_the_sweep_removes_an_image_and_a_loop_device_a_start_killed_midway_left(tmp_path):
    """A start killed between creating an image and unlinking it leaves the name; one killed between
    attaching it and setting autoclear (kernels before 5.8) leaves a loop device nobody mounted."""
    runtime = JailRuntime()
    name = f"sbx-stale{secrets.token_hex(4)}"
    images = runtime.config.data_dir / "workspaces"
    images.mkdir(mode=0o700, exist_ok=True)
    image = images / f"{name}-disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                         check=True).stdout.strip()
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
