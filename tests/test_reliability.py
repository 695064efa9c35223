"""Faults under concurrency: descriptors closed under the event loop, and what a stopped endpoint leaves."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from stockade.broker.server import BrokerEndpoint
from stockade.policy import NetworkPolicy
from stockade.runtime.jail.egress import FdPassingListener
from stockade.runtime.jail.runtime import _wait_exit


def test_a_stopped_egress_listener_leaves_no_stale_descriptor_watched_by_the_loop() -> None:
    """Issue 18.1: many allowlist sandboxes end at once; each egress listener stops, then the sandbox's
    process is awaited through a pidfd, which often gets the number the listener just freed. Before the
    fix the loop still held the closed listener in its selector, the pidfd was never watched, and the kill
    timed out (TimeoutError after 10 s in _wait_exit)."""

    async def one(root: Path, i: int) -> None:
        broker = BrokerEndpoint(f"sb{i}", NetworkPolicy(mode="allowlist", allow=["a.test"]), on_event=lambda _e: None)
        endpoint = FdPassingListener(root / f"b{i}", broker.handle)
        endpoint.start()
        await asyncio.sleep(0)  # the accept loop is now waiting on the listener
        await endpoint.stop()
        proc = subprocess.Popen(["sleep", "0.01"])
        try:
            await _wait_exit(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    async def main(root: Path) -> list[BaseException | None]:
        results = await asyncio.gather(*(one(root, i) for i in range(20)), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    with tempfile.TemporaryDirectory(prefix="stockade-test-broker-") as root:
        fds_before = len(os.listdir("/proc/self/fd"))
        failures = [r for r in asyncio.run(main(Path(root))) if r is not None]
        assert failures == [], failures[:3]
        assert len(os.listdir("/proc/self/fd")) <= fds_before  # listeners and pidfds were all closed
        assert os.listdir(root) == []  # each endpoint removed its socket directory


def test_an_egress_socket_deeper_than_sun_path_still_listens(tmp_path: Path) -> None:
    """The jail's broker socket is under the sandbox's workspace directory (host_mounts.py): a deep state
    directory makes its path longer than a Unix socket address holds (108 bytes), which bind() refused."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)

    async def main() -> bytes:
        async def handler(client, kind: bytes) -> None:
            client.sendall(b"accepted " + kind)
            client.close()

        endpoint = FdPassingListener(deep, handler)
        endpoint.start()
        try:
            assert len(str(endpoint.socket_path)) > 108 and endpoint.socket_path.exists()
            a, b = socket.socketpair()
            dirfd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
            with socket.socket(socket.AF_UNIX) as conn:
                await asyncio.to_thread(conn.connect, f"/proc/self/fd/{dirfd}/broker.sock")
                os.close(dirfd)
                socket.send_fds(conn, [b"H"], [b.fileno()])
                b.close()
                a.settimeout(5)
                return await asyncio.to_thread(a.recv, 64)
        finally:
            await endpoint.stop()

    assert asyncio.run(main()) == b"accepted H"
    assert not deep.exists()


def test_uid_lock_files_are_removed_and_a_uid_is_never_held_twice(tmp_path: Path) -> None:
    """Issue 18.7: the lock files stayed (993 after 1,000 cycles). Removing them must not let two holders
    lock different files of one uid: threads race on a range of two uids, each checking that no one else
    holds the uid it got."""
    import threading
    import time

    from stockade.runtime.jail.uids import UidAllocator

    allocator = UidAllocator(tmp_path, (3_999_000_000, 3_999_000_001))  # uids no process runs as
    held: set[int] = set()
    guard = threading.Lock()
    shared: list[int] = []

    def cycle() -> None:
        for _ in range(300):
            try:
                lease = allocator.acquire()
            except Exception:  # both taken right now: try again
                continue
            with guard:
                if lease.uid in held:
                    shared.append(lease.uid)
                held.add(lease.uid)
            time.sleep(0.0005)  # hold it a moment, as a sandbox would
            with guard:
                held.discard(lease.uid)
            lease.release()

    threads = [threading.Thread(target=cycle) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared == []
    assert os.listdir(tmp_path / "uids") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="starts a process as another uid")
def test_id_blocks_are_aligned_and_skip_a_block_with_processes(tmp_path):
    """Build steps get blocks of 65536 ids (runtime/jail/template_root.py): a block any id of which a
    process runs as is never handed out, and skipping it leaves no lock file."""
    import subprocess

    from stockade.runtime.jail.uids import UidAllocator

    base, step = 3_900_000_000, 65536
    allocator = UidAllocator(tmp_path, (base, base + step), step=step)
    squatter = subprocess.Popen(["sleep", "60"], user=base + 4242, group=base + 4242)
    try:
        for _ in range(8):   # only the second block is ever free
            lease = allocator.acquire()
            assert lease.uid == base + step
            lease.release()
        held = allocator.acquire()
        with pytest.raises(Exception, match="no free sandbox uid"):
            allocator.acquire()
        held.release()
        assert os.listdir(tmp_path / "uids") == []
    finally:
        squatter.kill()
        squatter.wait()
