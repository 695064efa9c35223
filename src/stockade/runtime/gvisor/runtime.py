"""Starting and tearing down a gVisor sandbox: one runsc container per sandbox, the agent its init.

Order of a start: lock -> a template's lease, the workspace images and the template's overlay -> the
sandbox's cgroup (the shared cgroups module: runsc is told its path and joins
it, so the Sentry, the gofer and everything inside are charged to the policy's limits) -> the broker's
socket -> the bundle -> `runsc run` with the channel as the container's stdio -> hello/ready, where the
agent lowers its rlimits (gVisor enforces RLIMIT_NPROC, so limits.pids means what it means in the jail).
`runsc run` is our child and dies with us (PR_SET_PDEATHSIG); its Sentry and gofer die with it, and the
next start's sweep deletes what runsc kept of the container.

As an ordinary user runsc runs rootless (``--rootless``: its own user namespace, the caller's uid its root)
and gives up what needs root on the host: cgroups (memory, pids and cpu are missing controls, accepted by
the policy or refused, as in the unprivileged jail; RLIMIT_NPROC in the Sentry still holds limits.pids),
the disk workspace (tmpfs in the Sentry) and templates (the host mounts their overlay).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ... import environment
from ...agent import protocol
from ...config import HostConfig
from ...errors import PolicyError, SandboxUnavailableError, UnenforceableError
from ...policy import format_size
from ...templates import Lease, TemplateStore
from ...templates.users import ImageUser

if TYPE_CHECKING:
    from ...templates.snapshot import SnapshotSource
from .. import cgroups
from ..agent_files import compiled_agent
from ..base import Runtime, RuntimeSandbox, SandboxLayout, SandboxSpec
from ..channel import AgentChannel
from ..jail import rootfs, template_root, workspace
from ..jail.config import workspace_choice
from ..locks import Lock, lock_is_stale
from . import bundle as bundle_mod
from . import runsc as runsc_mod
from .egress import StreamListener

START_TIMEOUT = 20.0
RUNSC_TIMEOUT = 20.0
# The host's pids cgroup counts the Sentry's and the gofer's threads and systrap's stub processes, not the
# sandbox's processes (those are the Sentry's tasks; RLIMIT_NPROC counts them at limits.pids). It is a
# backstop against a runaway Sentry, so it is the policy's count plus room for the Sentry itself.
SENTRY_PIDS = 512
LAYOUT = SandboxLayout(egress_relay=True)
CHANNEL_FD = 3   # where the agent finds the channel: runsc --pass-fd donates our end of it to the Sentry


class GvisorRuntime(Runtime):
    name = "gvisor"
    layout = LAYOUT

    def __init__(self, config: HostConfig | None = None) -> None:
        self.config = config or HostConfig.from_env()
        self.rootless = os.geteuid() != 0
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.base = state / "gvisor"
        self.base.mkdir(exist_ok=True, mode=0o700)
        (state / "sandboxes").mkdir(exist_ok=True, mode=0o700)
        self.runsc_root = self.base / "runsc"     # runsc's own state (--root)
        self.bundles = self.base / "sandboxes"    # one OCI bundle per sandbox
        self.net_dir = self.base / "net"          # per-sandbox broker sockets
        for d in (self.runsc_root, self.bundles, self.net_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        env = os.environ
        self.runsc = runsc_mod.probe(runsc_mod.locate(env.get("STOCKADE_RUNSC") or None), state,
                                     env.get("STOCKADE_GVISOR_PLATFORM") or None)
        self.image = rootfs.system_image(env.get("STOCKADE_PYTHON") or None)
        agent = compiled_agent(self.image.python_host, state)
        helper = (Path(protocol.__file__).parent / "stockade_artifacts.py").read_bytes()
        self.static = bundle_mod.Static.build(self.base / "static", agent, helper)
        # /home/user and /tmp: the jail's per-sandbox disk images (ENOSPC at their sizes, not memory), bound
        # into the container through the gofer; else tmpfs in the Sentry (memory, charged to its cgroup)
        self.workspace = workspace.choose(not self.rootless, workspace_choice(env.get("STOCKADE_WORKSPACE")))
        self.workspace_dir = state / "workspace"
        self.overlay_dir = state / "overlay"   # template sandboxes' overlays (the jail's layout: one sweep each)
        self._templates: TemplateStore | None = None
        self.cgroups = cgroups.detect(env.get("STOCKADE_CGROUP_PARENT", "stockade"))
        if self.rootless:  # runsc joins no cgroup then (--ignore-cgroups), even a delegated one
            self.cgroups = cgroups.CgroupHost(self.cgroups.version, problems={
                c: "rootless runsc (an ordinary user) runs without cgroups" for c in cgroups.CONTROLLERS})
        self.cgroup_parent = env.get("STOCKADE_CGROUP_PARENT", "stockade").strip("/")
        cpuset = cgroups.v1_cpuset_mount() if self.cgroups.version == 1 and self.cgroups.parents else None
        problem = cgroups.fill_v1_cpuset(cpuset, self.cgroup_parent) if cpuset is not None else None
        if problem:  # runsc pins each container's CPUs (limits.cpus) in a cpuset cgroup under this parent
            raise SandboxUnavailableError(f"cannot prepare the cpuset cgroup runsc pins sandboxes' CPUs in: {problem}",
                                          "fix: run as root with the cpuset hierarchy writable, or set "
                                          "STOCKADE_CGROUP_PARENT to a cgroup you may write")
        self.sandbox_env = self.config.sandbox_env if environment.is_built(self.config.sandbox_env) else None
        self.flags = [self.runsc.path, "--root", str(self.runsc_root), f"--platform={self.runsc.platform}",
                      "--network=none", "--overlay2=none", "--cpu-num-from-quota", "--oci-seccomp"]
        if self.rootless:
            self.flags += ["--rootless", "--ignore-cgroups"]
        if env.get("STOCKADE_RUNSC_DEBUG_LOG"):  # runsc's own debug logs, for a start that fails
            self.flags += ["--debug", "--strace", f"--debug-log={env['STOCKADE_RUNSC_DEBUG_LOG'].rstrip('/')}/"]
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self.host_cpus = sorted(os.sched_getaffinity(0))
        self._cpu_turn = itertools.count()

    @property
    def templates(self) -> TemplateStore:
        if self._templates is None:
            self._templates = TemplateStore(self.config.data_dir / "templates")
        return self._templates

    @classmethod
    def unmet_requirement(cls) -> str | None:
        try:
            runsc_mod.locate(os.environ.get("STOCKADE_RUNSC") or None)
        except SandboxUnavailableError as exc:
            return str(exc)
        return None

    def _lock_path(self, sandbox_id: str) -> Path:
        return self.config.state_dir / "sandboxes" / f"{sandbox_id}.lock"

    async def call_runsc(self, *args: str, timeout: float = RUNSC_TIMEOUT) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.flags, *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=environment.isolated_env(), cwd="/")
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return -1, f"runsc {args[0]} did not finish in {timeout:.0f} s"
        return proc.returncode or 0, err.decode("utf-8", "replace").strip()

    def _container_ids(self) -> set[str]:
        """Containers runsc keeps state for (its files are named <sandbox>_sandbox:<container>.state)."""
        try:
            return {e.name.split("_sandbox:", 1)[0] for e in os.scandir(self.runsc_root)
                    if "_sandbox:" in e.name}
        except OSError:
            return set()

    def _runsc_cgroups(self, sandbox_id: str) -> list[Path]:
        """The sandbox's cgroups in the hierarchies stockade does not manage (runsc makes a cpuset one)."""
        ours = set(cgroups.Cgroup(self.cgroups, sandbox_id).dirs)
        found = Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}/{sandbox_id}")
        return sorted(d for d in found if d not in ours and d.is_dir())

    async def sweep_stale(self) -> list[str]:
        """Delete the containers, cgroups, bundles and broker sockets of sandboxes whose owner died."""
        swept: set[str] = set()
        names = self._container_ids()
        for d in (self.bundles, self.net_dir, self.workspace_dir, self.overlay_dir):
            if d.is_dir():
                names.update(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
        for name in sorted(names):
            lock = self._lock_path(name)
            if not lock_is_stale(lock):
                continue
            await self._remove(name)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            swept.add(name)
        return sorted(swept)

    async def _remove(self, sandbox_id: str) -> None:
        """Everything of a sandbox on the host, whether it ran in this process or in a dead one."""
        if sandbox_id in self._container_ids():
            code, err = await self.call_runsc("delete", "--force", sandbox_id)
            if code != 0 and sandbox_id in self._container_ids():
                raise SandboxUnavailableError(f"runsc could not delete sandbox {sandbox_id}: {err[-300:]}")
        for pid in _processes_of(self.bundles / sandbox_id):  # a gofer or Sentry whose runsc died first
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.cgroups.parents:
            await cgroups.Cgroup(self.cgroups, sandbox_id).destroy()
        for d in self._runsc_cgroups(sandbox_id):  # runsc's own (the cpuset), empty once its processes died
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
        shutil.rmtree(self.bundles / sandbox_id, ignore_errors=True)
        shutil.rmtree(self.net_dir / sandbox_id, ignore_errors=True)
        if (self.overlay_dir / sandbox_id).exists():  # before the workspace, whose image holds its upper dir
            await asyncio.to_thread(template_root.remove, self.overlay_dir / sandbox_id)
        if (self.workspace_dir / sandbox_id).exists():  # after the gofer, which held the images' mounts
            await asyncio.to_thread(workspace.remove, self.workspace_dir / sandbox_id)

    def leftovers(self, sandbox_id: str, described: Mapping[str, object] | None = None) -> list[str]:
        left = [f"process {pid} (runsc) serves the sandbox's bundle"
                for pid in _processes_of(self.bundles / sandbox_id)]
        if sandbox_id in self._container_ids():
            left.append(f"runsc state for container {sandbox_id} in {self.runsc_root}")
        left += [f"cgroup {d}" for d in cgroups.Cgroup(self.cgroups, sandbox_id).dirs if d.exists()]
        left += [f"cgroup {d} (made by runsc)" for d in self._runsc_cgroups(sandbox_id)]
        for d in (self.workspace_dir, self.overlay_dir):
            left += [f"mount {p}" for p in workspace.mounts_under(d / sandbox_id)]
        left += [f"loop device {dev} ({backing})"
                 for dev, backing in workspace.loop_devices(self.config.data_dir, sandbox_id).items()]
        for path, what in ((self._lock_path(sandbox_id), "lock file"), (self.bundles / sandbox_id, "bundle"),
                           (self.net_dir / sandbox_id, "broker socket directory"),
                           (self.workspace_dir / sandbox_id, "workspace mount directory"),
                           (self.overlay_dir / sandbox_id, "template overlay (writable layer) directory")):
            if path.exists():
                left.append(f"{what} {path}")
        return left

    async def start(self, spec: SandboxSpec) -> GvisorSandbox:
        missing = [c for c in cgroups.CONTROLLERS
                   if c not in self.cgroups.parents and c not in spec.policy.allow_missing_controls]
        if missing:
            reasons = "; ".join(f"{c}: {self.cgroups.problems.get(c, 'unavailable')}" for c in missing)
            raise UnenforceableError(f"cannot enforce limits.{'/'.join(missing)} on this host ({reasons})",
                                     "fix: give stockade the cgroup controllers, or accept the weaker sandbox "
                                     f"with allow_missing_controls = {missing}")
        sandbox = GvisorSandbox(self, spec)
        try:
            await sandbox._start(spec.envs)
        except BaseException:
            await sandbox.stop()
            raise
        return sandbox

    def _die_with_us(self, cpus: list[int]) -> Callable[[], None]:
        prctl, parent = self._prctl, os.getpid()

        def preexec() -> None:  # between fork and exec: only system calls on prepared values
            prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the owner died before the prctl took effect
                os._exit(1)
            # runsc, the gofer and the Sentry run on the sandbox's CPUs; with no cgroup (rootless) this is
            # also where the Sentry takes its CPU count from (Go's NumCPU reads the affinity)
            os.sched_setaffinity(0, cpus)
        return preexec


class GvisorSandbox(RuntimeSandbox):
    layout = LAYOUT

    def __init__(self, runtime: GvisorRuntime, spec: SandboxSpec) -> None:
        self.runtime = runtime
        self.id = spec.id
        self.policy = spec.policy
        self.files = dict(spec.files)
        self.bundle = runtime.bundles / spec.id
        self.egress = StreamListener(runtime.net_dir / spec.id, spec.egress) if spec.egress else None
        self.template = spec.template
        self.build_step = spec.build_step
        self.lease: Lease | None = None
        self.overlay: template_root.OverlayRoot | None = None
        self.image_user: ImageUser | None = None    # a template's user (templates/users.py)
        # in a template sandbox the host's python runs only the agent, and the sandbox environment is not bound
        self.sandbox_env = runtime.sandbox_env if spec.template is None else None
        self.python = (template_root.python_argv(template_root.PY_SO_DIR) if spec.template else
                       [f"{environment.VENV}/bin/python3" if runtime.sandbox_env else runtime.image.python])
        self.lock: Lock | None = None
        self.cgroup: cgroups.Cgroup | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.sentry_pid: int | None = None
        self.stderr_fd: int | None = None   # what runsc writes (a memfd): why a sandbox ended, if it says
        self.workspace: workspace.DiskWorkspace | None = None
        # as many CPUs as limits.cpus, rounded up, turn by turn over the host's (as the jail pins them)
        n = min(len(runtime.host_cpus), max(1, math.ceil(spec.policy.limits.cpus)))
        start = next(runtime._cpu_turn) * n
        self.cpus = sorted({runtime.host_cpus[(start + i) % len(runtime.host_cpus)] for i in range(n)})
        self._stopped = False
        self._stop_lock = asyncio.Lock()

    async def _start(self, envs: Mapping[str, str]) -> None:
        rt, lim = self.runtime, self.policy.limits
        self.lock = Lock(rt._lock_path(self.id))
        if self.template is not None:
            if rt.rootless:
                raise PolicyError("template", "the gvisor runtime runs templates as root only (the host mounts "
                                  "their overlay): run as root, or use runtime 'jail', which runs them unprivileged")
            self.lease = template_root.lease(rt.templates, self.template)
            self.template_config = self.lease.resolved.config
            if (own := template_root.image_python(self.lease.resolved)) is not None:
                self.python, self.python_script = [own], "interpreter.py"
            self.image_user = template_root.sandbox_user(self.lease.resolved, self.files, build_step=self.build_step)
        # the Sentry's user is the host's same uid (its files in the writable layer belong to it)
        uid, gid = (self.image_user.uid, self.image_user.gid) if self.image_user else (rootfs.SANDBOX_UID,
                                                                                        rootfs.SANDBOX_GID)
        mounts = []
        for i, mount in enumerate(self.policy.filesystem.mounts):
            if not os.path.exists(mount.source):
                raise PolicyError(f"filesystem.mounts.{i}.source", f"{mount.source} does not exist on this host")
            mounts.append((mount.source, mount.target, mount.mode == "rw"))
        host_pids = lim.pids + SENTRY_PIDS
        if rt.cgroups.parents:
            self.cgroup = cgroups.Cgroup(rt.cgroups, self.id)
            self.cgroup.create(lim.memory, host_pids, lim.cpus)
        if self.egress is not None:
            self.egress.start()
        fs = self.policy.filesystem
        if rt.workspace.disk:
            self.workspace = workspace.DiskWorkspace(rt.config.state_dir, rt.config.data_dir, self.id,
                                                     uid, fs.workspace_size, fs.tmp_size)
            await asyncio.to_thread(self.workspace.create, self.lease is not None)
            # Only the gofer (root) passes the mount points: no host user, uid 1000 included, may
            for mount_point in (self.workspace.disk, self.workspace.tmp):
                os.chown(mount_point, 0, 0)
                os.chmod(mount_point, 0o700)
        template = None
        if self.lease is not None:
            ws, resolved = self.workspace, self.lease.resolved
            assert self.image_user is not None
            self.overlay = template_root.OverlayRoot(
                rt.config.state_dir, self.id, resolved.layer_dirs, uid, fs.workspace_size,
                (ws.upper, ws.work) if ws else None,
                template_root.layer_id_maps(resolved.layer_infos, self.image_user, uid, gid))
            await asyncio.to_thread(self.overlay.create)
            self.overlay.give_home()
            os.chmod(self.overlay.base, 0o700)   # only the gofer: gid 1000 may be a host user's too
            template = bundle_mod.TemplateRootfs(
                self.overlay.merged, template_root.host_python(rt.image.python_host, rt.config.state_dir))
        self.bundle.mkdir(mode=0o700)
        bundle_mod.write(self.bundle, policy=self.policy, layout=self.layout, static=rt.static, image=rt.image,
                         sandbox_env=self.sandbox_env, egress_dir=self.egress.socket_dir if self.egress else None,
                         files=self.files, cgroups_path=f"/{rt.cgroup_parent}/{self.id}" if self.cgroup else None,
                         host_pids=host_pids, cpus=self.cpus, channel_fd=CHANNEL_FD, mounts_checked=mounts,
                         workspace=(str(self.workspace.home), str(self.workspace.tmp_dir)) if self.workspace else None,
                         template=template)
        argv = list(rt.flags)
        if self.egress is not None:
            argv.append("--host-uds=open")  # the Sentry may connect to the broker's socket (the only one bound)
        host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv += ["run", "--bundle", str(self.bundle), f"--pass-fd={agent_sock.fileno()}:{CHANNEL_FD}", self.id]
        self.stderr_fd = stderr_fd = os.memfd_create("stockade-runsc-stderr", os.MFD_CLOEXEC)
        try:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(  # noqa: S603 - argv is built here, not from input
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_fd, start_new_session=True,
                pass_fds=(agent_sock.fileno(),),
                env=environment.isolated_env(), cwd="/", preexec_fn=rt._die_with_us(self.cpus))
        finally:
            agent_sock.close()
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        self.channel = AgentChannel(reader, writer)
        self.channel.explain_end = self._end_reason
        try:
            # the workspace venv pip installs into (environment.workspace_venv), made by the agent: the
            # Sentry's tmpfs has nothing in it before the start
            venv = environment.workspace_venv(self.sandbox_env) if self.sandbox_env else None
            env = rootfs.sandbox_env({}, f"{environment.VENV}/bin:{environment.MOUNT}/bin" if venv else None)
            if venv is not None:
                env["VIRTUAL_ENV"] = environment.VENV
            home = rootfs.HOME
            if self.lease is not None:  # the image's environment and working directory, under the caller's
                home = template_root.apply_image_config(self.lease.resolved.config, env, self.image_user) or home
            env.update(envs)
            rlimits = {"nofile": lim.open_files, "fsize": lim.file_size, "core": 0}
            await self.agent.hello(env, rlimits, lim.pids, home, START_TIMEOUT,
                                   user=(uid, gid), workspace=venv)
        except SandboxUnavailableError:
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
            said = self._runsc_said() or f"exited with {self.proc.returncode if self.proc else None}"
            raise SandboxUnavailableError(f"cannot start a gVisor sandbox (runsc said: {said})",
                                          "fix: run `stockade doctor`, which says whether gVisor can run "
                                          "here") from None

    def _runsc_said(self) -> str | None:
        """The last line runsc (and the Sentry, whose stderr is runsc's) wrote, kept for the sandbox's life."""
        if self.stderr_fd is None:
            return None
        size = os.lseek(self.stderr_fd, 0, os.SEEK_END)
        text = os.pread(self.stderr_fd, min(size, 8192), max(0, size - 8192)).decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1][:500] if lines else None

    def _end_reason(self) -> str | None:
        """gVisor's kernel is one process on the host: the out-of-memory kill at limits.memory ends it, and so
        the whole sandbox, not one command (the memory cgroup's own counter says whether it happened)."""
        if self.cgroup is not None and (self.cgroup.oom_kills() or 0) > 0:
            return (f"out of memory: the sandbox reached limits.memory ({format_size(self.policy.limits.memory)}), "
                    "and under gVisor the kernel's out-of-memory kill ends the whole sandbox (its kernel is one "
                    "process on the host); raise limits.memory")
        said = self._runsc_said()
        return f"gVisor's sandbox process ended (runsc said: {said})" if said else None

    def is_alive(self) -> bool:
        return not self._stopped and self.proc is not None and self.proc.poll() is None and not self.channel.closed

    def describe(self) -> dict[str, object]:
        rt = self.runtime
        return {
            "runtime": rt.name,
            "runsc": rt.runsc.describe(),
            "platform": rt.runsc.platform,
            "kernel": "gVisor (the Sentry: the host kernel serves only the Sentry's own filtered calls)",
            "host_uid": os.geteuid(),   # the Sentry's and the gofer's (rootless: the caller's own)
            "rootless": rt.rootless,
            "uid_isolation": False,
            "cgroup_version": rt.cgroups.version,
            "controls": {c: c in rt.cgroups.parents for c in cgroups.CONTROLLERS},
            "seccomp": True,   # the jail's rules, applied by the Sentry to every task (--oci-seccomp)
            "python_env": environment.MOUNT if self.sandbox_env else None,
            "python_venv": environment.VENV if self.sandbox_env else None,  # where pip installs (the workspace's)
            "code_interpreter": "ipython" if self.sandbox_env else "stdlib",
            "template": self.template,
            "user": ({"uid": self.image_user.uid, "gid": self.image_user.gid, "name": self.image_user.name}
                     if self.image_user else {"uid": rootfs.SANDBOX_UID, "gid": rootfs.SANDBOX_GID, "name": "user"}),
            "image_owners": self.overlay.image_owners if self.overlay else None,
            # a template's writable root: its upper dir is on the workspace image (or a tmpfs) of that size
            "root_write_limit": "read-only" if self.template is None else self.policy.filesystem.workspace_size,
            "workspace_backing": rt.workspace.name,
            "time_namespace": True,   # the Sentry's clocks: uptime and boot time are the sandbox's own
            "runsc_pid": self.proc.pid if self.proc else None,
            "sentry_host_pid": self._sentry_pid(),
        }

    def _sentry_pid(self) -> int | None:
        """The Sentry's host process: the child of our `runsc run` that boots the sandbox."""
        if self.sentry_pid is None and self.proc is not None:
            self.sentry_pid = next((pid for pid in _processes_of(self.bundle) if _comm(pid) == "runsc-sandbox"),
                                   None)
        return self.sentry_pid

    def snapshot_source(self) -> SnapshotSource:
        user = self.image_user
        ids = (user.uid, user.gid) if user is not None else (rootfs.SANDBOX_UID, rootfs.SANDBOX_GID)
        return template_root.snapshot_source(self.runtime.templates, self.overlay, self.lease, user, ids)

    def memory_peak(self) -> int | None:
        return self.cgroup.memory_peak() if self.cgroup else None

    def memory_usage(self) -> tuple[int, int] | None:
        return self.cgroup.memory_usage() if self.cgroup else None

    def oom_kills(self) -> int | None:
        return self.cgroup.oom_kills() if self.cgroup else None

    async def stop(self) -> None:
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if hasattr(self, "channel"):
                self.channel.close()
            try:
                if self.proc is not None and self.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()   # the Sentry and the gofer get SIGKILL with it (their death signal)
                await self.runtime._remove(self.id)
                if self.proc is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
                if self.egress is not None:
                    await self.egress.stop()
            finally:
                if self.stderr_fd is not None:
                    os.close(self.stderr_fd)
                    self.stderr_fd = None
                if self.lease is not None:
                    self.lease.release()
                if self.lock is not None:
                    self.lock.release()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def _processes_of(bundle: Path) -> list[int]:
    """runsc processes (run, gofer, sandbox) whose command line names this bundle."""
    needle = str(bundle).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle + b"\0" in cmdline or cmdline.endswith(needle) or b"=" + needle + b"\0" in cmdline:
            found.append(int(entry.name))
    return found
