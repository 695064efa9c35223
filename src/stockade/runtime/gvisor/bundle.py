"""The OCI bundle of one gVisor sandbox: config.json and an empty root directory of mount points.

The root is the jail's: the same allowlist of host system paths (rootfs.system_image), read-only, the same
generated /etc files, the agent at the same paths, tmpfs for /home/user, /tmp and /dev/shm of the policy's
sizes, the sandbox environment, the broker's socket directory and the policy's mounts. gVisor's Sentry
serves all of it from its own kernel: /proc, /sys and the clocks are its own, so nothing of the host's
/proc needs masking here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ... import environment
from ...policy import Policy
from ..agent_files import AGENT_ZIP, SAVE_ARTIFACT
from ..base import SandboxLayout
from ..jail import rootfs, seccomp

AGENT_CAPS = ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]


@dataclass(frozen=True)
class Static:
    """Files every sandbox of this process gets, written once under the state dir and bound read-only."""

    root: Path

    @classmethod
    def build(cls, base: Path, agent_files: Mapping[str, bytes], artifacts_helper: bytes) -> Static:
        files: dict[str, tuple[bytes, int]] = {f"agent/{n}": (data, 0o444) for n, data in agent_files.items()}
        files["lib/stockade_artifacts.py"] = (artifacts_helper, 0o444)
        files["bin/save-artifact"] = (SAVE_ARTIFACT, 0o555)
        for path, text in rootfs.generated_files().items():
            files[f"etc/{path.rsplit('/', 1)[1]}"] = (text.encode(), 0o444)
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name][0] + b"\0")
        root = base / digest.hexdigest()[:20]
        if not root.is_dir():
            tmp = root.with_name(root.name + f".tmp{os.getpid()}")
            for name, (data, mode) in files.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                target.write_bytes(data)
                target.chmod(mode)
            try:
                os.rename(tmp, root)
            except OSError:  # another process made it first
                shutil.rmtree(tmp, ignore_errors=True)
        return cls(root)


def _bind(source: str, target: str, writable: bool = False) -> dict[str, object]:
    return {"destination": target, "type": "bind", "source": source,
            "options": ["rbind", "rw" if writable else "ro", "nosuid", "nodev"]}


def _tmpfs(target: str, size: int, mode: str, owner: int | None = None) -> dict[str, object]:
    options = ["nosuid", "nodev", f"size={size}", f"mode={mode}"]
    if owner is not None:
        options += [f"uid={owner}", f"gid={owner}"]
    return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options}


def write(bundle: Path, *, policy: Policy, layout: SandboxLayout, static: Static, image: rootfs.SystemImage,
          sandbox_env: Path | None, egress_dir: Path | None, files: Mapping[str, bytes], cgroups_path: str | None,
          host_pids: int, cpus: list[int], channel_fd: int, mounts_checked: list[tuple[str, str, bool]]) -> None:
    """Write config.json and the root's mount points under ``bundle`` (a new, empty directory)."""
    fs, lim = policy.filesystem, policy.limits
    root = bundle / "rootfs"
    root.mkdir(mode=0o755)
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        _tmpfs("/dev/shm", fs.tmp_size, "1777"),
        _tmpfs("/tmp", fs.tmp_size, "1777"),
        _tmpfs(rootfs.HOME, fs.workspace_size, "0755", rootfs.SANDBOX_UID),
    ]
    mounts += [_bind(path, path) for path in image.binds]
    if image.python_prefix_fd_source:
        mounts.append(_bind(image.python_prefix_fd_source, rootfs.PYTHON_MOUNT))
    if sandbox_env is not None:
        mounts.append(_bind(str(sandbox_env), environment.MOUNT))
    if egress_dir is not None:
        mounts.append(_bind(str(egress_dir), os.path.dirname(layout.broker)))
    for name in ("agent", "lib", "bin"):
        mounts.append(_bind(str(static.root / name), f"/opt/stockade/{name}"))
    for path in rootfs.generated_files():
        mounts.append(_bind(str(static.root / "etc" / path.rsplit("/", 1)[1]), path))
    own = bundle / "files"
    own.mkdir(mode=0o755)
    for i, (path, content) in enumerate(files.items()):
        host = own / str(i)
        host.write_bytes(content)
        host.chmod(0o444)
        mounts.append(_bind(str(host), path))
    mounts += [_bind(source, target, writable) for source, target, writable in mounts_checked]
    for target, path in image.links:
        os.symlink(target, root / path.lstrip("/"))
    for mount in mounts:  # the root is read-only, so runsc cannot make its mount points: they are made here
        point = root / str(mount["destination"]).lstrip("/")
        if point.is_symlink() or point.exists():
            continue
        source = str(mount["source"])
        is_file = mount["type"] == "bind" and os.path.exists(source) and not os.path.isdir(source)
        point.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if is_file:
            point.touch(mode=0o444)
        else:
            point.mkdir(mode=0o755)
    resources: dict[str, object] = {
        "memory": {"limit": lim.memory, "swap": lim.memory},
        # the quota is the limit; the cpuset is what the Sentry counts as its CPUs (nproc, os.cpu_count(),
        # /proc/cpuinfo): from a quota alone it never reports fewer than 2
        "cpu": {"quota": max(1000, int(lim.cpus * 100_000)), "period": 100_000,
                "cpus": ",".join(str(c) for c in cpus)},
        "pids": {"limit": host_pids},
    }
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            # The Sentry lets a namespace's processes SIGKILL its init, so the agent starts as the sandbox's
            # root with only what it needs to become uid 1000 under a real uid user code cannot signal
            # (agent ``become``); it drops the bounding set, and its commands run with no capability.
            "user": {"uid": 0, "gid": 0},
            # the agent lowers its own rlimits before it runs anything
            "args": [image.python, "-E", "-s", "-S", "-B", f"{rootfs.AGENT_DIR}/{AGENT_ZIP}", str(channel_fd)],
            "env": [],
            "cwd": rootfs.HOME,
            "capabilities": {**{k: AGENT_CAPS for k in ("bounding", "effective", "permitted")},
                             "inheritable": [], "ambient": []},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "resources": resources,
            "seccomp": seccomp.oci_profile(),   # the jail's rules, applied by the Sentry (--oci-seccomp)
            **({"cgroupsPath": cgroups_path} if cgroups_path else {}),
        },
    }
    (bundle / "config.json").write_text(json.dumps(config))
