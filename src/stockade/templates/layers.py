"""Applying one image layer (a tar, uncompressed, gzip or zstd) to its own directory tree, checking every
entry; and reading a stack of such trees the way overlayfs will.

Each layer is extracted on its own into an empty directory, in overlayfs's format, so that the runtime can
mount the trees of a template as the lower layers of an overlay:
- a whiteout (``dir/.wh.NAME``) becomes a character device 0:0 named NAME (what overlayfs reads as a
  whiteout; Linux >= 5.8 lets an unprivileged process create exactly that device);
- an opaque directory (``dir/.wh..wh..opq``) gets the xattr ``user.overlay.opaque=y`` (and
  ``trusted.overlay.opaque=y`` as root), for overlay mounts with and without ``userxattr``;
- both are also listed in the layer's record (``LayerInfo``), so a runtime without overlayfs can
  flatten a stack with ``materialize`` instead.

Why not ``tarfile``'s ``filter='data'`` (Python 3.11.4+; this is 3.11.7)? It does part of this: it
refuses ``..`` escapes, links pointing outside, device nodes and FIFOs, strips setuid/setgid and the
owners. But it does not fit a root filesystem: it refuses every absolute symlink (images are full of
legitimate ones such as ``/etc/alternatives/x -> /usr/bin/x``, resolved inside the sandbox's root), it
rewrites absolute member names instead of refusing them, its escape check resolves symlinks through the
host's filesystem (``os.path.realpath``) before extracting by path, it knows no whiteouts or opaque
directories, no bounds on sizes or entry counts, and no overlay format. So extraction is written here,
openat-style: every path is walked one component at a time from the layer root's descriptor with
``O_NOFOLLOW|O_DIRECTORY``, so no symlink is ever followed, whatever the layer planted before; tarfile is
used only to parse the stream.

What is checked, per entry (a failure refuses the whole layer, naming the entry and why):
- names: no absolute path, no ``..`` component, at most ``max_path_bytes``;
- no entry is written through a symlink, neither one of this layer nor (``check_stack``) one of a lower
  layer of the same template: a parent that is a symlink is refused, never followed;
- hard links: only to a regular file that an earlier entry of the same layer created;
- device nodes (block and character, 0:0 included) are refused: a template's files are mounted into
  sandboxes, and a device node there would be a door to a host device. FIFOs are kept: a FIFO means
  nothing outside the sandbox, and extraction never opens one;
- setuid and setgid bits are stripped (sticky kept on directories, as /tmp needs it); xattrs and file
  capabilities in the tar (PAX ``SCHILY.xattr.*``) are not applied;
- owners: no image can hand a file in a shared layer to a host user or to a sandbox's uid. As root
  (``shift_owners``, run by the store once a layer is extracted) each file belongs to the image's uid:gid
  shifted into a range of ids reserved for the store (``STORE_ID_BASE`` + id; ids beyond 65535 become
  the range's nobody), which no host user and no sandbox uid is, and which only the store's 0700
  directory leads to; a runtime maps that range back to the image's ids per sandbox (idmapped mounts,
  ``runtime/idmap.py``). Unprivileged every file is the store owner's (nothing else is possible). The
  image's own uid:gid are kept in the layer's record (``owners``) either way;
- bounds (``Limits``, from STOCKADE_TEMPLATE_* variables): bytes of the uncompressed stream per layer
  (a gzip or zstd bomb stops there) and bytes its files add up to (sparse entries are small in the
  stream), bytes per entry, entries per layer, bytes of tar headers per entry, directory depth.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from .errors import LayerError, TemplateError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Bounds on what one import may write. Defaults fit real images with room to spare."""

    max_layer_bytes: int = 16 * GiB     # the uncompressed tar stream of one layer
    max_entry_bytes: int = 8 * GiB      # one file
    max_entries: int = 1_000_000        # tar entries of one layer
    max_image_bytes: int = 32 * GiB     # all layers of one image, uncompressed
    max_layers: int = 127
    max_path_bytes: int = 4096
    max_depth: int = 256                # path components (the store's tree walks are recursive)
    max_header_bytes: int = 8 << 20     # tar headers (PAX, GNU long names) before one entry

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Limits:
        """STOCKADE_TEMPLATE_MAX_LAYER_SIZE, _MAX_ENTRY_SIZE, _MAX_IMAGE_SIZE (sizes such as 2GiB),
        STOCKADE_TEMPLATE_MAX_ENTRIES, _MAX_LAYERS (counts)."""
        from ..policy import parse_size

        env = dict(os.environ if env is None else env)
        values: dict[str, int] = {}
        for var, attr, size in (("MAX_LAYER_SIZE", "max_layer_bytes", True),
                                ("MAX_ENTRY_SIZE", "max_entry_bytes", True),
                                ("MAX_IMAGE_SIZE", "max_image_bytes", True),
                                ("MAX_ENTRIES", "max_entries", False),
                                ("MAX_LAYERS", "max_layers", False)):
            text = env.get(f"STOCKADE_TEMPLATE_{var}")
            if not text:
                continue
            try:
                values[attr] = parse_size(text) if size else int(text)
            except ValueError as exc:
                raise TemplateError(f"STOCKADE_TEMPLATE_{var}={text!r}: {exc}") from None
            if values[attr] <= 0:
                raise TemplateError(f"STOCKADE_TEMPLATE_{var}={text!r}: must be positive")
        return cls(**values)


