"""Errors of the template store and image import. Each names what was wrong: the template, the image
source, the layer (by position and digest) and the entry, and why."""

from __future__ import annotations

from ..errors import StockadeError


class TemplateError(StockadeError):
    """A template operation failed (bad name, missing template, template in use, a bad image source)."""


class TemplateNotFoundError(TemplateError, LookupError):
    """No template of that name is in the store."""


class TemplateInUseError(TemplateError):
    """The template cannot be removed: something (a live sandbox) holds it."""


class LayerError(TemplateError):
    """A layer was refused. ``layer`` names it (position and digest), ``entry`` the tar entry (or "")."""

    def __init__(self, layer: str, entry: str, reason: str) -> None:
        self.layer = layer
        self.entry = entry
        self.reason = reason
        where = f"{layer}: entry {entry!r}" if entry else layer
        super().__init__(f"{where}: {reason}")
