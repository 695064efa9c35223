"""As root: the sandbox's /dev, /dev/shm and the files stockade writes for it, on mounts the host makes.

A filesystem bwrap mounts is mounted inside the sandbox's user namespace, and the kernel shows such a
tmpfs's owner in mountinfo as the host uid (``uid=1200030598``, whatever the namespace maps); a device
bwrap's ``--dev`` binds from the host's devtmpfs shows that one's size, which is half the host's memory;
a bind of a host directory shows the host's device and the directory's path on it (the data directory).
So as root the host makes what the sandbox sees itself, under the sandbox's workspace directory (swept and
unmounted with it, ``workspace.remove``):

- ``<ws>/run``: a small tmpfs of root's (uid 0 is the one owner mountinfo does not print) with the
  device nodes (null, zero, full, random, urandom, tty: made here, not bound from /dev), /dev's symlinks,
  an empty read-only directory for masked /proc directories, the generated files (/etc/passwd, the sized
  /proc files, the agent's code), the broker's socket, and an empty root for a sandbox without a template;
- ``<ws>/run/dev/pts``: the sandbox's own devpts instance; ``<ws>/run/dev/shm``: its /dev/shm, a tmpfs of
  ``filesystem.tmp_size`` (charged to the sandbox's memory cgroup, which faults its pages in);
- read-only overlays of the host directories things are bound from (/usr and /etc of a host-root sandbox,
  the sandbox environment, the agent's python), named by descriptor, so mountinfo shows ``overlay`` and
  ``/proc/self/fd/N`` instead of the host's disk and path.

bwrap binds these (``--dev-bind <run>/dev /dev``, ``--ro-bind <run>/files/N path``), and once the agent is
up the host detaches its own mount of the tree (``detach``): the sandbox's copies are then the last, so
they go with the sandbox, crash or not. What mountinfo still shows is in docs/architecture.md (the device
numbers every stat() gives).
Unprivileged (or with the tmpfs workspace) bwrap makes them as before, and ``stockade doctor`` says so.

By hand, with mount(2) through ctypes as workspace.py does: five to six mounts per sandbox (~0.15 ms
each), and util-linux's mount costs a process each (~3 ms).
"""

from __future__ import annotations

import ctypes
import os
import stat
import threading
from pathlib import Path

from ...errors import SandboxUnavailableError
from . import workspace
from .workspace import MNT_DETACH, MS_NODEV, MS_NOSUID, UMOUNT_NOFOLLOW, _libc

MS_RDONLY, MS_REC, MS_PRIVATE = 1, 0x4000, 1 << 18   # (the rest are workspace.py's, which mounts the same way)
CLONE_FS, CLONE_NEWNS = 0x200, 0x20000
# the new mount API (Linux 5.2): x86_64 and aarch64 share these numbers
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 1, 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NOEXEC, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 2, 8, 4, -100
RUN_SIZE = 16 << 20    # the generated files and the agent's code (~1 MiB); only root writes here
RUN_INODES = 4096
# (name, major, minor): what bwrap's --dev gives, character devices of mode 0666
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("core", "/proc/kcore"), ("ptmx", "pts/ptmx"))

def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise SandboxUnavailableError(f"cannot mount the sandbox's {fstype} at {target}: {os.strerror(err)}",
                                      "fix: STOCKADE_WORKSPACE=tmpfs (bwrap makes /dev and the files itself)")


def _mkdir(path: Path, mode: int) -> None:
    path.mkdir(mode=mode)
    os.chmod(path, mode)   # (past the umask)


