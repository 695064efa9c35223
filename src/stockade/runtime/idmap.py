"""Idmapped mounts (Linux >= 5.12; overlayfs takes them as layers from 5.19): a template's layers seen, for
one sandbox, with the image's owners.

As root the store keeps image id N as ``STORE_ID_BASE + N`` (templates/layers.py): no host user and no
sandbox uid owns a file of a shared layer. A sandbox gets its own view of each layer: a clone of the
layer's mount (``open_tree(OPEN_TREE_CLONE)``) given an id mapping (``mount_setattr(MOUNT_ATTR_IDMAP)``)
that shows the image user's files as the sandbox's host uid and the image root's as root, and leaves
every other image id in the store's range. The clones are attached under the sandbox's 0710 overlay
directory only long enough for overlayfs to take them as lower dirs (it keeps private references), then
detached. Nothing on disk changes, and no other sandbox sees the mapping.

An id mapping is a user namespace's: a short-lived child unshares one, the host writes its uid_map and
gid_map (as root, any mapping is allowed), the mount keeps a reference to it, and the child is gone
before the sandbox starts. The syscalls have no wrapper in Python's os module, hence ctypes.

Where the kernel or the store's filesystem cannot (``IdmapUnsupported``), the runtime mounts the layers
as stored: the image's files then show as unmapped ids (nobody) in the sandbox, readable as their modes
allow and writable by no sandbox user, which ``describe()`` reports as ``image_owners``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442   # the same on every architecture
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MNT_DETACH = 2
_CLONE_NEWUSER = 0x10000000


class IdmapUnsupported(OSError):
    """The kernel or the filesystem gives no idmapped mount here."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, *args: object) -> int:
    # syscall(2) is variadic and reads longs: pass every integer as one
    result = int(_libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args)))
    if result < 0:
        err = ctypes.get_errno()
        raise IdmapUnsupported(err, f"{what}: {os.strerror(err)}")
    return result


def id_map(base: int, count: int, special: Mapping[int, int]) -> str:
    """A uid_map/gid_map for layers stored at ``base + N``: image id N in ``special`` shows as special[N],
    every other id of the range as itself. The targets must lie outside the range."""
    lines, start = [], 0
    for image_id in sorted(special):
        if start < image_id:
            lines.append(f"{base + start} {base + start} {image_id - start}")
        lines.append(f"{base + image_id} {special[image_id]} 1")
        start = image_id + 1
    if start < count:
        lines.append(f"{base + start} {base + start} {count - start}")
    return "\n".join(lines) + "\n"


def user_namespace(uid_map: str, gid_map: str) -> int:
    """A descriptor of a new user namespace with these mappings (as root)."""
    unshare = _libc.unshare

    def enter() -> None:
        if unshare(_CLONE_NEWUSER) != 0:
            os._exit(127)

    sleep = shutil.which("sleep") or "/bin/sleep"
    child = subprocess.Popen([sleep, "60"], preexec_fn=enter, stdin=subprocess.DEVNULL,  # noqa: PLW1509
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if child.poll() is not None:
            raise IdmapUnsupported(0, "cannot make a user namespace for an id mapping")
        for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
            fd = os.open(f"/proc/{child.pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())  # one write: the kernel takes a map only whole
            except OSError as exc:
                raise IdmapUnsupported(exc.errno or 0, f"writing the {name}: {exc.strerror}") from None
            finally:
                os.close(fd)
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def idmapped_clone(path: Path, userns_fd: int) -> int:
    """A detached, read-only copy of the mount at ``path`` that shows ids through ``userns_fd``'s mapping."""
    fd = _call("open_tree", _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(path), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    try:
        attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV,
                          userns_fd=userns_fd)
        _call("mount_setattr", _SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
              ctypes.sizeof(attr))
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(mount_fd: int, target: Path) -> None:
    _call("move_mount", _SYS_MOVE_MOUNT, mount_fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)


def detach(target: Path) -> None:
    """Lazily unmount ``target`` (a no-op if nothing is mounted there: EINVAL). Not ``os.path.ismount``,
    which cannot see a bind mount of the directory's own filesystem."""
    _libc.umount2(os.fsencode(target), _MNT_DETACH)


@contextlib.contextmanager
def mapped_layers(layer_dirs: list[Path], where: Path, uid_map: str, gid_map: str) -> Iterator[list[Path]]:
    """The layers, idmapped, attached at ``where/0``, ``where/1``, ... for as long as the block runs (mount
    the overlay in it); detached and removed after it, also on failure."""
    where.mkdir(mode=0o700)
    targets: list[Path] = []
    try:
        userns = user_namespace(uid_map, gid_map)
        try:
            for i, layer in enumerate(layer_dirs):
                fd = idmapped_clone(layer, userns)
                try:
                    target = where / str(i)
                    target.mkdir(mode=0o700)
                    targets.append(target)
                    attach(fd, target)
                finally:
                    os.close(fd)
        finally:
            os.close(userns)
        yield targets
    finally:
        remove(where)


def probe(directory: Path) -> str | None:
    """None if an idmapped mount of ``directory``'s filesystem can be made here (as root), else why not."""
    try:
        userns = user_namespace("0 0 1\n", "0 0 1\n")
        try:
            os.close(idmapped_clone(directory, userns))
        finally:
            os.close(userns)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def remove(where: Path) -> None:
    """Detach and delete what ``mapped_layers`` left at ``where`` (idempotent: the crash sweep calls it)."""
    if not where.is_dir():
        return
    for target in where.iterdir():
        detach(target)
        with contextlib.suppress(OSError):
            target.rmdir()
    with contextlib.suppress(OSError):
        where.rmdir()


__all__ = ["IdmapUnsupported", "id_map", "mapped_layers", "probe", "remove", "user_namespace"]
