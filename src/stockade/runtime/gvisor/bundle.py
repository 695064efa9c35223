"""The OCI bundle of one gVisor sandbox: config.json and an empty root directory of mount points.

The root is the jail's: the same allowlist of host system paths (rootfs.system_image), read-only, the same
generated /etc files, the agent at the same paths, tmpfs for /home/user, /tmp and /dev/shm of the policy's
sizes, the sandbox environment, the broker's socket directory and the policy's mounts. gVisor's Sentry
serves all of it from its own kernel: /proc, /sys and the clocks are its own, so nothing of the host's
/proc needs masking here.

A template sandbox's root is instead its overlay (``template_root.OverlayRoot``, mounted by the host: the
template's layers under the sandbox's own writable layer), writable, and the agent runs on the host's
python through its own loader under /opt/stockade/python, as in the jail; the host's system paths are not
bound there. Its mount points are made in the overlay from its descriptor, following no symlink of the
image: one that meets a symlink is left to runsc, which resolves it inside the sandbox's root.
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
from ..jail import rootfs, seccomp, template_root

AGENT_CAPS = ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]


@dataclass(frozen=True)
class TemplateRootfs:
    """A template sandbox's root: its mounted overlay, and the host python the agent runs on there."""

    merged: Path
    python: tuple[Path, str, str]   # template_root.host_python(): its directory, stdlib, stdlib's place inside


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
          host_pids: int, cpus: list[int], channel_fd: int, mounts_checked: list[tuple[str, str, bool]],
          workspace: tuple[str, str] | None = None, template: TemplateRootfs | None = None) -> None:
    """Write config.json under ``bundle`` (a new, empty directory) and the root's mount points: in the
    bundle's own empty root, or in a template sandbox's overlay (whose caller passes no ``sandbox_env``: the
    environment is a venv of the host's python, not bound over an image)."""
    fs, lim = policy.filesystem, policy.limits
    if template is None:
        root = bundle / "rootfs"
        root.mkdir(mode=0o755)
    else:
        root = template.merged
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        _tmpfs("/dev/shm", fs.tmp_size, "1777"),
    ]
    # the disk images' directories (home, tmp), bound read-write, or tmpfs; a template's root holds its own
    # /home/user (its writable layer is on the workspace's image, or a tmpfs, of that size)
    if workspace is not None:
        mounts.append(_bind(workspace[1], "/tmp", writable=True))
        if template is None:
            mounts.append(_bind(workspace[0], rootfs.HOME, writable=True))
    else:
        mounts.append(_tmpfs("/tmp", fs.tmp_size, "1777"))
        if template is None:
            mounts.append(_tmpfs(rootfs.HOME, fs.workspace_size, "0755", rootfs.SANDBOX_UID))
    if template is None:
        mounts += [_bind(path, path) for path in image.binds]
        if image.python_prefix_fd_source:
            mounts.append(_bind(image.python_prefix_fd_source, rootfs.PYTHON_MOUNT))
    else:
        so_dir, stdlib, stdlib_inside = template.python
        mounts += [_bind(str(so_dir), template_root.PY_SO_DIR), _bind(stdlib, stdlib_inside)]
    if sandbox_env is not None:
        mounts.append(_bind(str(sandbox_env), environment.MOUNT))
    if egress_dir is not None:
        mounts.append(_bind(str(egress_dir), os.path.dirname(layout.broker)))
    for name in ("agent", "lib", "bin"):
        mounts.append(_bind(str(static.root / name), f"/opt/stockade/{name}"))
    for path in rootfs.generated_files():
        if path not in files:  # (a template's /etc/passwd and /etc/group)
            mounts.append(_bind(str(static.root / "etc" / path.rsplit("/", 1)[1]), path))
    own = bundle / "files"
    own.mkdir(mode=0o755)
    for i, (path, content) in enumerate(files.items()):
        host = own / str(i)
        host.write_bytes(content)
        host.chmod(0o444)
        mounts.append(_bind(str(host), path))
    mounts += [_bind(source, target, writable) for source, target, writable in mounts_checked]
    if template is None:
        for target, path in image.links:
            os.symlink(target, root / path.lstrip("/"))
        _make_mount_points(root, mounts)
    else:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for mount in mounts:
                template_root.make_at(root_fd, str(mount["destination"]), directory=not _is_file(mount))
        finally:
            os.close(root_fd)
    resources: dict[str, object] = {
        "memory": {"limit": lim.memory, "swap": lim.memory},
        # the quota is the limit; the cpuset is what the Sentry counts as its CPUs (nproc, os.cpu_count(),
        # /proc/cpuinfo): from a quota alone it never reports fewer than 2
        "cpu": {"quota": max(1000, int(lim.cpus * 100_000)), "period": 100_000,
                "cpus": ",".join(str(c) for c in cpus)},
        "pids": {"limit": host_pids},
    }
    agent_zip = f"{rootfs.AGENT_DIR}/{AGENT_ZIP}"
    if template is None:
        agent_args, agent_env = [image.python, "-E", "-s", "-S", "-B", agent_zip, str(channel_fd)], []
    else:  # the host's python through its own loader; PYTHONHOME finds its stdlib (commands get the hello's env)
        agent_args = template_root.agent_argv(template_root.PY_SO_DIR, agent_zip, channel_fd)
        agent_env = [f"PYTHONHOME={template_root.PY_DIR}"]
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            # The Sentry lets a namespace's processes SIGKILL its init, so the agent starts as the sandbox's
            # root with only what it needs to become uid 1000 under a real uid user code cannot signal
            # (agent ``become``); it drops the bounding set, and its commands run with no capability.
            "user": {"uid": 0, "gid": 0},
            # the agent lowers its own rlimits before it runs anything
            "args": agent_args,
            "env": agent_env,
            "cwd": rootfs.HOME,
            "capabilities": {**{k: AGENT_CAPS for k in ("bounding", "effective", "permitted")},
                             "inheritable": [], "ambient": []},
            "noNewPrivileges": True,
        },
        # a template's root stays writable: its writes go to the sandbox's own layer (the overlay's upper dir)
        "root": {"path": "rootfs" if template is None else str(root), "readonly": template is None},
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


def _is_file(mount: Mapping[str, object]) -> bool:
    source = str(mount["source"])
    return mount["type"] == "bind" and os.path.exists(source) and not os.path.isdir(source)


def _make_mount_points(root: Path, mounts: list[dict[str, object]]) -> None:
    """In the bundle's own root, which is read-only, so runsc cannot make its mount points."""
    for mount in mounts:
        point = root / str(mount["destination"]).lstrip("/")
        if point.is_symlink() or point.exists():
            continue
        point.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if _is_file(mount):
            point.touch(mode=0o444)
        else:
            point.mkdir(mode=0o755)
