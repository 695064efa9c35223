"""Artifacts a process in the sandbox saves: checked, stored as they arrive, answered."""

from __future__ import annotations

from typing import Any

from ..artifacts import ArtifactError, ArtifactWriter
from ..errors import ProtocolError
from .base import CoreBase
from .sandboxes import ManagedSandbox


class ArtifactIntake(CoreBase):
    """Artifacts arriving from inside a sandbox."""

    MAX_UPLOADS = 16

    def _artifact_frame(self, sb: ManagedSandbox, header: dict[str, Any], body: bytes) -> None:
        """One frame of an artifact a process in the sandbox is saving. The bytes go to the store as they
        arrive; the last frame gets an answer the saving process sees."""
        aid = header["aid"]
        if "name" in header:
            if aid in sb.uploads or len(sb.uploads) >= self.MAX_UPLOADS:
                raise ProtocolError("agent opened an artifact it already has, or too many at once")
            try:
                sb.uploads[aid] = self.artifacts.begin(sb.id, header["name"], str(header.get("cmd", "")),
                                                       sb.policy.artifacts)
            except ArtifactError as exc:
                sb.uploads[aid] = exc
        upload = sb.uploads.get(aid)
        if upload is None:
            raise ProtocolError("agent sent data for an artifact it never opened")
        if isinstance(upload, ArtifactWriter):
            upload.write(body)
        if header["more"]:
            return
        del sb.uploads[aid]
        try:
            if isinstance(upload, ArtifactError):
                raise upload
            info = upload.commit()
        except ArtifactError as exc:
            if not sb.channel.closed:
                sb.runtime.agent.artifact_ack(aid, ok=False, message=str(exc))
            return
        self._record(sb, "artifact.save", {"name": info.name, "size": info.size, "sha256": info.sha256,
                                           "cmd": info.command})
        if not sb.channel.closed:
            sb.runtime.agent.artifact_ack(aid, ok=True, size=info.size, sha256=info.sha256)