def _syscall(nr: int, *args: object) -> int:
    result = _libc.syscall(ctypes.c_long(nr), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _devpts(target: Path) -> None:
    """Mount a devpts instance at ``target`` whose context was made outside the host's first mount
    namespace: the kernel lets an instance made in it use the ptys it keeps for the host
    (kernel.pty.reserve, for root's sshd and consoles), which bwrap's instance never could. So a thread of
    its own unshares its mount namespace, opens the context there, and goes back to mount it."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            home = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.unshare(CLONE_FS | CLONE_NEWNS) != 0:
                    raise OSError(ctypes.get_errno(), "unshare")
                try:
                    context = _syscall(SYS_FSOPEN, b"devpts", FSOPEN_CLOEXEC)
                finally:
                    if _libc.setns(home, CLONE_NEWNS) != 0:   # (then this thread ends where it is)
                        raise OSError(ctypes.get_errno(), "setns back to the host's mount namespace")
            finally:
                os.close(home)
            try:
                for key, value in ((b"source", b"stockade"), (b"ptmxmode", b"0666"), (b"mode", b"0620")):
                    _syscall(SYS_FSCONFIG, context, FSCONFIG_SET_STRING, key, value, 0)
                _syscall(SYS_FSCONFIG, context, FSCONFIG_CMD_CREATE, None, None, 0)
                mount = _syscall(SYS_FSMOUNT, context, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
            finally:
                os.close(context)
            try:
                _syscall(SYS_MOVE_MOUNT, mount, b"", AT_FDCWD, str(target).encode(), MOVE_MOUNT_F_EMPTY_PATH)
            finally:
                os.close(mount)
        except BaseException as exc:   # (raised in the caller's thread)
            failure.append(exc)

    thread = threading.Thread(target=work, name="stockade-devpts")
    thread.start()
    thread.join()
    if failure:
        raise SandboxUnavailableError(f"cannot mount the sandbox's devpts at {target}: {failure[0]}",
                                      "fix: STOCKADE_WORKSPACE=tmpfs (bwrap mounts devpts itself)")


class HostMounts:
    """One sandbox's ``<ws>/run``. ``owner``: the sandbox's host uid (and gid)."""

    def __init__(self, workspace_dir: Path, owner: int, shm_size: int) -> None:
        self.run = workspace_dir / "run"
        self.owner = owner
        self.shm_size = shm_size
        self.dev = self.run / "dev"
        self.null = str(self.dev / "null")
        self.empty = self.run / "empty"
        self.root = self.run / "root"       # a template-less sandbox's /, read-only once bwrap is done
        self.files = self.run / "files"
        self.views = self.run / "views"
        self._count = 0
        self._views: dict[str, str] = {}          # host directory -> its view
        self._beneath: dict[str, list[str]] = {}  # host directory -> the mount points under it

    def create(self, sources: list[str]) -> None:
        """Mount and fill ``<ws>/run``, with a view of each host directory in ``sources``."""
        try:
            self._create(sources)
        except OSError as exc:   # (a mount's own failure is already a SandboxUnavailableError)
            raise SandboxUnavailableError(f"cannot make the sandbox's /dev and files under {self.run}: {exc}",
                                          "fix: STOCKADE_WORKSPACE=tmpfs (bwrap makes them itself)") from None

    def _create(self, sources: list[str]) -> None:
        _mkdir(self.run, 0o700)
        _mount("stockade", self.run, "tmpfs", MS_NOSUID, f"size={RUN_SIZE},nr_inodes={RUN_INODES},mode=0755")
        # Private: the host's later unmount (detach()) must not propagate to the sandbox's copies, which
        # a shared parent mount (systemd's /) would make slaves of these.
        _mount("none", self.run, "", MS_PRIVATE | MS_REC, "")
        # (after the mount, so mountinfo keeps the mount's own uid 0 and mode: the sandbox's bwrap, as the
        # sandbox's uid, must pass to bind what is here; nobody else on the host may)
        os.chown(self.run, 0, self.owner)
        os.chmod(self.run, 0o710)
        _mkdir(self.dev, 0o755)
        for name, major, minor in DEVICES:
            path = self.dev / name
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)   # (past the umask)
        for name, target in DEV_LINKS:
            os.symlink(target, self.dev / name)
        for name in ("pts", "shm"):
            _mkdir(self.dev / name, 0o755)
        _devpts(self.dev / "pts")
        # nr_inodes too: tmpfs's default is half the host's memory in pages, which statvfs() would tell
        _mount("stockade", self.dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={self.shm_size},nr_inodes={max(1024, self.shm_size // 4096)}")
        _mkdir(self.empty, 0o555)
        _mkdir(self.root, 0o755)
        os.chown(self.root, self.owner, self.owner)  # bwrap makes its mount points here as the sandbox's uid
        _mkdir(self.files, 0o755)
        _mkdir(self.views, 0o755)
        for i, source in enumerate(sources):
            # a mount beneath the source is not in an overlay of it (overlayfs does not cross mounts): binds
            # at or under one are the host's own (through())
            self._beneath[source] = [p for p in workspace.mounts_under(Path(source)) if p != source]
            self._views[source] = str(self._view(str(i), source))

    def _view(self, name: str, source: str) -> Path:
        """A read-only overlay of ``source`` (and the empty directory: overlayfs wants two layers without
        an upper one), its layers named by descriptor: the sandbox reads the options as given."""
        target = self.views / name
        _mkdir(target, 0o755)
        fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            empty = os.open(self.empty, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _mount("stockade", target, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV,
                       f"lowerdir=/proc/self/fd/{fd}:/proc/self/fd/{empty}")
            finally:
                os.close(empty)
        finally:
            os.close(fd)
        return target

    def through(self, path: str) -> str:
        """Where bwrap reads the host's ``path`` (symlinks resolved) from: the same in a view of the
        directory it is in, or the host's own where a mount is at, under or over it."""
        source = max((s for s in self._views if path == s or path.startswith(s.rstrip("/") + "/")), key=len,
                     default=None)
        if source is None:
            return path
        if any(p == path or p.startswith(path.rstrip("/") + "/") or path.startswith(p + "/")
               for p in self._beneath[source]):
            return path
        return self._views[source] + path[len(source.rstrip("/")):]

    def detach(self) -> None:
        """Once bwrap has made the sandbox's mounts: drop the host's (lazily; the sandbox's copies keep the
        filesystems), so a crashed owner leaves no /dev/shm holding memory and teardown has nothing here."""
        for point in workspace.mounts_under(self.run)[-1:]:   # (the shortest: <run> itself, and all below)
            if _libc.umount2(point.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"umount {point}: {os.strerror(err)}")

    def file(self, name: str, content: bytes, mode: int = 0o444) -> str:
        """Write a file the sandbox gets read-only (bound by bwrap); its path here."""
        self._count += 1
        path = self.files / f"{self._count}-{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, self.owner, self.owner)   # the sandbox user's, as bwrap's copies were
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return str(path)

    def dev_args(self) -> list[str]:
        """bwrap's arguments for /dev (its nodes, devpts and /dev/shm come along: one recursive bind)."""
        # (not remounted read-only: bwrap would take devpts and /dev/shm along; /dev is root's, 0755)
        return ["--dev-bind", str(self.dev), "/dev"]


__all__ = ["DEVICES", "HostMounts"]
