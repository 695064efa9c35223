"""What a sandbox's mountinfo may not show of the host (shared by the conformance and template tests)."""

from __future__ import annotations

from pathlib import Path

from stockade.config import HostConfig


def host_devtmpfs_size() -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)[1].split()
        if fields[0] == "devtmpfs":
            return next((o for o in fields[2].split(",") if o.startswith("size=")), None)
    return None


def host_leaks(text: str, host_uid: object, sandbox_id: str) -> list[str]:
    """The lines of ``text`` (a sandbox's /proc/self/mountinfo) that show the host: an owner as the host
    sees it (a per-sandbox uid), the host's devtmpfs or its size, the data or state directory, the sandbox's
    id, or a host device by name (/dev/vda, /dev/loop3: a host bind's disk, a workspace's loop device)."""
    config = HostConfig.from_env()
    size = host_devtmpfs_size()
    leaks = []
    for line in text.splitlines():
        fields = line.split()
        root = fields[3]
        fstype, source, options = fields[fields.index("-") + 1:][:3]
        owners = [o.split("=", 1)[1] for o in options.split(",") if o.startswith(("uid=", "gid="))]
        shown = " ".join((root, source, options))
        if (fstype == "devtmpfs" or (size is not None and size in options)
                or any(int(o) >= 65536 or o == str(host_uid) for o in owners)
                or str(config.data_dir) in shown or str(config.state_dir) in shown or sandbox_id in shown
                or source.startswith("/dev/")):
            leaks.append(line)
    return leaks
