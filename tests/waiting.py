"""Waiting in tests. A wait whose condition never becomes true fails the test, naming what it waited for;
nothing here returns a flag a caller could forget to assert."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
POLL = 0.05


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               show: Callable[[], object] | None = None) -> T:
    """Poll ``condition`` until it returns something true, and return that; after ``timeout`` seconds
    raise AssertionError naming ``what`` and the condition's last answer (or, given ``show``, what
    ``show()`` says then: the leftovers a "nothing is left" condition saw, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, what, value, show))
        time.sleep(POLL)


async def async_wait_until(condition: Callable[[], T], timeout: float, what: str,
                           show: Callable[[], object] | None = None) -> T:
    """``wait_until`` for a test running on an asyncio loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, what, value, show))
        await asyncio.sleep(POLL / 10)


def _timed_out(timeout: float, what: str, value: object, show: Callable[[], object] | None) -> str:
    last = show() if show is not None else value
    return f"timed out after {timeout:g}s waiting for {what} (last seen: {str(last)[:1000]})"


@contextmanager
def stopped_after(timeout: float, stop: Callable[[], Any], what: str) -> Iterator[None]:
    """For a blocking read with no timeout of its own (a process's pipe, a background command's
    events): if the block is still running after ``timeout`` seconds, ``stop()`` ends what it reads, and
    the block fails naming ``what``. A block that ends in time is never stopped."""
    lock = threading.Lock()
    state = {"finished": False, "stopped": False}

    def expire() -> None:
        with lock:
            if state["finished"]:
                return
            state["stopped"] = True
        stop()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["finished"] = True
        timer.cancel()
    if state["stopped"]:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class _Handle(Protocol):  # the SDK's CommandHandle, as far as read_until needs it
    stdout: str
    stderr: str

    def __iter__(self) -> Iterator[tuple[str | None, str | None]]: ...

    def kill(self) -> bool: ...


def read_until(handle: _Handle, condition: Callable[[], object], timeout: float, what: str) -> None:
    """Read a background command's output until ``condition()`` holds. (A handle's ``stdout`` fills only
    while the handle is iterated, so polling it without reading would never see anything.) If the
    condition does not hold within ``timeout`` seconds, or the command ends first, the test fails naming
    ``what``; on a timeout the command is killed to end the read."""
    with stopped_after(timeout, handle.kill, what):
        if condition():
            return
        for _ in handle:
            if condition():
                return
    raise AssertionError(f"the command ended while waiting for {what} (stdout {handle.stdout[-500:]!r}, "
                         f"stderr {handle.stderr[-500:]!r})")