# As root, the store keeps image id N as STORE_ID_BASE + N (owners above): below the sandboxes' uid range
# (runtime/jail/config.py), and far above any distribution's user and system ids.
STORE_ID_BASE = 1_100_000_000
STORE_ID_COUNT = 65536
_STORE_NOBODY = 65534


def store_id(image_id: int) -> int:
    """Where image uid or gid ``image_id`` is kept in the store (as root)."""
    return STORE_ID_BASE + (image_id if 0 <= image_id < STORE_ID_COUNT else _STORE_NOBODY)


@dataclass
class LayerInfo:
    """What extraction found; stored beside the tree as layer.json."""

    diff_id: str                 # sha256 of the uncompressed tar stream, verified
    size: int = 0                # bytes of the uncompressed stream
    entries: int = 0
    file_bytes: int = 0
    whiteouts: list[str] = field(default_factory=list)      # paths hidden in lower layers
    opaque_dirs: list[str] = field(default_factory=list)    # directories whose lower contents are hidden
    implicit_dirs: list[str] = field(default_factory=list)  # parents created without a tar entry
    owners: dict[str, list[int]] = field(default_factory=dict)  # path -> image [uid, gid], when not 0:0
    stripped: list[str] = field(default_factory=list)       # paths whose setuid/setgid bit was cleared
    opaque_xattrs: list[str] = field(default_factory=list)  # which opaque xattrs could be set
    id_base: int | None = None   # files belong to id_base + their image ids (shift_owners); None: the store owner's

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerInfo:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class _Refused(Exception):
    """An entry is refused; becomes a LayerError with the layer's name."""

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason


