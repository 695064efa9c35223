"""Files in a sandbox: every path is resolved by the agent inside; the host only streams bytes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator
from typing import Any

from ..agent import protocol
from ..errors import PolicyError
from ..runtime.agent_client import FILE_OPS
from ..runtime.channel import Pending, ReadPending
from .base import CoreBase
from .sandboxes import ManagedSandbox


class Files(CoreBase):
    """Files: operations, streamed reads and writes, each recorded."""

    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        """stat, list, mkdir, remove or rename (``agent_client.FILE_OPS``): the agent's answer header."""
        sb = self.get(sandbox_id)
        if op not in FILE_OPS:
            raise PolicyError("op", f"unknown file operation {op!r}; one of {', '.join(FILE_OPS)}")
        extra = sorted(set(args) - set(FILE_OPS[op]))
        if extra:
            raise PolicyError(extra[0], f"{op} takes only {' and '.join(FILE_OPS[op])}")
        if op not in ("stat", "list"):  # changes are recorded; looking is not
            self._record(sb, "file.op", {"op": op, **{k: v for k, v in args.items() if isinstance(v, str | int)}})
        return await sb.runtime.agent.file_op(op, args)

    async def open_read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        """Open a file for a streamed read: a refusal (ENOENT, EISDIR...) raises here, the chunks follow as
        the generator is iterated. A read left unfinished is cancelled in the agent; either way it is
        recorded (size, and sha256 when complete)."""
        sb = self.get(sandbox_id)
        pending = ReadPending()
        rid = sb.runtime.agent.read(pending, path)
        await pending.done
        return self._read_chunks(sb, pending, rid, path)

    async def _read_chunks(self, sb: ManagedSandbox, pending: ReadPending, rid: int,
                           path: str) -> AsyncGenerator[bytes, None]:
        digest, size, ended = hashlib.sha256(), 0, False
        try:
            while (item := await pending.chunks.get()) is not None:
                if isinstance(item, BaseException):
                    ended = True  # refused midway: the error says so
                    raise item
                digest.update(item)
                size += len(item)
                pending.outstanding += 1
                if not sb.channel.closed:
                    sb.runtime.agent.credit(rid)
                yield item
            ended = True
            self._record(sb, "file.read", {"path": path, "size": size, "complete": True,
                                           "sha256": digest.hexdigest()})
        finally:
            if not ended:
                self._record(sb, "file.read", {"path": path, "size": size, "complete": False})
                if not sb.channel.closed:
                    sb.runtime.agent.cancel(rid)

    async def write_chunks(self, sandbox_id: str, path: str, chunks: Any, append: bool = False) -> int:
        """Stream ``chunks`` (an async iterator of bytes) to ``path``; returns the bytes written."""
        sb = self.get(sandbox_id)
        pending = Pending()
        rid = 0
        digest, sent = hashlib.sha256(), 0
        async for chunk in _rechunk(chunks):
            digest.update(chunk)
            sent += len(chunk)
            if pending.done.done():  # the agent already refused (ENOSPC, EACCES...)
                break
            rid = sb.runtime.agent.write(pending, path, chunk, append=append, more=True, rid=rid)
            await sb.channel.drain()
        # the last frame, also after a refusal: it lets the agent forget the request
        sb.runtime.agent.write(pending, path, b"", append=append, more=False, rid=rid)
        try:
            result = await asyncio.wait_for(pending.done, 60)
        except Exception as exc:
            self._record(sb, "file.write", {"path": path, "size": sent, "append": append, "error": str(exc)[:500]})
            raise
        size = result.get("size")
        self._record(sb, "file.write", {"path": path, "size": sent, "sha256": digest.hexdigest(), "append": append})
        return size if isinstance(size, int) else 0


async def _rechunk(chunks: Any) -> Any:
    async for data in chunks:
        view = memoryview(bytes(data))
        while view:
            yield bytes(view[:protocol.CHUNK])
            view = view[protocol.CHUNK:]
