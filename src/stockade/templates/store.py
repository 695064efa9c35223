"""The template store: content-addressed layer trees and named templates, under the data directory.

Layout (``<data dir>/templates``, mode 0700):
    layers/sha256/<hex>/tree/        one layer, extracted in overlayfs format (see layers.py); <hex> is its
                                     diff_id (sha256 of the uncompressed tar), verified on extraction
    layers/sha256/<hex>/layer.json   what extraction found (whiteouts, opaque dirs, image owners, ...)
    templates/<name>.json            a template: ordered layer list (bottom first) + config
    templates/.build-<key>.json      a build step's result (build.py's cache): not listed, nobody's template
    locks/<name>.lock                in-use lock: shared flocks held by whoever runs sandboxes from it
    tmp/                             extractions under way (renamed into layers/ when complete)
    store.lock                       shared by imports, exclusive for garbage collection

Every write becomes visible by one rename: a layer directory appears whole (tree and layer.json) or not
at all, and a template record is linked into place only if that name is free (a build replaces one by a
rename, under its exclusive in-use lock: ``replace_template``). A layer is stored once
whatever number of templates use it; removing a template removes its record, and garbage collection
then removes the layers no template refers to.

In use: ``TemplateStore.use(name)`` returns a lease (a shared flock on locks/<name>.lock) that the runtime
holds for as long as a sandbox runs from the template; the kernel drops it if that process dies, so a
crash leaves nothing stale. ``remove`` takes the lock exclusively without waiting and refuses while any
lease is held. A runtime that tracks sandboxes itself can instead pass ``in_use=`` (a callback returning
why the template is in use, or None) to the store.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TemplateError, TemplateInUseError, TemplateNotFoundError
from .layers import LayerInfo, Limits, extract_layer, remove_tree, shift_owners

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# the build cache's records (templates/build.py): one per build step, named by the step's cache key; a name
# no user can give (NAME_RE), left out of listings, served to no server tenant
BUILD_CACHE_RE = re.compile(r"\.build-[0-9a-f]{40}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TemplateError(f"template name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
                            "starting with a letter or digit")
    return name


def _stored_name(name: str) -> str:
    if isinstance(name, str) and BUILD_CACHE_RE.fullmatch(name):
        return name
    return check_name(name)


def is_build_cache(name: str) -> bool:
    return bool(BUILD_CACHE_RE.fullmatch(name))


@dataclass(frozen=True)
class TemplateConfig:
    """How a sandbox from this template starts. ``image_command`` is the image's ENTRYPOINT + CMD, kept
    for reference only: a sandbox runs the agent, and ``start_command`` (if any) in the background."""

    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    start_command: list[str] | None = None
    ready_command: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    image_command: list[str] = field(default_factory=list)
    architecture: str = ""
    os: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplateConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Template:
    name: str
    layers: list[str]            # diff_ids, bottom first
    config: TemplateConfig
    source: str = ""             # where it came from (an image reference)
    digest: str = ""             # the image manifest's digest, when imported
    created: float = 0.0
    size: int = 0                # bytes of its layers' files
    owner: str = ""              # the server tenant whose snapshot it is ("": the host's, everyone's)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "layers": self.layers, "config": self.config.to_json(),
                "source": self.source, "digest": self.digest, "created": self.created, "size": self.size,
                "owner": self.owner}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Template:
        return cls(name=data["name"], layers=list(data["layers"]), config=TemplateConfig.from_json(data["config"]),
                   source=data.get("source", ""), digest=data.get("digest", ""),
                   created=float(data.get("created", 0)), size=int(data.get("size", 0)),
                   owner=str(data.get("owner", "")))


@dataclass(frozen=True)
class ResolvedTemplate:
    """What a runtime needs to start a sandbox: the layer trees (bottom first: overlayfs wants them
    top first, so ``lowerdir=":".join(reversed(layer_dirs))``), their records, and the config."""

    template: Template
    layer_dirs: list[Path]
    layer_infos: list[LayerInfo]

    @property
    def config(self) -> TemplateConfig:
        return self.template.config


class Lease:
    """A template held in use (a shared flock). Release it when the sandbox is gone, or let the process
    exit."""

    def __init__(self, fd: int, resolved: ResolvedTemplate) -> None:
        self._fd: int | None = fd
        self.resolved = resolved

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResolvedTemplate:
        return self.resolved

    def __exit__(self, *exc: object) -> None:
        self.release()


class TemplateStore:
    def __init__(self, root: str | os.PathLike[str] | None = None, *, limits: Limits | None = None,
                 in_use: Callable[[str], str | None] | None = None) -> None:
        if root is None:
            from ..config import HostConfig

            root = HostConfig.from_env().data_dir / "templates"
        self.root = Path(root)
        self.limits = limits or Limits.from_env()
        self._in_use_hook = in_use
        for sub in ("", "layers/sha256", "templates", "locks", "tmp"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    # --- reading ----------------------------------------------------------------------------------
    def _record(self, name: str) -> Path:
        return self.root / "templates" / f"{_stored_name(name)}.json"

    def layer_path(self, diff_id: str) -> Path:
        if not DIGEST_RE.fullmatch(diff_id):
            raise TemplateError(f"layer digest {diff_id!r}: not sha256:<64 hex digits>")
        return self.root / "layers" / "sha256" / diff_id.split(":", 1)[1]

    def has_layer(self, diff_id: str) -> bool:
        return (self.layer_path(diff_id) / "layer.json").is_file()

    def layer_info(self, diff_id: str) -> LayerInfo:
        return LayerInfo.from_json(json.loads((self.layer_path(diff_id) / "layer.json").read_text()))

    def get(self, name: str) -> Template:
        path = self._record(name)
        try:
            return Template.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise TemplateNotFoundError(f"template {name!r} not found (see `stockade template list`)") from None

    def exists(self, name: str) -> bool:
        return self._record(name).exists()

    def list(self) -> list[Template]:
        """The templates (the build cache's records left out: see ``build_cache``)."""
        return [t for t in self._records() if not is_build_cache(t.name)]

    def build_cache(self) -> builtins.list[Template]:
        return [t for t in self._records() if is_build_cache(t.name)]

    def _records(self) -> builtins.list[Template]:
        out = []
        for path in sorted((self.root / "templates").glob("*.json")):
            try:
                out.append(Template.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def resolve(self, name: str) -> ResolvedTemplate:
        """The ordered layer trees and config of a template (without holding it: see ``use``)."""
        template = self.get(name)
        dirs, infos = [], []
        for diff_id in template.layers:
            if not self.has_layer(diff_id):
                raise TemplateError(f"template {name!r}: its layer {diff_id} is missing from the store "
                                    f"({self.layer_path(diff_id)}); import the template again")
            info = self.layer_info(diff_id)
            if info.id_base is None and os.geteuid() == 0:
                # stored before owners were shifted (layers.py): shift it once, in place (idempotent, so two
                # processes doing it at once agree)
                shift_owners(self.layer_path(diff_id) / "tree", info)
                _write_json(self.layer_path(diff_id) / "layer.json", info.to_json())
            dirs.append(self.layer_path(diff_id) / "tree")
            infos.append(info)
        return ResolvedTemplate(template, dirs, infos)

    # --- in use -----------------------------------------------------------------------------------
    def use(self, name: str) -> Lease:
        """Hold the template in use (a shared flock) and resolve it. ``remove`` refuses while held."""
        lock = self.root / "locks" / f"{_stored_name(name)}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return Lease(fd, self.resolve(name))  # after the lock: a concurrent remove either won or waits
        except BaseException:
            os.close(fd)
            raise

    def in_use(self, name: str) -> str | None:
        """Why the template is in use, or None."""
        if self._in_use_hook is not None and (why := self._in_use_hook(name)):
            return why
        lock = self.root / "locks" / f"{_stored_name(name)}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "a sandbox is running from it"
        finally:
            os.close(fd)
        return None

    # --- writing ----------------------------------------------------------------------------------
    @contextmanager
    def importing(self) -> Iterator[None]:
        """Held (shared) while an import runs, so garbage collection cannot take a layer it is reusing."""
        fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def temp_dir(self, prefix: str) -> Path:
        path = self.root / "tmp" / f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        return path

    def add_layer(self, diff_id: str, extract: Callable[[Path], LayerInfo]) -> LayerInfo:
        """Store the layer ``diff_id`` if it is not stored yet: ``extract(tree_dir)`` fills an empty
        directory and returns what it found (it must verify the diff_id). Returns the layer's record."""
        final = self.layer_path(diff_id)
        if self.has_layer(diff_id):
            return self.layer_info(diff_id)
        work = self.temp_dir("layer")
        try:
            tree = work / "tree"
            tree.mkdir(mode=0o755)
            info = extract(tree)
            if info.diff_id != diff_id:
                raise TemplateError(f"layer {diff_id}: extracted content has digest {info.diff_id}")
            if os.geteuid() == 0:
                shift_owners(tree, info)
            _write_json(work / "layer.json", info.to_json())
            os.sync()  # the files, before the rename makes the layer visible (a crash keeps no half layer)
            try:
                os.rename(work, final)
            except OSError:
                if not self.has_layer(diff_id):  # anything but a concurrent import that stored it first
                    raise
            return self.layer_info(diff_id)
        finally:
            remove_tree(work)

    def add_layer_file(self, tar: Path, label: str) -> LayerInfo:
        """Store the uncompressed layer tar ``tar`` written here (a snapshot, a build step, the base
        template's rootfs): its diff_id is its sha256, and it goes through the same checked extraction as
        an image's layer. ``label`` names it in errors, with its digest."""
        digest = hashlib.sha256()
        with open(tar, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        diff_id = "sha256:" + digest.hexdigest()

        def extract(tree: Path) -> LayerInfo:
            with open(tar, "rb") as blob:
                return extract_layer(blob, tree, label=f"{label} ({diff_id[:19]})", limits=self.limits,
                                     diff_id=diff_id)

        return self.add_layer(diff_id, extract)

    def add_template(self, template: Template) -> None:
        """Create the record; refuses a name that exists (templates are immutable)."""
        final = self._record(template.name)
        for diff_id in template.layers:
            if not self.has_layer(diff_id):
                raise TemplateError(f"template {template.name!r}: layer {diff_id} is not in the store")
        tmp = self.root / "tmp" / f"{template.name}.{secrets.token_hex(6)}.json"
        _write_json(tmp, template.to_json())
        try:
            os.link(tmp, final)  # atomic create-if-absent
        except FileExistsError:
            raise TemplateError(f"template {template.name!r} already exists (remove it first with "
                                f"`stockade template rm {template.name}`)") from None
        finally:
            tmp.unlink()
        _fsync_dir(final.parent)

    def replace_template(self, template: Template) -> None:
        """Create the record, or replace the one of that name when no sandbox uses it (a rebuild). The
        layers of the old one stay until garbage collection finds them unused."""
        final = self._record(template.name)
        for diff_id in template.layers:
            if not self.has_layer(diff_id):
                raise TemplateError(f"template {template.name!r}: layer {diff_id} is not in the store")
        with self._exclusive(template.name, "replace"):
            tmp = self.root / "tmp" / f"{template.name}.{secrets.token_hex(6)}.json"
            _write_json(tmp, template.to_json())
            os.rename(tmp, final)
            _fsync_dir(final.parent)

    @contextmanager
    def _exclusive(self, name: str, doing: str) -> Iterator[None]:
        """Hold ``name``'s in-use lock exclusively (no sandbox may start from it meanwhile); refuse at once
        if a sandbox holds it."""
        if self._in_use_hook is not None and (why := self._in_use_hook(name)):
            raise TemplateInUseError(f"template {name!r} is in use ({why}); stop those sandboxes to {doing} it")
        lock = self.root / "locks" / f"{_stored_name(name)}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TemplateInUseError(f"template {name!r} is in use (a sandbox is running from it); stop "
                                         f"those sandboxes to {doing} it") from None
            yield
        finally:
            os.close(fd)

    def prune_build_cache(self) -> builtins.list[str]:
        """Remove the build cache's records no sandbox uses (the next build runs every step again);
        returns their names. ``gc`` then frees their layers."""
        removed = []
        for t in self.build_cache():
            try:
                self.remove(t.name, collect=False)
            except TemplateError:
                continue   # a build is using it
            removed.append(t.name)
        return removed

    def remove(self, name: str, collect: bool = True) -> builtins.list[str]:
        """Remove a template; refuses one in use. Its layers go too unless another template uses them.
        Returns the layers removed."""
        record = self._record(name)
        if not record.exists():
            raise TemplateNotFoundError(f"template {name!r} not found (see `stockade template list`)")
        with self._exclusive(name, "remove"):
            record.unlink()
            _fsync_dir(record.parent)
            (self.root / "locks" / f"{name}.lock").unlink(missing_ok=True)
        return self.gc(wait=False) if collect else []

    def gc(self, wait: bool = True) -> builtins.list[str]:
        """Remove layers no template refers to and leftovers of imports that died. With wait=False,
        does nothing while an import runs (it may be about to use a layer that looks unreferenced)."""
        fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return []
            used = {d for t in self._records() for d in t.layers}
            removed = []
            for path in sorted((self.root / "layers" / "sha256").iterdir()):
                diff_id = f"sha256:{path.name}"
                if diff_id not in used:
                    remove_tree(path)
                    removed.append(diff_id)
            for path in (self.root / "tmp").iterdir():  # no import runs: every temp is a leftover
                remove_tree(path)
            return removed
        finally:
            os.close(fd)

    def size(self, template: Template) -> int:
        return sum(self.layer_info(d).file_bytes for d in template.layers if self.has_layer(d))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> float:
    return time.time()