class _Reader:
    """The uncompressed stream under tarfile: hashes and counts it, bounds the total and the bytes tarfile
    reads for headers (a PAX header of gigabytes would otherwise be read into memory by tarfile)."""

    def __init__(self, raw: Any, limits: Limits) -> None:
        self.raw = raw
        self.limits = limits
        self.hash = hashlib.sha256()
        self.total = 0
        self.in_data = False
        self.header_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n if n >= 0 else _CHUNK)
        self.total += len(data)
        if self.total > self.limits.max_layer_bytes:
            raise _Refused("", f"the uncompressed layer is larger than {self.limits.max_layer_bytes} bytes "
                               "(STOCKADE_TEMPLATE_MAX_LAYER_SIZE)")
        if not self.in_data:
            self.header_bytes += len(data)
            if self.header_bytes > self.limits.max_header_bytes + 2 * tarfile.RECORDSIZE:
                raise _Refused("", f"tar headers (or data of a non-file entry) larger than "
                                   f"{self.limits.max_header_bytes} bytes")
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _Hashing:
    """The compressed blob as read: its sha256 and size, checked against the descriptor afterwards."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0
        self.pending = b""

    def head(self, n: int) -> bytes:
        while len(self.pending) < n:
            more = self.raw.read(n - len(self.pending))
            if not more:
                break
            self.pending += more
        return self.pending[:n]

    def read(self, n: int = -1) -> bytes:
        if self.pending:
            data, self.pending = (self.pending, b"") if n < 0 or n >= len(self.pending) else \
                (self.pending[:n], self.pending[n:])
        else:
            data = self.raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _decompressor(raw: _Hashing) -> Any:
    """gzip, zstd (the zstandard package) or plain tar, by the stream's first bytes (descriptors' media
    types lie about compression often enough that the bytes are what counts)."""
    head = raw.head(4)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=cast(Any, raw), mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a runtime dependency
            raise _Refused("", "the layer is zstd-compressed and the zstandard package is not installed") \
                from None
        return zstandard.ZstdDecompressor().stream_reader(cast(Any, raw), read_across_frames=True)
    return raw


def _path(name: str, limits: Limits, entry: str, what: str = "path") -> list[str]:
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        raise _Refused(entry, f"{what} longer than {limits.max_path_bytes} bytes")
    if name.startswith("/"):
        raise _Refused(entry, f"absolute {what} (a layer's paths are relative to its root)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(entry, f"'..' in the {what}: it would leave the layer's root")
    if len(parts) > limits.max_depth:
        raise _Refused(entry, f"{what} deeper than {limits.max_depth} directories")
    return parts


class _Tree:
    """A layer's directory, written only through descriptors: no path is ever resolved by the kernel
    across a symlink (each component is opened with O_NOFOLLOW)."""

    def __init__(self, root: str) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._cache: tuple[tuple[str, ...], int] | None = None
        self.implicit: list[str] = []
        self.explicit_dirs: set[tuple[str, ...]] = set()
        self.whiteouts: set[tuple[str, ...]] = set()  # whiteout devices this layer created

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def parent(self, parts: list[str], entry: str, create: bool = True) -> int:
        """A descriptor of the directory ``parts`` (not to be closed by the caller)."""
        key = tuple(parts)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._drop_cache()
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _Refused(entry, f"{'/'.join(parts[:i + 1])!r} does not exist in this layer") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self.implicit.append("/".join(parts[:i + 1]))
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    so_far = "/".join(parts[:i + 1])
                    if create and tuple(parts[:i + 1]) in self.whiteouts:
                        # this layer whited out the name, then put entries below it: its own entries win
                        os.unlink(part, dir_fd=fd)
                        self.whiteouts.discard(tuple(parts[:i + 1]))
                        os.mkdir(part, 0o755, dir_fd=fd)
                        self.implicit.append(so_far)
                        nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = nxt
                        continue
                    if stat.S_ISLNK(st.st_mode):
                        raise _Refused(entry, f"its parent {so_far!r} is a symlink: a layer may not write "
                                              "through a symlink") from None
                    raise _Refused(entry, f"its parent {so_far!r} is not a directory ({exc.strerror})") from None
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self._cache = (key, fd)
        return fd

    def clear(self, pfd: int, name: str, keep_dir: bool = False) -> str | None:
        """Remove what is at ``name`` (a later entry replaces an earlier one). Returns the kind that was
        kept, if any."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return "dir"
            _rmtree_at(pfd, name)  # pfd (the cached parent) stays valid: only a child goes
        else:
            os.unlink(name, dir_fd=pfd)
        return None


