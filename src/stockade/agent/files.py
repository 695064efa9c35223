"""Files: every path is resolved here, inside the sandbox; reads under a credit window."""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    pass

try:
    from . import protocol
    from .common import LIST_BYTES, LIST_LIMIT, AgentBase, _errno_name
except ImportError:  # run as a script inside the sandbox
    import protocol  # type: ignore[no-redef]
    from common import LIST_BYTES, LIST_LIMIT, AgentBase, _errno_name  # type: ignore[no-redef]



class Files(AgentBase):
    def path(self, h: dict, key: str = "path") -> str:
        p = h[key]
        if not isinstance(p, str) or not p or "\0" in p:
            raise ValueError(f"{key} must be a non-empty string without NUL bytes")
        return os.path.normpath(os.path.join(self.home, p))

    @staticmethod
    def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
        # O_NONBLOCK so a FIFO cannot hang the agent; anything but a regular file is refused.
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR if _is_dir(st.st_mode) else errno.EINVAL,
                          "Is a directory" if _is_dir(st.st_mode) else "Not a regular file", path)
        os.set_blocking(fd, True)
        return fd

    def op_read(self, rid: int, h: dict, body: bytes) -> None:
        fd = self.open_regular(self.path(h), os.O_RDONLY)
        self.send({"id": rid, "ev": "meta", "size": os.fstat(fd).st_size})
        self.reads[rid] = [fd, protocol.READ_WINDOW]

    def op_credit(self, rid: int, h: dict, body: bytes) -> None:
        if rid in self.reads:
            self.reads[rid][1] += int(h["n"])

    def op_cancel(self, rid: int, h: dict, body: bytes) -> None:
        entry = self.reads.pop(rid, None)
        if entry:
            os.close(entry[0])

    def pump_reads(self) -> None:
        for rid, entry in list(self.reads.items()):
            while entry[1] > 0 and not self.paused:
                try:
                    data = os.read(entry[0], protocol.CHUNK)
                except OSError as exc:
                    del self.reads[rid]
                    os.close(entry[0])
                    self.error(rid, _errno_name(exc), exc.strerror or str(exc))
                    break
                if not data:
                    del self.reads[rid]
                    os.close(entry[0])
                    self.send({"id": rid, "ev": "end"})
                    break
                entry[1] -= 1
                self.send({"id": rid, "ev": "data"}, data)

    def op_write(self, rid: int, h: dict, body: bytes) -> None:
        if rid in self.failed_writes:
            if not h.get("more"):
                self.failed_writes.discard(rid)
            return
        entry = self.writes.get(rid)
        try:
            if entry is None:
                path = self.path(h)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if h.get("append") else os.O_TRUNC)
                entry = self.writes[rid] = [self.open_regular(path, flags), 0]
            view = memoryview(body)
            while view:
                n = os.write(entry[0], view)
                view = view[n:]
                entry[1] += n
        except (OSError, ValueError, KeyError):
            if entry is not None:
                os.close(self.writes.pop(rid)[0])
            if h.get("more"):
                self.failed_writes.add(rid)
            raise
        if not h.get("more"):
            os.close(self.writes.pop(rid)[0])
            self.send({"id": rid, "ev": "done", "size": entry[1]})

    def op_stat(self, rid: int, h: dict, body: bytes) -> None:
        path = self.path(h)
        self.send({"id": rid, "ev": "result", "entry": _entry(path, os.lstat(path))})

    def op_list(self, rid: int, h: dict, body: bytes) -> None:
        root = self.path(h)
        depth = max(1, min(int(h.get("depth", 1)), 32))
        entries: list[dict] = []
        self.list_bytes = 0
        truncated = self.walk(root, depth, entries)
        self.send({"id": rid, "ev": "result", "entries": entries, "truncated": truncated})

    def walk(self, directory: str, depth: int, entries: list) -> bool:
        with os.scandir(directory) as it:
            for item in it:
                if len(entries) >= LIST_LIMIT or self.list_bytes >= LIST_BYTES:
                    return True
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append(_entry(item.path, st))
                self.list_bytes += 2 * len(item.path) + 120  # name and path, numbers, keys
                if depth > 1 and _is_dir(st.st_mode):
                    try:
                        if self.walk(item.path, depth - 1, entries):
                            return True
                    except OSError:
                        continue
        return False

    def op_mkdir(self, rid: int, h: dict, body: bytes) -> None:
        path = self.path(h)
        created = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        self.send({"id": rid, "ev": "result", "created": created})

    def op_remove(self, rid: int, h: dict, body: bytes) -> None:
        path = self.path(h)
        if _is_dir(os.lstat(path).st_mode):
            _rmtree(path)
        else:
            os.unlink(path)
        self.send({"id": rid, "ev": "ok"})

    def op_rename(self, rid: int, h: dict, body: bytes) -> None:
        os.rename(self.path(h, "src"), self.path(h, "dst"))
        self.send({"id": rid, "ev": "ok"})


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000


def _is_regular(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


def _entry(path: str, st: os.stat_result) -> dict:
    kind = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink"}.get(st.st_mode & 0o170000, "other")
    return {"name": os.path.basename(path) or "/", "path": path, "type": kind, "size": st.st_size,
            "mode": st.st_mode & 0o7777, "mtime": st.st_mtime}


def _rmtree(path: str) -> None:
    # Never follows symlinks: a link to elsewhere is removed, not its target's contents.
    with os.scandir(path) as it:
        for item in it:
            if item.is_dir(follow_symlinks=False):
                _rmtree(item.path)
            else:
                os.unlink(item.path)
    os.rmdir(path)
