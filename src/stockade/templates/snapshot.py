"""Snapshots: a template sandbox's filesystem, saved as a new template (its template's layers plus one).

What a template sandbox changed lives in one host directory: its overlay's upper dir (everything it wrote
in its root, /home/user included, in overlayfs's format: whiteouts as 0:0 character devices, opaque
directories by xattr). ``save`` writes it as one layer tar (stockade's own mount points, /opt/stockade,
/proc, /dev, /sys and /tmp, left out) and stores it
through the same checked extraction as any imported image layer (layers.py: bounds, no device nodes,
setuid stripped, owners shifted), on top of the template's layers, with its config. A sandbox from the
snapshot starts with those files; no process, memory or open connection is kept.

The directories belong to a running sandbox, so they are hostile and may change under the walk: they are
read by descriptor (``os.fwalk`` without following symlinks, each file opened O_NOFOLLOW relative to its
directory and checked to be the entry that was listed), so a symlink swapped in never leads the host to
read one of its own files. The snapshot is taken live (as ``docker commit --pause=false``): a file being
written while it is taken may be saved half-written. Owners are written in the image's terms
(``image_ids``): the sandbox's host uid becomes the image user's, root stays root, ids of the store's
range become the image's own again."""

from __future__ import annotations

import os
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import TemplateError
from .layers import OPAQUE_MARKER, WHITEOUT_PREFIX, Limits, check_stack, remove_tree
from .store import Template, TemplateConfig, TemplateStore

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# where stockade mounts its own things in a sandbox: not the sandbox's files
_SKIPPED = ("opt/stockade", "proc", "dev", "sys", "tmp")


@dataclass(frozen=True)
class SnapshotSource:
    """What a runtime hands the core for a snapshot of one of its sandboxes."""

    store: TemplateStore
    template: str                       # the template the sandbox runs from
    upper: Path                         # its overlay's upper dir (/home/user included)
    image_ids: Callable[[int, int], tuple[int, int]]   # host (uid, gid) -> the image's
    # the xattr that marks an opaque directory to the overlay the upper dir belongs to: trusted.* where root
    # mounted it; the user.* one is then an ordinary xattr, which copy-up copies from a lower directory
    opaque_xattr: str = "trusted.overlay.opaque"


def write_layer(out: IO[bytes], source: SnapshotSource, limits: Limits) -> None:
    """The sandbox's changes as one uncompressed layer tar written to ``out``."""
    budget = [limits.max_entries, limits.max_layer_bytes]
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add_tree(tf, source.upper, "", source, budget, skip=_SKIPPED)


def _add_tree(tf: tarfile.TarFile, root: Path, prefix: str, source: SnapshotSource, budget: list[int],
              skip: tuple[str, ...]) -> None:
    hardlinks: dict[tuple[int, int], str] = {}
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        # a directory that cannot be listed fails the snapshot (fwalk would skip it silently)
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False,
                                                          onerror=_unlistable):
            rel = os.path.normpath(dirpath)
            rel = "" if rel == "." else rel
            dirnames[:] = sorted(d for d in dirnames if _join(rel, d) not in skip)
            for name in [*dirnames, *sorted(filenames)]:
                if _join(rel, name) in skip:
                    continue
                _add(tf, dfd, name, _join(prefix, _join(rel, name)), source, budget, hardlinks)
    finally:
        os.close(root_fd)