def shift_owners(tree: str | os.PathLike[str], info: LayerInfo) -> None:
    """As root: give every entry of a layer tree its image owner shifted into the store's range (see the
    module's docstring), never following a symlink; records it in ``info.id_base``. Idempotent."""
    root = os.open(tree, _DIR_FLAGS)
    try:
        os.chown(root, store_id(0), store_id(0))
        for dirpath, dirnames, filenames, dfd in os.fwalk(dir_fd=root, follow_symlinks=False):
            rel = os.path.relpath(dirpath, ".")
            prefix = "" if rel == "." else rel + "/"
            for name in (*dirnames, *filenames):
                uid, gid = info.owners.get(prefix + name, (0, 0))
                os.chown(name, store_id(uid), store_id(gid), dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(root)
    info.id_base = STORE_ID_BASE


def _rmtree_at(dir_fd: int, name: str) -> None:
    """Remove a tree without following symlinks (shutil.rmtree's fd-based walk), also where the image made
    a directory unwritable or unsearchable for a non-root owner."""
    _make_writable(dir_fd, name)
    shutil.rmtree(name, dir_fd=dir_fd)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a layer tree or a temporary directory, whatever modes the image gave its directories."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    parent = os.open(os.path.dirname(os.path.abspath(path)), _DIR_FLAGS)
    try:
        _make_writable(parent, os.path.basename(path))
        shutil.rmtree(os.path.basename(path), dir_fd=parent)
    finally:
        os.close(parent)


def _make_writable(pfd: int, name: str) -> None:
    """Give every directory below (not following symlinks) u+rwx, so a non-root owner can empty it."""
    if os.geteuid() == 0:
        return
    try:
        os.chmod(name, 0o700, dir_fd=pfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    except OSError:
        return
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                _make_writable(fd, entry.name)
    finally:
        os.close(fd)


def extract_layer(blob: IO[bytes], dest: str | os.PathLike[str], *, label: str, limits: Limits,
                  diff_id: str | None = None, digest: str | None = None, blob_size: int | None = None,
                  progress: Callable[[int], None] | None = None) -> LayerInfo:
    """Apply the layer ``blob`` (compressed or not) to the empty directory ``dest``. ``label`` names the
    layer in errors ("layer 2/3 (sha256:...)"). ``diff_id`` (sha256 of the uncompressed tar) and
    ``digest``/``blob_size`` (of the blob as stored) are verified when given: a mismatch refuses the layer.
    On error ``dest`` may hold a partial tree: the caller removes it (it lies inside the store)."""
    raw = _Hashing(blob)
    try:
        stream = _decompressor(raw)
        reader = _Reader(stream, limits)
        info = _extract(reader, os.fspath(dest), limits, progress)
        reader.drain()
        raw.drain()
    except _Refused as exc:
        raise LayerError(label, exc.entry, exc.reason) from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
        raise LayerError(label, "", f"not a valid (compressed) tar stream: {exc}") from None
    except Exception as exc:  # zstandard.ZstdError has no common base with the above
        if type(exc).__name__ == "ZstdError":
            raise LayerError(label, "", f"not a valid zstd stream: {exc}") from None
        raise
    actual = "sha256:" + reader.hash.hexdigest()
    if digest is not None:
        got = "sha256:" + raw.hash.hexdigest()
        if got != digest:
            raise LayerError(label, "", f"the blob has digest {got}, not the manifest's {digest}")
        if blob_size is not None and raw.size != blob_size:
            raise LayerError(label, "", f"the blob has {raw.size} bytes, not the manifest's {blob_size}")
    if diff_id is not None and actual != diff_id:
        raise LayerError(label, "", f"the uncompressed content has digest {actual}, not the image config's "
                                    f"diff_id {diff_id}")
    info.diff_id = actual
    info.size = reader.total
    return info


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)


def _extract(reader: _Reader, dest: str, limits: Limits, progress: Callable[[int], None] | None) -> LayerInfo:
    info = LayerInfo(diff_id="")
    tree = _Tree(dest)
    whiteouts = tree.whiteouts
    opaque: set[tuple[str, ...]] = set()
    dir_meta: dict[tuple[str, ...], tuple[int, float]] = {}
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
            for member in tf:
                reader.header_bytes = 0
                info.entries += 1
                try:
                    _entry(tf, member, tree, info, limits, reader, opaque, dir_meta, progress)
                except gzip.BadGzipFile:
                    raise
                except OSError as exc:
                    raise _Refused(member.name, f"cannot be written: {exc.strerror or exc}") from None
        _finish(tree, info, opaque, dir_meta)
    finally:
        tree.close()
    info.whiteouts = sorted("/".join(k) for k in whiteouts)
    info.opaque_dirs = sorted("/".join(k) for k in opaque)
    info.implicit_dirs = sorted(p for p in tree.implicit if tuple(p.split("/")) not in tree.explicit_dirs)
    return info


def _entry(tf: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree, info: LayerInfo, limits: Limits,
           reader: _Reader, opaque: set[tuple[str, ...]], dir_meta: dict[tuple[str, ...], tuple[int, float]],
           progress: Callable[[int], None] | None) -> None:
    whiteouts = tree.whiteouts
    name = member.name
    if info.entries > limits.max_entries:
        raise _Refused(name, f"more than {limits.max_entries} entries in one layer "
                             "(STOCKADE_TEMPLATE_MAX_ENTRIES)")
    parts = _path(name, limits, name)
    if not parts:
        if member.isdir():
            return  # the layer root itself: its mode is the store's
        raise _Refused(name, "a non-directory entry for the layer's root")
    base = parts[-1]
    if base.startswith(WHITEOUT_PREFIX):
        _whiteout(tree, parts, name, info, whiteouts, opaque)
        return
    kind = member.type
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        what = "character" if kind == tarfile.CHRTYPE else "block"
        raise _Refused(name, f"{what} device {member.devmajor}:{member.devminor}: device nodes are "
                             "refused (a template's files are mounted into sandboxes)")
    if kind not in (*_REGULAR, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE):
        raise _Refused(name, f"unsupported tar entry type {kind!r}")
    if member.size > limits.max_entry_bytes:
        raise _Refused(name, f"{member.size} bytes: larger than {limits.max_entry_bytes} bytes "
                             "(STOCKADE_TEMPLATE_MAX_ENTRY_SIZE)")
    pfd = tree.parent(parts[:-1], name)
    key = tuple(parts)
    if key in whiteouts:       # this layer's own entry wins over its whiteout of the same name
        whiteouts.discard(key)
    mode = member.mode & 0o7777
    if mode & 0o6000 and kind != tarfile.DIRTYPE:
        info.stripped.append("/".join(parts))
    if member.uid or member.gid:
        info.owners["/".join(parts)] = [member.uid, member.gid]
    if kind == tarfile.DIRTYPE:
        if tree.clear(pfd, base, keep_dir=True) is None:
            os.mkdir(base, 0o700, dir_fd=pfd)
        tree.explicit_dirs.add(key)
        if mode & 0o6000:
            info.stripped.append("/".join(parts))
        dir_meta[key] = (mode & 0o1777, member.mtime)
    elif kind in _REGULAR:
        tree.clear(pfd, base)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=pfd)
        with os.fdopen(fd, "wb") as out:
            src = tf.extractfile(member)
            if src is not None:
                reader.in_data = True
                written = 0
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    if info.file_bytes + written > limits.max_layer_bytes:  # sparse entries are small in the stream
                        raise _Refused(name, f"the layer's files add up to more than {limits.max_layer_bytes} "
                                             "bytes (STOCKADE_TEMPLATE_MAX_LAYER_SIZE)")
                    if progress:
                        progress(len(chunk))
                reader.in_data = False
                info.file_bytes += written
            out.flush()
            os.fchmod(out.fileno(), mode & 0o777)
            os.utime(out.fileno(), (member.mtime, member.mtime))
    elif kind == tarfile.SYMTYPE:
        target = member.linkname
        if not target or len(target.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
            raise _Refused(name, "a symlink with an empty or over-long target")
        tree.clear(pfd, base)
        # Any target is allowed, absolute ones included: it is resolved inside the sandbox's root
        # at run time, and never followed here.
        os.symlink(target, base, dir_fd=pfd)
        os.utime(base, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)
    elif kind == tarfile.LNKTYPE:
        _hardlink(tree, pfd, parts, member, limits, name)
    else:  # FIFO
        tree.clear(pfd, base)
        os.mkfifo(base, mode & 0o777, dir_fd=pfd)
    if progress:
        progress(0)


def _finish(tree: _Tree, info: LayerInfo, opaque: set[tuple[str, ...]],
            dir_meta: dict[tuple[str, ...], tuple[int, float]]) -> None:
    is_root = os.geteuid() == 0
    for key in sorted(opaque):
        try:
            fd = tree.parent(list(key), "/".join(key) + "/" + OPAQUE_MARKER, create=False)
        except _Refused:
            continue  # replaced by a later entry of the layer
        for xattr in (("trusted.overlay.opaque",) if is_root else ()) + ("user.overlay.opaque",):
            try:
                os.setxattr(fd, xattr, b"y")
                if xattr not in info.opaque_xattrs:
                    info.opaque_xattrs.append(xattr)
            except OSError:
                pass  # listed in layer.json either way; the runtime checks what it needs
    # Directory modes and times last (deepest first), so a read-only directory did not stop its entries.
    for key in sorted(dir_meta, key=len, reverse=True):
        mode, mtime = dir_meta[key]
        try:
            fd = tree.parent(list(key), "/".join(key), create=False)
        except _Refused:
            continue  # replaced by a later entry of the layer
        os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))


