"""Templates: named, immutable root filesystems (content-addressed layers + config) for sandboxes.

``store.py`` keeps them, ``oci.py`` imports OCI/Docker images, ``layers.py`` applies and checks layer
tars. The runtime consumes ``TemplateStore().use(name)`` (see docs/architecture.md, "Templates").
The names below are imported on first use (PEP 562): the `stockade` command loads ``templates.cli`` for
its sub-commands, and that should not cost the store, the layer code and the OCI client."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import LayerError, TemplateError, TemplateInUseError, TemplateNotFoundError

if TYPE_CHECKING:
    from .layers import LayerInfo, Limits, materialize
    from .oci import Credentials, Progress, import_image, parse_source
    from .store import Lease, ResolvedTemplate, Template, TemplateConfig, TemplateStore

_LAZY = {
    **dict.fromkeys(("LayerInfo", "Limits", "materialize"), ".layers"),
    **dict.fromkeys(("Credentials", "Progress", "import_image", "parse_source"), ".oci"),
    **dict.fromkeys(("Lease", "ResolvedTemplate", "Template", "TemplateConfig", "TemplateStore"), ".store"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stockade.templates' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Credentials", "LayerError", "LayerInfo", "Lease", "Limits", "Progress", "ResolvedTemplate",
           "Template", "TemplateConfig", "TemplateError", "TemplateInUseError", "TemplateNotFoundError",
           "TemplateStore", "import_image", "materialize", "parse_source"]