def _unlistable(exc: OSError) -> None:
    raise TemplateError(f"a directory of the sandbox could not be read ({exc.strerror}): take the snapshot again")


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _add(tf: tarfile.TarFile, dfd: int, name: str, path: str, source: SnapshotSource,
         budget: list[int], hardlinks: dict[tuple[int, int], str]) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return  # deleted since it was listed: not in the snapshot
    budget[0] -= 1
    if budget[0] < 0:
        raise TemplateError("the snapshot has more entries than STOCKADE_TEMPLATE_MAX_ENTRIES allows")
    mode = st.st_mode
    if stat.S_ISCHR(mode) and st.st_rdev == 0:   # overlayfs's whiteout: the file was deleted
        head, _, base = path.rpartition("/")
        tf.addfile(_info(_join(head, WHITEOUT_PREFIX + base), tarfile.REGTYPE, st, source, size=0))
        return
    if stat.S_ISDIR(mode):
        tf.addfile(_info(path, tarfile.DIRTYPE, st, source))
        if _opaque(dfd, name, source.opaque_xattr):
            tf.addfile(_info(f"{path}/{OPAQUE_MARKER}", tarfile.REGTYPE, st, source, size=0))
    elif stat.S_ISLNK(mode):
        info = _info(path, tarfile.SYMTYPE, st, source)
        try:
            info.linkname = os.readlink(name, dir_fd=dfd)
        except OSError:
            raise _changed(path) from None
        tf.addfile(info)
    elif stat.S_ISFIFO(mode):
        tf.addfile(_info(path, tarfile.FIFOTYPE, st, source))
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in hardlinks:
            info = _info(path, tarfile.LNKTYPE, st, source, size=0)
            info.linkname = hardlinks[key]
            tf.addfile(info)
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return
        except OSError:  # ELOOP: a symlink now, which is never opened
            raise _changed(path) from None
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != key or not stat.S_ISREG(now.st_mode):
                raise _changed(path)
            budget[1] -= now.st_size
            if budget[1] < 0:
                raise TemplateError("the snapshot is larger than STOCKADE_TEMPLATE_MAX_LAYER_SIZE allows")
            try:
                tf.addfile(_info(path, tarfile.REGTYPE, now, source, size=now.st_size), f)
            except OSError:   # it shrank under the read
                raise _changed(path) from None
        if st.st_nlink > 1:
            hardlinks[key] = path
    # sockets and device nodes other than whiteouts: nothing a layer may hold (the sandbox cannot make devices)


def _changed(path: str) -> TemplateError:
    return TemplateError(f"/{path} changed while the snapshot was taken: take it again")


def _opaque(dfd: int, name: str, xattr: str) -> bool:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return False
    try:
        return os.getxattr(fd, xattr) == b"y"
    except OSError:
        return False
    finally:
        os.close(fd)


def _info(path: str, kind: bytes, st: os.stat_result, source: SnapshotSource, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = source.image_ids(st.st_uid, st.st_gid)
    info.mtime = int(st.st_mtime)
    info.size = size
    return info


def save(source: SnapshotSource, name: str, label: str, owner: str = "", *,
         config: TemplateConfig | None = None, record_source: str = "") -> Template:
    """Store the sandbox's changes as template ``name``: its template's layers plus one, with its template's
    config (or ``config``). ``label`` names the sandbox in the record's source and in errors; ``owner`` is
    the server tenant only it serves."""
    store = source.store
    base = store.get(source.template)
    if store.exists(name):
        raise TemplateError(f"template {name!r} already exists (remove it first with `stockade template rm {name}`)")
    if len(base.layers) + 1 > store.limits.max_layers:
        raise TemplateError(f"a snapshot of {label} would have more than {store.limits.max_layers} layers "
                            "(STOCKADE_TEMPLATE_MAX_LAYERS)")
    with store.importing():
        work = store.temp_dir("snapshot")
        try:
            tar_path = work / "layer.tar"
            with open(tar_path, "wb") as out:
                write_layer(out, source, store.limits)
            info = store.add_layer_file(tar_path, f"snapshot of {label}")
        finally:
            remove_tree(work)
        layers = [*base.layers, info.diff_id]
        infos = [store.layer_info(d) for d in layers]
        check_stack([str(store.layer_path(d) / "tree") for d in layers], infos,
                    [f"layer {i + 1}/{len(layers)}" for i in range(len(layers))])
        template = Template(name=name, layers=layers, config=config or base.config,
                            source=record_source or f"snapshot of {label} (from template {base.name})",
                            created=time.time(),
                            size=base.size + info.file_bytes, owner=owner)
        store.add_template(template)
    return template


__all__ = ["SnapshotSource", "save", "write_layer"]