def _whiteout(tree: _Tree, parts: list[str], name: str, info: LayerInfo, whiteouts: set[tuple[str, ...]],
              opaque: set[tuple[str, ...]]) -> None:
    base = parts[-1]
    if base == OPAQUE_MARKER:
        tree.parent(parts[:-1], name)  # the directory exists in this layer (created if implicit)
        opaque.add(tuple(parts[:-1]))
        return
    if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless here, skipped like Docker does
    target = base[len(WHITEOUT_PREFIX):]
    if target in ("", ".", ".."):
        raise _Refused(name, "a whiteout that names no file inside its directory")
    pfd = tree.parent(parts[:-1], name)
    key = (*parts[:-1], target)
    try:
        st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and key not in whiteouts:
        return  # the layer's own entry of that name stays; a whiteout hides only lower layers
    if st is None:
        try:
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
        except OSError as exc:
            raise _Refused(name, f"cannot create the overlay whiteout (character device 0:0): {exc.strerror} "
                                 "(Linux 5.8 or later allows it without privileges)") from None
    whiteouts.add(key)


def _hardlink(tree: _Tree, pfd: int, parts: list[str], member: tarfile.TarInfo, limits: Limits,
              name: str) -> None:
    target = _path(member.linkname, limits, name, "hard link target")
    if not target:
        raise _Refused(name, "a hard link to the layer's root")
    if target == parts:
        return
    tfd = os.dup(tree.parent(target[:-1], name, create=False))
    try:
        try:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            raise _Refused(name, f"hard link to {member.linkname!r}, which no earlier entry of this layer "
                                 "created") from None
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(name, f"hard link to {member.linkname!r}, which is not a regular file")
        pfd = tree.parent(parts[:-1], name)
        tree.clear(pfd, parts[-1])
        os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(tfd)


