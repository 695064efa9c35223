"""Which runtimes exist and how to make one. Adding a runtime is a package under runtime/ and one line in
RUNTIMES; nothing in the SDK, the core or the server names a runtime."""

from __future__ import annotations

import importlib

from ..config import HostConfig
from ..errors import PolicyError
from .base import Runtime

# name -> "module:class"; imported only when used, so a host without runsc or QEMU never loads their code
RUNTIMES: dict[str, str] = {
    "jail": "stockade.runtime.jail.runtime:JailRuntime",
    "gvisor": "stockade.runtime.gvisor.runtime:GvisorRuntime",
}


def runtime_class(name: str) -> type[Runtime]:
    target = RUNTIMES.get(name)
    if target is None:
        raise PolicyError("runtime", f"unknown runtime {name!r}; this version has: {', '.join(sorted(RUNTIMES))}")
    module, _, cls = target.partition(":")
    found: type[Runtime] = getattr(importlib.import_module(module), cls)
    return found


def make_runtime(name: str, config: HostConfig) -> Runtime:
    """A started runtime (its host checks done; raises SandboxUnavailableError when this host cannot run it)."""
    return runtime_class(name)(config)
