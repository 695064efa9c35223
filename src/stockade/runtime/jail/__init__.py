"""The "jail" runtime: bubblewrap namespaces + seccomp + cgroups + rlimits, one module per concern.

- ``bwrap``: which bubblewrap binary runs sandboxes;
- ``rootfs``: the read-only root built from an allowlist of host paths, and the generated /etc files;
- ``uids``: one unprivileged host uid per sandbox when running as root;
- ``cgroups``: memory, pids and cpu limits (v1 and v2);
- ``seccomp``: the syscall filter;
- ``egress``: the broker's way in, a bind-mounted Unix socket that receives client descriptors;
- ``config``: the jail's host settings (uid range, bubblewrap, python, cgroup parent);
- ``runtime``: puts them together into a started sandbox and tears it down.
"""

from .runtime import JailRuntime

__all__ = ["JailRuntime"]