# --- stacks of layers -------------------------------------------------------------------------------

def _lstat_in(root: str, parts: Iterable[str]) -> os.stat_result | None:
    """lstat of root/parts, walking without following any symlink; None if absent or blocked by a
    non-directory parent."""
    parts = list(parts)
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                return None
            os.close(fd)
            fd = nxt
        try:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
    finally:
        os.close(fd)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def check_stack(trees: list[str], infos: list[LayerInfo], labels: list[str]) -> None:
    """Refuse a layer that would write through a symlink of a lower layer: a directory that a layer
    created implicitly (a parent with no tar entry of its own) where the stack below has a symlink. An
    explicit directory entry replaces a lower symlink, as in a tar extraction; an implicit one would,
    under Docker's rules, be written through it, and that is what is refused here."""
    for top in range(1, len(trees)):
        for path in infos[top].implicit_dirs:
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                prefix = parts[:depth]
                if "/".join(prefix) not in infos[top].implicit_dirs:
                    continue
                st = _visible_below(trees, infos, top, prefix)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise LayerError(labels[top], path, f"{'/'.join(prefix)!r} is a symlink in a lower layer: "
                                                        "a layer may not write through a symlink")


def _visible_below(trees: list[str], infos: list[LayerInfo], top: int,
                   parts: list[str]) -> os.stat_result | None:
    """What the stack of layers below ``top`` shows at ``parts`` (None: nothing)."""
    found = _visible_in(trees, infos, top, parts)
    return found[1] if found is not None else None


