"""Artifacts: files a sandbox hands to the host on purpose, kept after the sandbox is gone.

Inside the sandbox, `save-artifact NAME [FILE|-]` or ``stockade_artifacts.save(name, data)`` stream
bytes to the agent, which forwards them on its channel. The host checks the name and the policy's
quotas, writes the bytes to the store as they arrive (never whole in memory), and records size,
sha256, media type, creation time and the command that produced it. ``ArtifactStore`` is the interface
(an object store can implement it later); ``DirectoryStore`` keeps them under the data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import shutil
import time
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .errors import StockadeError
from .policy import ArtifactsPolicy, format_size

MAX_NAME = 255


class ArtifactError(StockadeError):
    """An artifact was refused (bad name, quota) or does not exist."""


@dataclass(frozen=True)
class ArtifactInfo:
    name: str
    size: int
    sha256: str
    media_type: str
    created_at: datetime
    command: str        # what ran the save inside the sandbox (its command line), as far as it is known


def check_name(name: object) -> str:
    """A name is one path component of printable characters: no separators, no control characters."""
    if not isinstance(name, str) or not name:
        raise ArtifactError("an artifact name must be a non-empty string")
    if len(name.encode()) > MAX_NAME:
        raise ArtifactError(f"artifact name is longer than {MAX_NAME} bytes")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ArtifactError(f"artifact name {name!r} must be a plain file name (no '/', not starting with '.')")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise ArtifactError(f"artifact name {name!r} contains control characters")
    return name


class ArtifactStore(ABC):
    @abstractmethod
    def begin(self, sandbox_id: str, name: str, command: str, quota: ArtifactsPolicy) -> ArtifactWriter:
        """Start receiving an artifact; raises ArtifactError if a quota already forbids it."""

    @abstractmethod
    def list(self, sandbox_id: str) -> list[ArtifactInfo]: ...

    @abstractmethod
    def open(self, sandbox_id: str, name: str) -> Path:
        """The stored content (a local file)."""

    @abstractmethod
    def prune(self, now: float | None = None) -> int:
        """Remove artifacts past their retention; returns how many."""


class ArtifactWriter:
    """Receives one artifact's bytes. Enforces the per-artifact and per-sandbox byte quotas as data
    arrives; ``commit`` makes it visible, ``abort`` leaves no trace."""

    def __init__(self, directory: Path, name: str, command: str, quota: ArtifactsPolicy, used: int) -> None:
        self.directory, self.name, self.command, self.quota = directory, name, command, quota
        self.limit = min(quota.max_size, quota.total_size - used)
        self.size = 0
        self.digest = hashlib.sha256()
        self.error: str | None = None
        self.tmp = directory / f".incoming-{os.getpid()}-{id(self)}"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort

    def write(self, data: bytes) -> None:
        if self.error:
            return
        if self.size + len(data) > self.limit:
            self.error = (f"artifact {self.name!r} exceeds artifacts.max_size ({format_size(self.quota.max_size)})"
                          if self.limit == self.quota.max_size else
                          f"artifact {self.name!r} exceeds what is left of artifacts.total_size "
                          f"({format_size(self.quota.total_size)})")
            return
        try:
            self.file.write(data)
        except OSError as exc:  # the store's disk is full or failing: this save fails, the sandbox lives on
            self.error = _store_error(self.name, exc)
            return
        self.digest.update(data)
        self.size += len(data)

    def commit(self) -> ArtifactInfo:
        if self.error:
            self.abort()
            raise ArtifactError(self.error)
        meta_tmp = self.directory / f".{self.name}.json.tmp"
        try:
            self.file.close()
            media = mimetypes.guess_type(self.name)[0] or "application/octet-stream"
            info = ArtifactInfo(self.name, self.size, self.digest.hexdigest(), media, datetime.now(),
                                self.command[:4096])
            meta = asdict(info) | {"created_at": info.created_at.timestamp(), "retention": self.quota.retention}
            meta_tmp.write_text(json.dumps(meta))
            os.replace(self.tmp, self.directory / self.name)
            os.replace(meta_tmp, self.directory / f".{self.name}.json")
        except OSError as exc:
            self.abort()
            with contextlib.suppress(OSError):
                meta_tmp.unlink()
            raise ArtifactError(_store_error(self.name, exc)) from None
        return info

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the close's flush too: the file goes anyway
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _store_error(name: str, exc: OSError) -> str:
    return (f"the server could not store artifact {name!r}: {exc.strerror or exc} (the server's data "
            "directory is full or failing; nothing was kept, the sandbox is unaffected)")


class DirectoryStore(ArtifactStore):
    """``<root>/<sandbox id>/<name>`` with ``.<name>.json`` beside it for the metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _dir(self, sandbox_id: str) -> Path:
        if not sandbox_id.startswith("sbx-") or not sandbox_id[4:].isalnum():
            raise ArtifactError(f"no artifacts for {sandbox_id!r}")
        return self.root / sandbox_id

    def begin(self, sandbox_id: str, name: str, command: str, quota: ArtifactsPolicy) -> ArtifactWriter:
        check_name(name)
        d = self._dir(sandbox_id)
        try:
            d.mkdir(exist_ok=True, mode=0o700)
            existing = {a.name: a.size for a in self.list(sandbox_id)}
            if name not in existing and len(existing) >= quota.count:
                raise ArtifactError(f"artifacts.count reached ({quota.count} artifacts)")
            used = sum(size for n, size in existing.items() if n != name)
            return ArtifactWriter(d, name, command, quota, used)
        except OSError as exc:
            raise ArtifactError(_store_error(name, exc)) from None

    def list(self, sandbox_id: str) -> list[ArtifactInfo]:
        d = self._dir(sandbox_id)
        out = []
        for meta in sorted(d.glob(".*.json")) if d.is_dir() else []:
            try:
                m = json.loads(meta.read_text())
                out.append(ArtifactInfo(m["name"], m["size"], m["sha256"], m["media_type"],
                                        datetime.fromtimestamp(m["created_at"]), m["command"]))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def open(self, sandbox_id: str, name: str) -> Path:
        path = self._dir(sandbox_id) / check_name(name)
        if not (self._dir(sandbox_id) / f".{name}.json").exists():
            raise ArtifactError(f"sandbox {sandbox_id} has no artifact {name!r}")
        return path

    def prune(self, now: float | None = None, retention: float | None = None) -> int:
        """Remove artifacts older than ``retention`` seconds (default: each one's own, recorded at save)."""
        now = now or time.time()
        removed = 0
        for d in self.root.iterdir() if self.root.is_dir() else []:
            for meta in d.glob(".*.json"):
                try:
                    m = json.loads(meta.read_text())
                    keep = retention if retention is not None else float(m.get("retention", 7 * 86400))
                    if now - float(m["created_at"]) > keep:
                        (d / m["name"]).unlink(missing_ok=True)
                        meta.unlink()
                        removed += 1
                except (OSError, ValueError, KeyError):
                    continue
            with contextlib.suppress(OSError):
                if not any(d.iterdir()):
                    d.rmdir()
        return removed

    def remove_all(self, sandbox_id: str) -> None:
        shutil.rmtree(self._dir(sandbox_id), ignore_errors=True)
