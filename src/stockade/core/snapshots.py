"""Snapshots: a template sandbox's files saved as a new template (``templates/snapshot.py``), which later
sandboxes start from. The sandbox keeps running; the snapshot is audited (``sandbox.snapshot``, with the
template's name and size, or the error)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING

from ..errors import PolicyError, SandboxNotFoundError
from ..templates.errors import TemplateError
from .base import CoreBase

if TYPE_CHECKING:
    from ..templates import Template, TemplateConfig


class Snapshots(CoreBase):
    async def snapshot(self, sandbox_id: str, name: str | None = None, *, owner: str = "",
                       build_step: TemplateConfig | None = None) -> Template:
        """Save sandbox ``sandbox_id``'s files as template ``name`` (default: ``<template>-snap-<hex>``);
        ``owner`` (a server's tenant) is the only one its sandboxes may start from. ``build_step`` (only
        in-process, from templates/build.py) saves a build cache record with that config instead."""
        from ..templates.snapshot import save
        from ..templates.store import check_name, is_build_cache

        sb = self.get(sandbox_id)
        source = sb.runtime.snapshot_source()
        name = name if name is not None else f"{source.template}-snap-{secrets.token_hex(4)}"
        if not (build_step is not None and not owner and is_build_cache(name)):
            try:
                check_name(name)
            except TemplateError as exc:
                raise PolicyError("name", str(exc)) from None
        started = time.monotonic()
        sb.busy += 1   # a snapshot being taken is use: the sandbox does not idle out under it
        try:
            template = await asyncio.to_thread(save, source, name, f"sandbox {sb.id}", owner, config=build_step)
        except Exception as exc:
            self._record(sb, "sandbox.snapshot", {"template": name, "error": str(exc)[:300]})
            raise
        finally:
            sb.busy -= 1
            sb.last_active = self.loop.time()
        if self.sandboxes.get(sb.id) is not sb or not sb.runtime.is_alive():
            # it ended under the walk (killed, timed out): its files may have gone with it, so no snapshot
            with contextlib.suppress(Exception):
                await asyncio.to_thread(source.store.remove, template.name)
            self._record(sb, "sandbox.snapshot", {"template": name, "error": "the sandbox ended during it"})
            raise SandboxNotFoundError(f"sandbox {sb.id} ended while its snapshot was taken: no template was made")
        self._record(sb, "sandbox.snapshot", {"template": name, "from": source.template, "size": template.size,
                                              "layers": len(template.layers),
                                              "duration_ms": round((time.monotonic() - started) * 1000, 1)})
        return template
