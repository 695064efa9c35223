"""What the sandbox uses right now, seen from inside: CPU time, resident memory, its disk (op ``usage``).

The agent is the sandbox's init and reaps every orphan, and the kernel adds a process's CPU time (and its
reaped children's) to its parent's when the parent waits for it. So the sum over the live processes of
their own and their reaped children's times counts every process that ever ran in the sandbox once, and
works the same in every runtime (the jail, gVisor's Sentry, a VM's guest). What it misses: the time of
children auto-reaped under SIGCHLD = SIG_IGN, which the kernel credits to nobody.
"""

from __future__ import annotations

import os

try:
    from .common import AgentBase, _proc_stats
except ImportError:  # run as a script inside the sandbox
    from common import AgentBase, _proc_stats  # type: ignore[no-redef]


class Usage(AgentBase):
    def op_usage(self, rid: int, h: dict, body: bytes) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        cpu = rss = count = 0
        for pid, fields in _proc_stats():
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    resident = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
            # utime, stime, cutime, cstime: stat's fields 14-17, so 12-15 after the state
            cpu += sum(int(x) for x in fields[11:15])
            rss += resident
            count += 1
        fs = os.statvfs(self.home)
        self.send({"id": rid, "ev": "result", "cpu_seconds": cpu / ticks, "rss_bytes": rss * page,
                   "processes": count, "disk_used": (fs.f_blocks - fs.f_bfree) * fs.f_frsize,
                   "disk_total": fs.f_blocks * fs.f_frsize})
