"""Templates: named, immutable root filesystems (content-addressed layers + config) for sandboxes.

``store.py`` keeps them, ``oci.py`` imports OCI/Docker images, ``layers.py`` applies and checks layer
tars. The runtime consumes ``TemplateStore().use(name)`` (see docs/architecture.md, "Templates")."""

from .errors import LayerError, TemplateError, TemplateInUseError, TemplateNotFoundError
from .layers import LayerInfo, Limits, materialize
from .oci import Credentials, Progress, import_image, parse_source
from .store import Lease, ResolvedTemplate, Template, TemplateConfig, TemplateStore

__all__ = ["Credentials", "LayerError", "LayerInfo", "Lease", "Limits", "Progress", "ResolvedTemplate",
           "Template", "TemplateConfig", "TemplateError", "TemplateInUseError", "TemplateNotFoundError",
           "TemplateStore", "import_image", "materialize", "parse_source"]
