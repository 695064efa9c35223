"""A sandbox's writable workspace: /home/user and /tmp on host disk, each an ext4 image of its size.

As root each sandbox gets two sparse ext4 images, one of ``filesystem.workspace_size`` (its /home/user,
and a template sandbox's copy-on-write layer) and one of ``filesystem.tmp_size`` (its /tmp), loop-mounted
by the host (nosuid, nodev, noatime) at ``<state>/workspace/<id>/{disk,tmp}`` before bwrap starts; bwrap
binds their ``home`` and ``tmp`` directories. Writes past an image's size end in ENOSPC (or when its
inodes run out: one per 8 KiB), and the pages are the host's page cache, reclaimable, not a tmpfs
pinned in the sandbox's memory cgroup: a sandbox may fill its whole workspace with a memory limit below it.
/dev/shm stays a tmpfs of ``tmp_size`` (shared memory is memory by nature), charged to the memory cgroup.

The images are made without a mkfs per sandbox: a blank image per size is formatted once
(``<data>/workspaces/blank/``, mkfs.ext4 without a journal, inode tables left uninitialised) and its
data extents (~100 KiB for 1 GiB) are copied into the sandbox's file with copy_file_range. The loop device
is set up with LOOP_CONFIGURE and LO_FLAGS_AUTOCLEAR, and the image's name is unlinked as soon as the
device holds it: the file then lives exactly as long as the loop device, which lives as long as the mount.
Unmounting is the whole teardown (the kernel detaches the device and frees the file), so nothing of the
sandbox's tree is ever walked, and no symlink it planted is ever followed. A process killed at any point
leaves at most the mounts (the sweep unmounts them) or, for a moment during the start, a named image (the
sweep unlinks it). The images are under the data directory, not the state directory: /run is a tmpfs on
most hosts, and an image there would be memory again.

By hand, not with util-linux: ``mount -o loop`` and ``umount`` cost a process each (~3 ms, four per
sandbox) against ~1 ms for the ioctls and mount(2) here; no maintained Python library does loop devices.

Unprivileged (no loop devices, no mount), or with ``STOCKADE_WORKSPACE=tmpfs``, the workspace is what it was:
tmpfs of the same sizes, charged to the memory cgroup (``stockade doctor`` says so).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import SandboxUnavailableError

FORMAT = "ext4-v1"   # the blank images' format: part of their file names, change it with MKFS_OPTIONS
MKFS_OPTIONS = ["-q", "-F", "-b", "4096", "-m", "0", "-i", "8192", "-O", "^has_journal,^resize_inode",
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
MIN_IMAGE = 1 << 20  # mkfs.ext4's smallest 4 KiB-block filesystem is near 256 KiB; a smaller size is raised
MAX_BLANKS = 16      # blank images kept (one per size asked for), the least recently used go first
MOUNT_DATA = b"noinit_itable"  # no background zeroing of inode tables: the image stays sparse

LOOP_CTL_GET_FREE = 0x4C82
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
MS_NOSUID, MS_NODEV, MS_NOATIME = 2, 4, 1024
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Backing:
    """What backs the workspaces of this runtime, and why (for describe() and doctor)."""

    disk: bool
    reason: str   # why the tmpfs fallback is in force ("" when disk)

    @property
    def name(self) -> str:
        return "disk image" if self.disk else "tmpfs"


def mkfs_path() -> str | None:
    return shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")


def choose(privileged: bool, wanted: str) -> Backing:
    """``wanted``: "auto" (disk where it can be had), "disk" (or fail) or "tmpfs"."""
    if wanted == "tmpfs":
        return Backing(False, "STOCKADE_WORKSPACE=tmpfs")
    problem = None
    if not privileged:
        problem = "loop devices and mounts need root"
    elif not os.path.exists("/dev/loop-control"):
        problem = "no /dev/loop-control (the loop module is not loaded, or /dev is not the host's)"
    elif mkfs_path() is None:
        problem = "no mkfs.ext4 (apt-get install e2fsprogs)"
    if problem is None:
        return Backing(True, "")
    if wanted == "disk":
        raise SandboxUnavailableError(f"STOCKADE_WORKSPACE=disk, but {problem}",
                                      "fix: run as root on a host with loop devices, or unset STOCKADE_WORKSPACE")
    return Backing(False, problem)


def tmpfs_args(home: str | None, workspace_size: int, tmp_size: int) -> list[str]:
    """bwrap's arguments for the fallback: /home/user (unless ``home`` is None: a template's root holds
    it) and /tmp as tmpfs of their sizes."""
    args = ["--size", str(tmp_size), "--perms", "1777", "--tmpfs", "/tmp"]
    return args if home is None else [*args, "--size", str(workspace_size), "--perms", "0755", "--tmpfs", home]


def shm_args(tmp_size: int) -> list[str]:
    return ["--size", str(tmp_size), "--perms", "1777", "--tmpfs", "/dev/shm"]


class DiskWorkspace:
    """One sandbox's two images, mounted at ``<state>/workspace/<id>/{disk,tmp}``."""

    def __init__(self, state_dir: Path, data_dir: Path, sandbox_id: str, owner: int, workspace_size: int,
                 tmp_size: int) -> None:
        self.base = state_dir / "workspace" / sandbox_id
        self.images = data_dir / "workspaces"
        self.id = sandbox_id
        self.owner = owner
        self.sizes = {"disk": max(workspace_size, MIN_IMAGE), "tmp": max(tmp_size, MIN_IMAGE)}
        self.disk, self.tmp = self.base / "disk", self.base / "tmp"
        self.home = self.disk / "home"             # bound at /home/user
        self.tmp_dir = self.tmp / "tmp"            # bound at /tmp
        self.upper, self.work = self.disk / "upper", self.disk / "work"   # a template's writable layer

    def create(self, overlay: bool) -> None:
        _private_dir(self.base.parent, 0o711)
        self.base.mkdir(mode=0o711)   # first: the sweep finds the sandbox's mounts by this directory
        _private_dir(self.images, 0o700)
        for name, size in self.sizes.items():
            mount_point = self.base / name
            mount_point.mkdir(mode=0o700)
            _mount_image(self._new_image(name, size), mount_point)
            # the image's root: only root and the sandbox's gid may pass (another sandbox's uid may not)
            os.chown(mount_point, 0, self.owner)
            os.chmod(mount_point, 0o710)
        self.home.mkdir(mode=0o755)
        os.chown(self.home, self.owner, self.owner)
        self.tmp_dir.mkdir()
        os.chown(self.tmp_dir, self.owner, self.owner)  # as bwrap's tmpfs was: the sandbox user's, 1777
        os.chmod(self.tmp_dir, 0o1777)
        if overlay:
            self.upper.mkdir(mode=0o755)
            self.work.mkdir(mode=0o700)

    def _new_image(self, name: str, size: int) -> int:
        """A descriptor of a fresh image of ``size`` whose name is already gone (see the module's docstring)."""
        path = self.images / f"{self.id}-{name}.img"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.unlink(path)   # the descriptor keeps it: nothing to remove later, whatever happens
            field = "filesystem.workspace_size" if name == "disk" else "filesystem.tmp_size"
            try:
                _copy_sparse(_blank(self.images, size), fd, size)
            except OSError as exc:
                raise SandboxUnavailableError(
                    f"cannot make the sandbox's {size}-byte workspace image ({field}) in {self.images}: {exc}",
                    f"fix: free disk space under the data directory, or a smaller {field}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def bwrap_args(self, home: str | None) -> list[str]:
        """/tmp, and /home/user unless ``home`` is None (a template's root holds it)."""
        args = ["--bind", str(self.tmp_dir), "/tmp"]
        return args if home is None else [*args, "--bind", str(self.home), home]

    def remove(self) -> None:
        remove(self.base)
        # The loop devices detach when the last reference to their filesystems goes, at once unless a
        # mount namespace made meanwhile (another sandbox's bwrap, before it drops the host's tree) still
        # holds a copy of the mount: give that a moment, so a stopped sandbox is gone when stop() returns.
        data_dir = self.images.parent
        deadline = time.monotonic() + 2.0
        while loop_devices(data_dir, self.id) and time.monotonic() < deadline:
            time.sleep(0.01)


def _private_dir(path: Path, mode: int) -> None:
    """A directory of root's that nobody else may write (an image or a mount point in one made by another
    uid could be swapped under us)."""
    path.mkdir(mode=mode, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise SandboxUnavailableError(f"{path} is not a directory of root's that only root may write",
                                      "fix: remove it (stockade makes it anew)")


def _blank(images: Path, size: int) -> int:
    """A read-only descriptor of the blank formatted image of ``size``, formatted now if there is none."""
    path = images / "blank" / f"{FORMAT}-{size}.img"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _private_dir(path.parent, 0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            with open(tmp, "xb") as f:
                f.truncate(size)
            result = subprocess.run([mkfs_path() or "mkfs.ext4", *MKFS_OPTIONS, str(tmp)], capture_output=True,
                                    text=True, timeout=60)
            if result.returncode != 0:
                raise SandboxUnavailableError(f"mkfs.ext4 of a {size}-byte workspace image failed: "
                                              f"{(result.stderr or result.stdout).strip()}")
            os.chmod(tmp, 0o400)
            os.rename(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _prune_blanks(path.parent)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        os.utime(fd)   # recently used: pruned last
    return fd


def _prune_blanks(directory: Path) -> None:
    blanks = sorted(directory.glob("*.img"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    for old in blanks[:-MAX_BLANKS]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


def _copy_sparse(src: int, dst: int, size: int) -> None:
    """Copy ``src``'s data extents into ``dst`` (truncated to ``size``); its holes stay holes. Closes ``src``."""
    try:
        os.ftruncate(dst, size)
        offset = 0
        while True:
            try:
                offset = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past offset
                    return
                raise
            end = os.lseek(src, offset, os.SEEK_HOLE)
            while offset < end:
                try:
                    n = os.copy_file_range(src, dst, end - offset, offset, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    n = os.pwrite(dst, os.pread(src, min(end - offset, 1 << 20), offset), offset)
                if n == 0:
                    raise OSError(errno.EIO, "short copy of the blank workspace image")
                offset += n
    finally:
        os.close(src)


def _loop_attach(image_fd: int) -> tuple[int, str]:
    """Attach ``image_fd`` to a free loop device with LO_FLAGS_AUTOCLEAR: (the device's descriptor, its path).
    The device detaches itself when its last user (the mount, or this descriptor) lets go."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(64):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{number}"
            loop_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            # struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt type and key
            # size, flags, file name, crypt name, key, init[2]; struct loop_config: fd, block size, info
            info = struct.pack("=5Q4I64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0)
            try:
                try:
                    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, struct.pack("=II", image_fd, 0) + info + bytes(64))
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOTTY):  # before Linux 5.8: two steps
                        raise
                    fcntl.ioctl(loop_fd, LOOP_SET_FD, image_fd)
                    try:
                        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
                    except OSError:
                        fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
                        raise
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno == errno.EBUSY:  # another process took it first
                    continue
                raise SandboxUnavailableError(f"cannot set up a loop device for the workspace: {exc}",
                                              "fix: STOCKADE_WORKSPACE=tmpfs (a workspace in memory)") from None
            return loop_fd, dev
        raise SandboxUnavailableError("no free loop device for the workspace (64 tries)")
    finally:
        os.close(ctl)


def _mount_image(image_fd: int, mount_point: Path) -> None:
    try:
        loop_fd, dev = _loop_attach(image_fd)
    finally:
        os.close(image_fd)
    try:
        # (the device named by descriptor: mountinfo shows the source as given, and the sandbox reads it)
        if _libc.mount(f"/proc/self/fd/{loop_fd}".encode(), str(mount_point).encode(), b"ext4",
                       MS_NOSUID | MS_NODEV | MS_NOATIME, MOUNT_DATA) != 0:
            err = ctypes.get_errno()
            raise SandboxUnavailableError(f"cannot mount the workspace image {dev} at {mount_point}: "
                                          f"{os.strerror(err)}", "fix: STOCKADE_WORKSPACE=tmpfs (a workspace "
                                          "in memory), or load ext4")
    finally:
        os.close(loop_fd)  # the mount holds the device now; without one, this detaches it


def _umount(path: Path) -> None:
    """Unmount ``path`` (never following a symlink there); a busy mount is detached lazily."""
    target = str(path).encode()
    if _libc.umount2(target, UMOUNT_NOFOLLOW) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(target, UMOUNT_NOFOLLOW | MNT_DETACH) == 0:
        return
    if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mounts_under(base: Path) -> list[str]:
    """The mount points at or under ``base`` in this process's mount namespace, deepest first."""
    prefix = str(base)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove(base: Path) -> None:
    """Unmount one sandbox's images (which detaches their loop devices and frees the files) and remove
    its mount points. Idempotent; walks nothing of the images' trees."""
    if not base.is_dir():
        return
    for point in mounts_under(base):
        _umount(Path(point))
    for name in ("disk", "tmp", "run"):
        with contextlib.suppress(FileNotFoundError):
            (base / name).rmdir()
    with contextlib.suppress(FileNotFoundError):
        base.rmdir()


def loop_devices(data_dir: Path, sandbox_id: str | None = None) -> dict[str, str]:
    """Loop devices backed by workspace images under ``data_dir`` (of one sandbox, or all): device -> file."""
    prefix = f"{data_dir / 'workspaces'}/{sandbox_id + '-' if sandbox_id else ''}"
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/sys/block"):
            if entry.name.startswith("loop"):
                try:
                    backing = Path(entry.path, "loop", "backing_file").read_text().strip()
                except OSError:
                    continue
                if backing.startswith(prefix) and "/blank/" not in backing:
                    found[f"/dev/{entry.name}"] = backing
    return found


MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on (the longest mount point above it in mountinfo)."""
    real = os.path.realpath(path)
    best, found = -1, None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= best and "-" in fields:
                best, found = len(point), fields[fields.index("-") + 1]
    return found


def mounted_devices() -> set[str]:
    """The block devices a filesystem mounted in this process's mount namespace is on, as /dev paths
    (from mountinfo's major:minor: the source field is whatever the mounter named, /proc/self/fd/N here)."""
    numbers = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            with contextlib.suppress(IndexError):
                numbers.add(line.split()[2])
    found = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/sys/block"):
            with contextlib.suppress(OSError):
                if Path(entry.path, "dev").read_text().strip() in numbers:
                    found.add(f"/dev/{entry.name}")
    return found


def autoclears(dev: str) -> bool:
    """Whether a loop device is set to detach itself when its last user goes (LO_FLAGS_AUTOCLEAR)."""
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/autoclear").read_text().strip() == "1"
    except OSError:
        return False


def detach(dev: str) -> bool:
    """Detach a loop device nothing has mounted (LOOP_CLR_FD); whether it was."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def named_images(data_dir: Path) -> list[Path]:
    """Images still under a name: only while a start is between creating and unlinking one, or after a
    start was killed there."""
    directory = data_dir / "workspaces"
    return sorted(directory.glob("*.img")) if directory.is_dir() else []


__all__ = ["Backing", "DiskWorkspace", "autoclears", "choose", "detach", "filesystem_type", "loop_devices",
           "mounted_devices",
           "mounts_under", "named_images", "remove", "shm_args", "tmpfs_args"]