def _visible_in(trees: list[str], infos: list[LayerInfo], top: int,
                parts: list[str]) -> tuple[int, os.stat_result] | None:
    """Which layer below ``top`` shows ``parts``, and its lstat there (None: nothing)."""
    for j in range(top - 1, -1, -1):
        st = _lstat_in(trees[j], parts)
        if st is not None:
            return None if _is_whiteout(st) else (j, st)
        # an opaque parent in layer j hides every layer below it
        if any("/".join(parts[:d]) in infos[j].opaque_dirs for d in range(0, len(parts))):
            return None
        if "" in infos[j].opaque_dirs:
            return None
    return None


def read_visible(trees: list[str], infos: list[LayerInfo], path: str, limit: int) -> bytes | None:
    """The content of the regular file the stack (bottom first) shows at ``path`` (relative), at most
    ``limit`` bytes; None if there is none, it is not a regular file, or a symlink is on the way (never
    followed: an image's /etc/passwd may point anywhere on the host)."""
    parts = [p for p in path.split("/") if p]
    found = _visible_in(trees, infos, len(trees), parts)
    if found is None or not stat.S_ISREG(found[1].st_mode):
        return None
    fd = _open_parent(trees[found[0]], parts)
    try:
        with os.fdopen(os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                               dir_fd=fd), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(limit)
    finally:
        os.close(fd)


