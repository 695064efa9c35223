"""One background event loop per process that every sandbox call runs on.

The sync ``Sandbox`` and the async ``AsyncSandbox`` share one async core; both hop to this loop. It lives
as long as the process, which matters: sandboxes die with the thread that spawned them
(bwrap --die-with-parent), so they are spawned from here and never from a short-lived thread.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stockade-portal", daemon=True)
        self.thread.start()
        self._ready.wait()
        self._closers: list[Any] = []
        atexit.register(self.close)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and wait for it in this thread."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a sync stockade call was made from inside a stockade callback; "
                               "use AsyncSandbox there instead")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and await it from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def on_close(self, closer: Any) -> None:
        """Register a coroutine function to run on the loop at interpreter exit."""
        self._closers.append(closer)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        for closer in self._closers:
            try:
                asyncio.run_coroutine_threadsafe(closer(), self.loop).result(timeout=30)
            except Exception:  # exit goes on; sandboxes die with this process anyway
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


_portal: Portal | None = None
_lock = threading.Lock()


def portal() -> Portal:
    global _portal
    with _lock:
        if _portal is None:
            _portal = Portal()
        return _portal
