"""A sandbox's root from a template: the template's layers read-only, a copy-on-write layer of its own.

The layers (``TemplateStore().use(name)``, bottom first, already in overlayfs's format) are the lower dirs
of an overlay whose upper and work dirs are the sandbox's own, on disk under ``<state>/overlay/<id>/``
and removed at teardown and by the crash sweep. What a sandbox writes anywhere in its root lands in its
upper dir: no other sandbox of the template, and not the store, ever sees it.

Who mounts the overlay:
- as root, the host mounts it (``mount -t overlay`` at ``<state>/overlay/<id>/root``) before bwrap runs
  and bwrap binds it as /. Two reasons. The layer trees belong to root in a 0700 store, which the
  sandbox's host uid cannot reach, and root opening them is what keeps the store private (rather than
  making the store's directories searchable by every uid). And overlayfs refuses to copy up a file whose
  owner the caller's user namespace does not map (EOVERFLOW, fs/overlayfs/copy_up.c): an overlay mounted
  inside bwrap's user namespace, which maps only the sandbox uid, could not copy up any root-owned file
  of the image, not even a world-writable one. Mounted by root in the host's namespace, copy-up keeps the
  owner and works. The mount points bwrap needs (/proc, /dev, /tmp, /home/user, the generated /etc files,
  /opt/stockade/...) are made in it by root first (in the upper dir), since the image's directories are
  root's and bwrap creates them as the sandbox uid;
- unprivileged, bwrap mounts it (``--overlay-src`` per layer, ``--overlay UPPER WORK /``) inside its user
  namespace, where the store's owner is the sandbox's own uid, so copy-up works there too.

The agent does not use the image's userland: the host's python (binary, its dynamic loader and the shared
libraries it and its extension modules need, copied once per host into ``<state>/hostpython/<key>``) and
its standard library are bound read-only under /opt/stockade/python, and the agent is started through that
loader explicitly (``ld.so --library-path ...``), so an image without python, on musl, or without any C
library runs it. As root the writable layer (upper and work dirs) is on the sandbox's workspace disk image
(``workspace.py``), so what it writes in its root and in /home/user together end in ENOSPC at
``filesystem.workspace_size``, on disk, not in memory; with ``STOCKADE_WORKSPACE=tmpfs`` it is on a tmpfs of
that size of its own (charged to the sandbox's memory cgroup); unprivileged it is on the state dir's disk,
unbounded, which ``describe()`` and ``stockade doctor`` say. Code contexts start the same python through the
same loader (``python_argv``). Not done yet: the ``save-artifact`` command in a template sandbox (its
``#!/usr/bin/python3`` need not exist in the image)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import PolicyError, SandboxUnavailableError, UnenforceableError
from ...templates import (
    LayerInfo,
    Lease,
    ResolvedTemplate,
    TemplateConfig,
    TemplateError,
    TemplateNotFoundError,
    TemplateStore,
)
from ...templates.layers import STORE_ID_BASE, STORE_ID_COUNT, read_visible_link, visible_stat
from ...templates.users import ImageUser, image_user
from .. import idmap
from .rootfs import BIN_DIR, HOME

if TYPE_CHECKING:
    from ...templates.snapshot import SnapshotSource

# A build step (SandboxSpec.build_step) runs as the build's USER as the image means it, root included. As
# root a step gets a block of BUILD_IDS host ids of its own: its user namespace maps each image id to one id
# of the block, the layers are idmapped the same way, and what it writes is owned by those ids on the host,
# which its snapshot turns back into the image's. The block's first id (bwrap's own uid, which bwrap's
# process keeps in the namespace it joins) is the USER's; image id 0 takes the USER's place (_swapped).
# Its root has, over that namespace only, the capabilities package managers use (not CAP_SYS_ADMIN,
# CAP_NET_ADMIN, CAP_MKNOD or CAP_SETFCAP), under the same seccomp filter, cgroups and namespaces as any
# sandbox; the block's host ids own nothing outside the step's own writable layer.
BUILD_IDS = STORE_ID_COUNT
BUILD_ID_RANGE = (1_300_000_000, 1_300_000_000 + 63 * BUILD_IDS)   # 64 blocks: 64 build steps at once
BUILD_ROOT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
                   "CAP_SETUID", "CAP_NET_BIND_SERVICE")

PY_DIR = "/opt/stockade/python"          # PYTHONHOME of the agent in a template sandbox
PY_SO_DIR = f"{PY_DIR}/so"               # the host python binary, its loader and libraries
LOADER = "ld.so"


def lease(store: TemplateStore, name: str) -> Lease:
    """Hold template ``name`` for one sandbox (`template rm` refuses while it is held); unknown: PolicyError."""
    try:
        return store.use(name)
    except TemplateNotFoundError:
        raise PolicyError("template", f"no template named {name!r} on this host (see `stockade template list`)") \
            from None


@cache
def host_python(python_host: str, state_dir: Path) -> tuple[Path, str, str]:
    """(the directory to bind at PY_SO_DIR, the host's stdlib directory, where it goes: PY_DIR/lib/pythonX.Y).

    The directory holds copies of the interpreter, its ELF loader (as ``ld.so``) and every library ``ldd``
    names for it and its extension modules, keyed by their paths and mtimes: one bind instead of one per
    library, and nothing else of the host's /usr."""
    script = ("import sys,sysconfig;print(sysconfig.get_path('stdlib'));print(sysconfig.get_path('platstdlib'));"
              "print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    out = subprocess.run([python_host, "-I", "-c", script], capture_output=True, text=True, timeout=30,
                         check=True).stdout.split()
    stdlib, platstdlib, version = out[0], out[1], out[2]
    if stdlib != platstdlib:
        raise SandboxUnavailableError(f"{python_host}: stdlib {stdlib} and platstdlib {platstdlib} differ",
                                      "fix: set STOCKADE_PYTHON to a python with one library directory")
    dynload = Path(stdlib) / "lib-dynload"
    objects = [os.path.realpath(python_host)] + sorted(str(p) for p in dynload.glob("*.so"))
    libs: dict[str, str] = {}
    loader = ""
    for obj in objects:
        result = subprocess.run(["ldd", obj], capture_output=True, text=True, timeout=30)
        for line in result.stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs[parts[0]] = os.path.realpath(parts[2])
            elif parts and parts[0].startswith("/") and "ld-" in parts[0]:
                loader = os.path.realpath(parts[0])
    if not loader:
        raise SandboxUnavailableError(f"no ELF loader found for {python_host} (ldd)",
                                      "fix: set STOCKADE_PYTHON to a dynamically linked python")
    sources = {"python3": os.path.realpath(python_host), LOADER: loader, **libs}
    key = hashlib.sha256(repr(sorted((k, v, os.stat(v).st_mtime_ns) for k, v in sources.items())).encode())
    out_dir = state_dir / "hostpython" / key.hexdigest()[:20]
    if not (out_dir / "python3").exists():
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o755)
        for name, src in sources.items():
            shutil.copy2(src, tmp / name)
            os.chmod(tmp / name, 0o755)
        os.chmod(tmp.parent, 0o755)
        with contextlib.suppress(OSError):
            os.rename(tmp, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, stdlib, f"{PY_DIR}/lib/python{version}"


# bwrap options whose last argument is a destination in the sandbox, and how many arguments they take
_DEST_OPTS = {"--ro-bind": 2, "--bind": 2, "--dev-bind": 2, "--ro-bind-data": 2, "--bind-data": 2,
              "--ro-bind-fd": 2, "--bind-fd": 2, "--tmpfs": 1, "--proc": 1, "--dev": 1, "--dir": 1,
              "--ro-bind-try": 2, "--bind-try": 2, "--symlink": 2}
_FILE_SOURCES = {"--ro-bind-data", "--bind-data"}


def mount_points(argv: list[str]) -> tuple[list[str], list[str]]:
    """(directories, files) bwrap will mount on, from its argv, outside /proc and /dev (mounted fresh)."""
    dirs: list[str] = []
    files: list[str] = []
    i = 0
    while i < len(argv) and argv[i] != "--":
        opt = argv[i]
        n = _DEST_OPTS.get(opt)
        if n is None:
            i += 1
            continue
        dest = argv[i + n]
        src = argv[i + 1] if n == 2 else ""
        i += n + 1
        if opt == "--symlink" or dest in ("/proc", "/dev") or dest.startswith(("/proc/", "/dev/")):
            if opt in ("--proc", "--dev"):
                dirs.append(dest)
            continue
        if opt in _FILE_SOURCES or (n == 2 and opt not in ("--ro-bind-fd", "--bind-fd")
                                    and src and not os.path.isdir(src)):
            files.append(dest)
        else:
            dirs.append(dest)
    return dirs, files


class OverlayRoot:
    """One sandbox's overlay: ``<state>/overlay/<id>/{upper,work,root}``."""

    def __init__(self, state_dir: Path, sandbox_id: str, layer_dirs: list[Path], owner: int | None,
                 size: int, writable: tuple[Path, Path] | None = None,
                 id_maps: tuple[str, str] | None = None) -> None:
        self.base = state_dir / "overlay" / sandbox_id
        self.size = size             # the writable layer's bound (filesystem.workspace_size), where root mounts
        self.upper, self.work, self.merged = self.base / "upper", self.base / "work", self.base / "root"
        # (upper, work) on the sandbox's workspace disk image, made there by the workspace (as root)
        self.on_disk = writable is not None
        if writable is not None:
            self.upper, self.work = writable
        self.layer_dirs = layer_dirs
        self.owner = owner           # the sandbox's host uid when root mounts (None: bwrap mounts)
        self.id_maps = id_maps       # (uid_map, gid_map) for idmapped layers (``layer_id_maps``), as root
        # how the image's owners show in the sandbox (describe()): mapped, or why not
        self.image_owners = "the store owner's (unprivileged)" if owner is None else "as stored (unmapped)"
        self.mounted = False

    def create(self) -> None:
        (self.base.parent).mkdir(mode=0o711, exist_ok=True)
        self.base.mkdir(mode=0o711)
        if not self.on_disk:
            if self.owner is not None:
                # No disk workspace (STOCKADE_WORKSPACE=tmpfs): the upper and work dirs live on a tmpfs of
                # filesystem.workspace_size, so what the sandbox writes in its root ends in ENOSPC there
                # (charged to its memory cgroup, as its workspace is), never on the host's disk or its /run.
                _mount(["-t", "tmpfs", "-o", f"size={self.size},mode=0711,nosuid,nodev", "tmpfs", str(self.base)],
                       "cannot mount the template sandbox's writable layer")
            for d in (self.upper, self.work):
                d.mkdir(mode=0o755)
        if self.owner is not None:
            # only root and the sandbox's gid (bwrap runs as its uid) pass: no other host user reaches its root
            os.chown(self.base, 0, self.owner)
            os.chmod(self.base, 0o710)
            self.merged.mkdir(mode=0o755)
            # The directories are named by descriptor (/proc/self/fd/N, resolved by the kernel at the mount):
            # overlayfs shows its options as given, and the sandbox reads them in its mountinfo, where the
            # host's paths (the data directory, sandbox ids) have no business.
            with contextlib.ExitStack() as stack:
                layers = self.layer_dirs
                if self.id_maps is not None:
                    try:
                        layers = stack.enter_context(idmap.mapped_layers(self.layer_dirs, self.base / "lower",
                                                                         *self.id_maps))
                        self.image_owners = "mapped (idmapped layers)"
                    except idmap.IdmapUnsupported as exc:
                        self.image_owners = f"as stored (unmapped): no idmapped mount here ({exc.strerror})"
                dirs = [*reversed(layers), self.upper, self.work]  # the kernel wants the top layer first
                fds = [os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for d in dirs]
                try:
                    names = [f"/proc/self/fd/{fd}" for fd in fds]
                    opts = f"lowerdir={':'.join(names[:-2])},upperdir={names[-2]},workdir={names[-1]}"
                    _mount(["-t", "overlay", "stockade", "-o", opts, str(self.merged)],
                           "cannot mount the template's overlay", pass_fds=fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            self.mounted = True
            # The root of the overlay is the upper dir: the sandbox may create top-level entries in it,
            # as in a container's root (the image's own directories keep their owners and modes).
            os.chown(self.merged, self.owner, self.owner)

    def bwrap_args(self) -> list[str]:
        if self.owner is not None:
            return ["--bind", str(self.merged), "/"]
        args: list[str] = []
        for d in self.layer_dirs:
            args += ["--overlay-src", str(d)]
        return [*args, "--overlay", str(self.upper), str(self.work), "/"]

    def prepare(self, argv: list[str]) -> None:
        """As root: make bwrap's mount points in the merged root (they land in the upper dir). Each path is
        walked from the root's descriptor without following any symlink: the image's symlinks (``/home ->
        /``) must never lead root to create anything on the host. A path that meets a symlink is left to
        bwrap, which runs as the sandbox's uid."""
        if self.owner is None:
            return
        dirs, files = mount_points(argv)
        root_fd = os.open(self.merged, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for path in dirs:
                make_at(root_fd, path, directory=True)
            for path in files:
                make_at(root_fd, path, directory=False)
        finally:
            os.close(root_fd)
        self.give_home()

    def give_home(self) -> None:
        """As root: /home/user is part of the root (its writes land in the writable layer, on the workspace's
        image): make it, and make it the sandbox user's, following no symlink of the image."""
        if self.owner is None:
            return
        root_fd = os.open(self.merged, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            make_at(root_fd, HOME, directory=True)
            fd = os.dup(root_fd)
            try:
                for part in HOME.strip("/").split("/"):
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.close(fd)
                    fd = nxt
                os.fchown(fd, self.owner, self.owner)
            except OSError:
                pass  # a symlink on the way (the image's /home -> /): the sandbox's own business, inside it
            finally:
                os.close(fd)
        finally:
            os.close(root_fd)

    def remove(self) -> None:
        remove(self.base)


def make_at(root_fd: int, path: str, directory: bool) -> None:
    """Create ``path`` (relative to ``root_fd``) and its parents, following no symlink; stop quietly at one."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if last and not directory:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o644, dir_fd=fd))
                    return
                os.mkdir(name, 0o755, dir_fd=fd)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if last or not stat.S_ISDIR(st.st_mode):
                return  # present (or a symlink or file in the way: bwrap, as the sandbox uid, deals with it)
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def _mount(args: list[str], what: str, pass_fds: Sequence[int] = ()) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, pass_fds=pass_fds)
    if result.returncode != 0:
        raise SandboxUnavailableError(f"{what}: {result.stderr.strip()}")


def remove(base: Path) -> None:
    """Unmount and delete one sandbox's overlay directory (idempotent): the overlay, then (as root, with a
    tmpfs workspace) the tmpfs its writable layer is on, which takes the sandbox's writes with it. With a
    disk workspace the writable layer is on the sandbox's image, which the workspace's removal frees, and
    only the empty mount point is left here; run this first (the overlay keeps the image busy)."""
    idmap.remove(base / "lower")  # idmapped layers a crash left attached (they live only during the mount)
    for mount_point in (base / "root", base):
        if os.path.ismount(mount_point):
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)
    if base.exists():
        _rmtree(base)


def _rmtree(path: Path) -> None:
    # Overlay's work dir holds a 0000 "work" directory as root; the upper may hold whiteouts (char devices)
    # and directories the sandbox made unwritable: make each writable before removing it.
    def onerror(func: object, p: str, exc: object) -> None:
        # chmod follows symlinks and the tree is the sandbox's: never chmod through one
        with contextlib.suppress(OSError):
            if not os.path.islink(os.path.dirname(p)) and not os.path.islink(p):
                os.chmod(os.path.dirname(p), 0o700)
                os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
    shutil.rmtree(path, onerror=onerror)  # noqa: B026 - onerror is 3.11's name
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def layer_id_maps(infos: Sequence[LayerInfo], user: ImageUser, host_uid: int, host_gid: int
                  ) -> tuple[str, str] | None:
    """The (uid_map, gid_map) that shows a shifted store's layers (templates/layers.py) with the image's
    owners: its root as root, its user (``user``) as the sandbox's host ids; None if a layer is not shifted
    (unprivileged stores)."""
    if not infos or any(info.id_base != STORE_ID_BASE for info in infos):
        return None
    gids = {0: 0, user.gid: host_gid}  # a user whose group is the image's 0 gets that group
    return (idmap.id_map(STORE_ID_BASE, STORE_ID_COUNT, {0: 0, user.uid: host_uid}),
            idmap.id_map(STORE_ID_BASE, STORE_ID_COUNT, gids))


def _swapped(inside: int, outside: int, user: int) -> str:
    """An id map of BUILD_IDS ids: ``inside`` + N to ``outside`` + N, but for ``user`` and 0, swapped."""
    if user == 0:
        return f"{inside} {outside} {BUILD_IDS}\n"
    lines = [f"{inside} {outside + user} 1", f"{inside + user} {outside} 1"]
    if user > 1:
        lines.append(f"{inside + 1} {outside + 1} {user - 1}")
    if user < BUILD_IDS - 1:
        lines.append(f"{inside + user + 1} {outside + user + 1} {BUILD_IDS - user - 1}")
    return "\n".join(lines) + "\n"


def build_id_maps(infos: Sequence[LayerInfo], block: int, user: ImageUser) -> tuple[str, str] | None:
    """A build step's view of the layers (stored as STORE_ID_BASE + image id): each image id as its id of
    the block (``block_ids`` inverts it)."""
    if not infos or any(info.id_base != STORE_ID_BASE for info in infos):
        return None
    return _swapped(STORE_ID_BASE, block, user.uid), _swapped(STORE_ID_BASE, block, user.gid)


def write_build_maps(pid: int, block: int, user: ImageUser) -> None:
    """The uid and gid maps of a build step's user namespace (bwrap waits for them: --userns-block-fd)."""
    for name, own in (("uid_map", user.uid), ("gid_map", user.gid)):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, _swapped(0, block, own).encode())
        finally:
            os.close(fd)


def build_user(resolved: ResolvedTemplate) -> ImageUser:
    """A build step's user: the template's USER as the image means it (root by default, as in a
    Dockerfile), ids below BUILD_IDS. Its /etc/passwd and /etc/group are the image's own files, writable
    by its root (``useradd`` in a step): the runtime places none over them."""
    try:
        return image_user(resolved, keep_root=True)
    except TemplateError as exc:
        raise PolicyError("template", str(exc)) from None


def image_ids(host_uid: int, host_gid: int, user: ImageUser) -> Callable[[int, int], tuple[int, int]]:
    """For a snapshot: the image's (uid, gid) of a file the sandbox's root holds on the host. The sandbox's
    host ids are the image user's, the store's range is the image's own ids, root is root, and anything
    else (only the sandbox could have made it) is nobody."""
    def one(host: int, mine: int, image: int) -> int:
        if host == mine:
            return image
        if host == 0 or STORE_ID_BASE <= host < STORE_ID_BASE + STORE_ID_COUNT:
            return host - STORE_ID_BASE if host else 0
        return 65534

    return lambda uid, gid: (one(uid, host_uid, user.uid), one(gid, host_gid, user.gid))


def block_ids(block: int, user: ImageUser) -> Callable[[int, int], tuple[int, int]]:
    """For a build step's snapshot: the image's (uid, gid) of a file its block of ids owns."""
    def one(host: int, own: int) -> int:
        if not block <= host < block + BUILD_IDS:
            return 65534
        n = host - block
        return own if n == 0 else 0 if n == own else n

    return lambda uid, gid: (one(uid, user.uid), one(gid, user.gid))


def snapshot_source(store: TemplateStore, overlay: OverlayRoot | None, lease: Lease | None,
                    user: ImageUser | None, host_ids: tuple[int, int], block: int | None = None) -> SnapshotSource:
    """What a snapshot of a template sandbox saves; why not, for any other. ``block``: a build step's."""
    if overlay is None or lease is None or user is None:
        raise PolicyError("template", "only a sandbox started from a template can be snapshotted (a sandbox "
                          "without one runs on the host's read-only system files): create it with template=NAME")
    if overlay.owner is None:
        raise UnenforceableError("an unprivileged template sandbox's /home/user is a tmpfs in its own mount "
                                      "namespace, which the host cannot read: no snapshot",
                                      "fix: run stockade as root to snapshot sandboxes")
    from ...templates.snapshot import SnapshotSource

    ids = block_ids(block, user) if block is not None else image_ids(*host_ids, user)
    return SnapshotSource(store, lease.resolved.template.name, overlay.upper, ids)


def sandbox_user(resolved: ResolvedTemplate, files: dict[str, bytes], build_step: bool = False) -> ImageUser:
    """The template's user (templates/users.py); puts the image's /etc/passwd and /etc/group into
    ``files`` (unless the caller placed their own). An unknown user is a PolicyError on ``template``. A build
    step (where the runtime gives it no block of ids) must not be the image's root: it would run as uid 1000."""
    try:
        user = image_user(resolved, keep_root=build_step)
    except TemplateError as exc:
        raise PolicyError("template", str(exc)) from None
    if user.uid == 0:   # (only a build step's is)
        raise UnenforceableError(
            "a build step as the image's root needs the jail runtime run as root (it maps the step a "
            "private block of host ids)",
            "fix: build as root with --runtime jail, or set USER to a non-root user before this RUN")
    files.setdefault("/etc/passwd", user.passwd.encode())
    files.setdefault("/etc/group", user.group.encode())
    return user


def apply_image_config(config: TemplateConfig, env: dict[str, str], user: ImageUser | None = None) -> str:
    """Put the image's environment into ``env`` (its PATH, then stockade's tools); its working directory."""
    if user is not None:
        env["USER"] = env["LOGNAME"] = user.name
    env.update(config.env)
    if "PATH" in config.env:
        env["PATH"] = f"{config.env['PATH']}:{BIN_DIR}"
    return config.working_dir


def image_python(resolved: ResolvedTemplate) -> str | None:
    """The image's own python3 when it can import IPython (from its system packages, or the sandbox user's
    ~/.local): code contexts then run there, so what the template installed (numpy, a user's pip install)
    is importable in ``run_code``. None: the host's python runs them (stdlib backend)."""
    trees, infos = [str(d) for d in resolved.layer_dirs], resolved.layer_infos
    for exe in ("usr/local/bin/python3", "usr/bin/python3"):
        parts = exe.split("/")
        st = visible_stat(trees, infos, parts)
        if st is None:
            continue
        target = read_visible_link(trees, infos, parts) if stat.S_ISLNK(st.st_mode) else "python3"
        version = target.rsplit("/", 1)[-1].removeprefix("python")          # "3.11" (or "3": unknown)
        prefix = "usr/local" if exe.startswith("usr/local") else "usr"
        places = [f"{prefix}/lib/python{version}/site-packages", f"{prefix}/lib/python{version}/dist-packages",
                  f"{HOME.lstrip('/')}/.local/lib/python{version}/site-packages"]
        if prefix == "usr":   # Debian's: packages of every python3 in one place, pip's under /usr/local
            places += ["usr/lib/python3/dist-packages", f"usr/local/lib/python{version}/dist-packages"]
        for place in places:
            found = visible_stat(trees, infos, [*place.split("/"), "IPython", "__init__.py"])
            if found is not None and stat.S_ISREG(found.st_mode):
                return f"/{exe}"
    return None


def python_argv(so_dir_inside: str) -> list[str]:
    """The host python in a template sandbox, started through its own loader (the image need not have the
    ELF interpreter its binary names). It finds its stdlib from argv[0], which the loader passes on. Code
    that starts ``sys.executable`` directly still needs that interpreter in the image."""
    return [f"{so_dir_inside}/{LOADER}", "--library-path", so_dir_inside, f"{so_dir_inside}/python3"]


def agent_argv(so_dir_inside: str, agent_zip: str, channel_fd: int) -> list[str]:
    """The agent's command line in a template sandbox."""
    return [*python_argv(so_dir_inside), "-s", "-S", "-B", agent_zip, str(channel_fd)]


__all__ = ["PY_DIR", "PY_SO_DIR", "OverlayRoot", "agent_argv", "apply_image_config", "host_python",
           "image_ids", "layer_id_maps", "lease", "make_at", "mount_points", "python_argv", "remove", "sandbox_user",
           "snapshot_source"]