def _open_parent(tree: str, parts: list[str]) -> int:
    """A descriptor of the directory of ``parts`` in one layer tree, walked without following a symlink."""
    fd = os.open(tree, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def visible_stat(trees: list[str], infos: list[LayerInfo], parts: list[str]) -> os.stat_result | None:
    """What the stack (bottom first) shows at ``parts`` (an lstat: a symlink is not followed; None:
    nothing)."""
    return _visible_below(trees, infos, len(trees), parts) if parts else os.stat(trees[0]) if trees else None


def visible_owner(trees: list[str], infos: list[LayerInfo], parts: list[str]) -> tuple[int, int]:
    """The image's (uid, gid) of what the stack shows at ``parts`` (0:0 if nothing)."""
    found = _visible_in(trees, infos, len(trees), parts) if parts else None
    if found is None:
        return 0, 0
    info, st = infos[found[0]], found[1]
    if info.id_base is not None:
        return st.st_uid - info.id_base, st.st_gid - info.id_base
    uid, gid = info.owners.get("/".join(parts), (0, 0))
    return uid, gid


def resolve_in_stack(trees: list[str], infos: list[LayerInfo], path: str, max_links: int = 40) -> list[str]:
    """``path`` (absolute, in the image) with the symlinks of its directories resolved as the sandbox would
    see them, ``..`` and absolute targets kept inside the image's root (as a chroot would): where a build
    step writes ``/bin/tool`` in an image whose /bin is a link to usr/bin, the file goes to usr/bin/tool
    and the link stays. The last component is not resolved. A TemplateError past ``max_links``."""
    todo = [p for p in path.split("/") if p]
    if not todo:
        return []
    last = todo.pop()
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        st = visible_stat(trees, infos, [*done, part])
        if st is not None and stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise TemplateError(f"{path}: more than {max_links} symlinks on the way")
            target = read_visible_link(trees, infos, [*done, part])
            todo = [p for p in target.split("/") if p] + todo
            if target.startswith("/"):
                done = []
            continue
        done.append(part)
    if last == "..":
        return done[:-1]
    return done if last == "." else [*done, last]


def read_visible_link(trees: list[str], infos: list[LayerInfo], parts: list[str]) -> str:
    """The target of the symlink the stack shows at ``parts`` (read by descriptor, never followed)."""
    found = _visible_in(trees, infos, len(trees), parts) if parts else None
    if found is None:
        return ""
    fd = _open_parent(trees[found[0]], parts)
    try:
        return os.readlink(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)


def materialize(trees: list[str], infos: list[LayerInfo], dest: str | os.PathLike[str]) -> None:
    """Copy a stack of layer trees (bottom first) into the empty directory ``dest``, applying whiteouts and
    opaque directories as overlayfs does: the fallback where an overlay cannot be mounted, and the
    reference the tests compare a real overlay mount with. Never follows a symlink."""
    dest_fd = os.open(os.fspath(dest), _DIR_FLAGS)
    try:
        for tree, info in zip(trees, infos, strict=True):
            src_fd = os.open(tree, _DIR_FLAGS)
            try:
                _merge(src_fd, dest_fd, (), set(info.opaque_dirs))
            finally:
                os.close(src_fd)
    finally:
        os.close(dest_fd)


def _merge(src: int, dst: int, rel: tuple[str, ...], opaque: set[str]) -> None:
    if "/".join(rel) in opaque:
        for name in os.listdir(dst):
            _clear_at(dst, name)
    dirs: list[tuple[str, int, float]] = []
    for entry in os.scandir(src):
        st = entry.stat(follow_symlinks=False)
        name = entry.name
        if _is_whiteout(st):
            _clear_at(dst, name)
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                d_st = os.stat(name, dir_fd=dst, follow_symlinks=False)
                if not stat.S_ISDIR(d_st.st_mode):
                    _clear_at(dst, name)
                    os.mkdir(name, 0o700, dir_fd=dst)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=dst)
            s_fd = os.open(name, _DIR_FLAGS, dir_fd=src)
            d_fd = os.open(name, _DIR_FLAGS, dir_fd=dst)
            try:
                os.fchmod(d_fd, 0o700)
                _merge(s_fd, d_fd, (*rel, name), opaque)
            finally:
                os.close(s_fd)
                os.close(d_fd)
            dirs.append((name, stat.S_IMODE(st.st_mode), st.st_mtime))
            continue
        _clear_at(dst, name)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(name, stat.S_IMODE(st.st_mode), dir_fd=dst)
        elif stat.S_ISREG(st.st_mode):
            s = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                        dir_fd=dst)
            try:
                while os.sendfile(d, s, None, _CHUNK) if hasattr(os, "sendfile") else 0:
                    pass
                os.fchmod(d, stat.S_IMODE(st.st_mode))
                os.utime(d, (st.st_mtime, st.st_mtime))
            finally:
                os.close(s)
                os.close(d)
    for name, mode, mtime in dirs:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dst)
        try:
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)


def _clear_at(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _rmtree_at(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)
