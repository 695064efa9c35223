"""Importing OCI and Docker images as templates. Sources use skopeo's transport syntax:

    oci:DIR[:TAG]            an OCI image layout directory
    oci-archive:FILE[:TAG]   a tar of one
    docker-archive:FILE[:REF]  `docker save` output (the legacy layout, and the OCI one Docker 25+ writes)
    docker://HOST/REPO[:TAG|@sha256:DIGEST]   a registry

Local sources are read here, in Python: they are plain files (JSON and tars), and reading them directly
costs nothing to install. Registries go through skopeo (`apt-get install skopeo`), which copies the image
into a temporary ``dir:`` layout inside the store, and is then read like the local sources. Why skopeo and
not a Python client: the maintained Python registry clients on PyPI are `oras` (OCI Registry As Storage:
built for artifacts; it pulls blobs, but leaves Docker manifest lists and media types, registries.conf
mirrors and the auth.json/credential-helper files users have to us), `opencontainers` (spec types, with
an unmaintained distribution client) and `oci-client` (young, small). skopeo is containers/image, the
client podman and CRI-O use: bearer-token and basic auth, auth.json and credential helpers, mirrors,
certificates, retries. It verifies digests, and so does this module, again, on what it reads: the manifest
against the digest asked for, every blob against its descriptor, every layer's uncompressed content
against the config's diff_ids. skopeo copies to ``dir:`` rather than ``oci:`` because ``dir:`` keeps the
registry's manifest bytes as they were, so their digest can be checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import LayerError, TemplateError
from .layers import Limits, check_stack, extract_layer, remove_tree
from .store import DIGEST_RE, Template, TemplateConfig, TemplateStore, check_name

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
MAX_JSON = 4 << 20  # manifests, indexes, configs
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class Progress:
    """One event per layer: ``state`` is "start", "done" or "present" (already in the store)."""

    index: int
    count: int
    digest: str
    state: str
    bytes: int = 0
    entries: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    authfile: str = ""       # a containers auth.json (skopeo/podman format)
    tls_verify: bool = True


SOURCE_PREFIXES = ("oci:", "oci-archive:", "docker-archive:", "docker://")   # what parse_source takes


def parse_source(source: str) -> tuple[str, str, str]:
    """(transport, path or registry reference, tag or ref)."""
    for transport in ("oci-archive", "docker-archive", "oci"):
        if source.startswith(transport + ":"):
            rest = source[len(transport) + 1:]
            path, _, tag = rest.partition(":")
            if not path:
                raise TemplateError(f"image source {source!r}: no path after {transport}:")
            return transport, path, tag
    if source.startswith("docker://"):
        ref = source[len("docker://"):]
        if "/" not in ref or not ref.split("/", 1)[1]:
            raise TemplateError(f"image source {source!r}: use docker://REGISTRY/REPO[:TAG|@sha256:DIGEST]")
        if "@" in ref and not DIGEST_RE.fullmatch(ref.rsplit("@", 1)[1]):
            raise TemplateError(f"image source {source!r}: the digest must be sha256:<64 hex digits>")
        return "docker", ref, ""
    raise TemplateError(f"image source {source!r}: use oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                        "docker-archive:FILE[:REF] or docker://REGISTRY/REPO[:TAG|@DIGEST]")


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x"}.get(machine, machine)


# --- blob readers -----------------------------------------------------------------------------------

class _Blobs:
    """Where blobs come from, by digest (a directory of files, or members of a tar)."""

    source: str

    def open(self, digest: str) -> IO[bytes]:
        raise NotImplementedError

    def read_json(self, digest: str, what: str, size: int | None = None) -> tuple[dict[str, Any], bytes]:
        with self.open(digest) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise TemplateError(f"{self.source}: {what} {digest} is larger than {MAX_JSON} bytes")
        _verify(data, digest, f"{self.source}: {what}")
        if size is not None and len(data) != size:
            raise TemplateError(f"{self.source}: {what} {digest} has {len(data)} bytes, not {size}")
        return _json(data, f"{self.source}: {what} {digest}"), data


def _verify(data: bytes, digest: str, what: str) -> None:
    if not DIGEST_RE.fullmatch(digest):
        raise TemplateError(f"{what}: unsupported digest {digest!r} (sha256 only)")
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise TemplateError(f"{what}: content has digest {got}, not {digest}")


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise TemplateError(f"{what}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TemplateError(f"{what}: not a JSON object")
    return value


class _DirBlobs(_Blobs):
    def __init__(self, root: Path, source: str, layout: str) -> None:
        self.root, self.source, self.layout = root, source, layout

    def open(self, digest: str) -> IO[bytes]:
        if not DIGEST_RE.fullmatch(digest):
            raise TemplateError(f"{self.source}: unsupported digest {digest!r} (sha256 only)")
        hexd = digest.split(":", 1)[1]
        path = self.root / "blobs" / "sha256" / hexd if self.layout == "oci" else self.root / hexd
        try:
            # a layout may come from anywhere: a blob that is a symlink, FIFO or device is refused unread
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TemplateError(f"{self.source}: blob {digest} is missing ({path})") from None
        except OSError as exc:
            raise TemplateError(f"{self.source}: blob {digest} cannot be opened ({path}: {exc.strerror}; "
                                "a blob must be a regular file)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TemplateError(f"{self.source}: blob {digest} is not a regular file ({path})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")


class _TarBlobs(_Blobs):
    def __init__(self, tar: tarfile.TarFile, source: str) -> None:
        self.tar, self.source = tar, source
        self.members = {os.path.normpath(m.name).lstrip("/"): m for m in tar.getmembers() if m.isfile()}

    def member(self, name: str) -> IO[bytes]:
        m = self.members.get(os.path.normpath(name).lstrip("/"))
        f = self.tar.extractfile(m) if m is not None else None
        if f is None:
            raise TemplateError(f"{self.source}: {name} is missing from the archive")
        return f

    def open(self, digest: str) -> IO[bytes]:
        if not DIGEST_RE.fullmatch(digest):
            raise TemplateError(f"{self.source}: unsupported digest {digest!r} (sha256 only)")
        return self.member("blobs/sha256/" + digest.split(":", 1)[1])


@dataclass
class _Image:
    blobs: _Blobs
    manifest_digest: str
    config: dict[str, Any]
    layers: list[tuple[str | None, int | None, str]]  # (blob digest, size, diff_id); digest None: by path
    layer_paths: list[str] | None = None               # docker-archive legacy layers


def _pick_manifest(blobs: _Blobs, index: dict[str, Any], tag: str, source: str) -> dict[str, Any]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise TemplateError(f"{source}: the index lists no manifests")
    if tag:
        chosen = [m for m in manifests if isinstance(m, dict) and m.get("annotations", {}).get(REF_NAME) == tag]
        if not chosen:
            tags = sorted({str(m.get("annotations", {}).get(REF_NAME)) for m in manifests if isinstance(m, dict)})
            raise TemplateError(f"{source}: no image tagged {tag!r} (tags: {', '.join(tags) or 'none'})")
        return dict(chosen[0])
    if len(manifests) > 1:
        tags = sorted({str(m.get("annotations", {}).get(REF_NAME)) for m in manifests if isinstance(m, dict)})
        raise TemplateError(f"{source}: holds {len(manifests)} images; name one with :TAG (tags: {', '.join(tags)})")
    return dict(manifests[0])


def _resolve_platform(blobs: _Blobs, desc: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """Follow image indexes to this machine's linux image; returns (manifest, its digest)."""
    for _ in range(4):
        digest = str(desc.get("digest", ""))
        doc, _raw = blobs.read_json(digest, "manifest", desc.get("size"))
        media = doc.get("mediaType") or desc.get("mediaType") or ""
        if media in (OCI_INDEX, DOCKER_LIST) or ("manifests" in doc and "layers" not in doc):
            arch = _arch()
            fit = [m for m in doc.get("manifests", []) if isinstance(m, dict)
                   and m.get("platform", {}).get("os") == "linux" and m.get("platform", {}).get("architecture") == arch]
            if not fit:
                raise TemplateError(f"{source}: no linux/{arch} image in the index {digest}")
            desc = fit[0]
            continue
        return doc, digest
    raise TemplateError(f"{source}: indexes nested too deeply")


def _image_from_manifest(blobs: _Blobs, manifest: dict[str, Any], digest: str, source: str) -> _Image:
    media = manifest.get("mediaType", OCI_MANIFEST)
    if media not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise TemplateError(f"{source}: manifest {digest} has media type {media!r}: not an image manifest")
    cdesc = manifest.get("config")
    if not isinstance(cdesc, dict):
        raise TemplateError(f"{source}: manifest {digest} has no config")
    config, _ = blobs.read_json(str(cdesc.get("digest")), "image config", cdesc.get("size"))
    diff_ids = config.get("rootfs", {}).get("diff_ids")
    descs = manifest.get("layers")
    if not isinstance(descs, list) or not isinstance(diff_ids, list) or len(descs) != len(diff_ids):
        raise TemplateError(f"{source}: the manifest's layers and the config's rootfs.diff_ids do not match")
    layers: list[tuple[str | None, int | None, str]] = []
    for i, (d, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        if not isinstance(d, dict) or d.get("mediaType") not in LAYER_TYPES:
            raise TemplateError(f"{source}: layer {i + 1} has media type "
                                f"{d.get('mediaType') if isinstance(d, dict) else d!r}: not a layer tar")
        if not isinstance(diff_id, str) or not DIGEST_RE.fullmatch(diff_id):
            raise TemplateError(f"{source}: rootfs.diff_ids[{i}] = {diff_id!r}: not a sha256 digest")
        layers.append((str(d.get("digest")), d.get("size"), diff_id))
    return _Image(blobs, digest, config, layers)


def _open_oci(blobs: _Blobs, index_bytes: bytes, tag: str, source: str) -> _Image:
    index = _json(index_bytes, f"{source}: index.json")
    desc = _pick_manifest(blobs, index, tag, source)
    manifest, digest = _resolve_platform(blobs, desc, source)
    return _image_from_manifest(blobs, manifest, digest, source)


def _open_docker_archive(path: str, ref: str, source: str) -> tuple[_Image, tarfile.TarFile]:
    tar = _open_tar(path, source)
    blobs = _TarBlobs(tar, source)
    with blobs.member("manifest.json") as f:
        raw = f.read(MAX_JSON + 1)
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise TemplateError(f"{source}: manifest.json is not JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise TemplateError(f"{source}: manifest.json lists no images")
    if ref:
        want = ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"
        chosen = [e for e in entries if isinstance(e, dict) and want in (e.get("RepoTags") or [])]
        if not chosen:
            raise TemplateError(f"{source}: no image tagged {want!r}")
        entry = chosen[0]
    elif len(entries) > 1:
        raise TemplateError(f"{source}: holds {len(entries)} images; name one with :REPO:TAG")
    else:
        entry = entries[0]
    with blobs.member(str(entry.get("Config"))) as f:
        cbytes = f.read(MAX_JSON + 1)
    config = _json(cbytes, f"{source}: {entry.get('Config')}")
    diff_ids = config.get("rootfs", {}).get("diff_ids")
    paths = entry.get("Layers")
    if not isinstance(paths, list) or not isinstance(diff_ids, list) or len(paths) != len(diff_ids):
        raise TemplateError(f"{source}: manifest.json's Layers and the config's rootfs.diff_ids do not match")
    for i, d in enumerate(diff_ids):
        if not isinstance(d, str) or not DIGEST_RE.fullmatch(d):
            raise TemplateError(f"{source}: rootfs.diff_ids[{i}] = {d!r}: not a sha256 digest")
    digest = "sha256:" + hashlib.sha256(cbytes).hexdigest()  # a docker-archive's image id
    image = _Image(blobs, digest, config, [(None, None, d) for d in diff_ids], [str(p) for p in paths])
    return image, tar


def _open_tar(path: str, source: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise TemplateError(f"{source}: cannot read the archive: {exc}") from None


# --- registries (skopeo) -----------------------------------------------------------------------------

def _skopeo() -> str:
    found = shutil.which("skopeo")
    if not found:
        raise TemplateError("docker:// sources need skopeo (apt-get install skopeo); or save the image with "
                            "`skopeo copy` / `docker save` and import oci-archive:FILE or docker-archive:FILE")
    return found


def _pull(ref: str, dest: Path, creds: Credentials, source: str) -> _Image:
    skopeo = _skopeo()
    args = [skopeo, "--insecure-policy"]
    common: list[str] = []
    if not creds.tls_verify:
        common.append("--src-tls-verify=false")
    authfile = creds.authfile
    if creds.username:
        # credentials go to skopeo in a file only it reads (0600, inside the store), never on its argv
        authfile = str(dest.parent / "auth.json")
        registry = ref.split("/", 1)[0]
        import base64

        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        fd = os.open(authfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {registry: {"auth": token}}}, f)
    if authfile:
        common.append(f"--src-authfile={authfile}")
    want_digest = ref.rsplit("@", 1)[1] if "@" in ref else ""
    # The manifest the reference names, raw, so its digest is ours to check (and a list's entry chosen here).
    inspect = subprocess.run([*args, "inspect", "--raw", *[c.replace("--src-", "--") for c in common],
                              f"docker://{ref}"], capture_output=True, timeout=600)
    if inspect.returncode != 0:
        raise TemplateError(f"{source}: {inspect.stderr.decode(errors='replace').strip()}")
    raw = inspect.stdout
    if want_digest:
        _verify(raw, want_digest, f"{source}: the registry's manifest")
    top = _json(raw, f"{source}: manifest")
    repo = ref.split("@", 1)[0]
    if top.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or ("manifests" in top and "layers" not in top):
        arch = _arch()
        fit = [m for m in top.get("manifests", []) if isinstance(m, dict)
               and m.get("platform", {}).get("os") == "linux" and m.get("platform", {}).get("architecture") == arch]
        if not fit:
            raise TemplateError(f"{source}: no linux/{arch} image in the index")
        want_digest = str(fit[0].get("digest"))
        name = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
        ref = f"{name}@{want_digest}"
    elif not want_digest:
        want_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    copy = subprocess.run([*args, "copy", "--quiet", *common, f"docker://{ref}", f"dir:{dest}"],
                          capture_output=True, timeout=3600)
    if copy.returncode != 0:
        raise TemplateError(f"{source}: {copy.stderr.decode(errors='replace').strip()}")
    mbytes = (dest / "manifest.json").read_bytes()
    _verify(mbytes, want_digest, f"{source}: the copied manifest")
    blobs = _DirBlobs(dest, source, "dir")
    return _image_from_manifest(blobs, _json(mbytes, f"{source}: manifest"), want_digest, source)


# --- the import ------------------------------------------------------------------------------------------

def _config(image: dict[str, Any], source: str, start: list[str] | None, ready: list[str] | None) -> TemplateConfig:
    cfg = image.get("config") or {}
    if not isinstance(cfg, dict):
        raise TemplateError(f"{source}: the image config's 'config' is not an object")
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        if not isinstance(item, str) or "=" not in item:
            raise TemplateError(f"{source}: config.Env item {item!r} is not NAME=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    labels = cfg.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise TemplateError(f"{source}: config.Labels must map names to strings")
    command: list[str] = []
    for part in ("Entrypoint", "Cmd"):
        value = cfg.get(part) or []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise TemplateError(f"{source}: config.{part} must be a list of strings")
        command += value
    workdir, user = cfg.get("WorkingDir") or "", cfg.get("User") or ""
    if not isinstance(workdir, str) or not isinstance(user, str):
        raise TemplateError(f"{source}: config.WorkingDir and config.User must be strings")
    return TemplateConfig(env=env, working_dir=workdir, user=user, start_command=start, ready_command=ready,
                          labels={str(k): v for k, v in labels.items()}, image_command=command,
                          architecture=str(image.get("architecture", "")), os=str(image.get("os", "")))


def import_image(store: TemplateStore, name: str, source: str, *, credentials: Credentials | None = None,
                 start_command: list[str] | None = None, ready_command: list[str] | None = None,
                 progress: Callable[[Progress], None] | None = None, limits: Limits | None = None) -> Template:
    """Import ``source`` as the template ``name``. Every blob is verified against its digest and every
    layer's content against the config's diff_id; each layer is stored once. Raises TemplateError
    (LayerError for a refused layer) and leaves nothing behind outside the store's tmp/ on failure."""
    check_name(name)
    if store.exists(name):
        raise TemplateError(f"template {name!r} already exists (remove it first with `stockade template rm {name}`)")
    try:
        with store.importing():   # until the record names the layers, garbage collection must not take them
            template = fetch_image(store, source, credentials=credentials, start_command=start_command,
                                   ready_command=ready_command, progress=progress, limits=limits, name=name)
            store.add_template(template)
    except TemplateError:
        store.gc(wait=False)   # the layers this import stored (none are taken while another import runs)
        raise
    return template


def fetch_image(store: TemplateStore, source: str, *, credentials: Credentials | None = None,
                start_command: list[str] | None = None, ready_command: list[str] | None = None,
                progress: Callable[[Progress], None] | None = None, limits: Limits | None = None,
                name: str = "") -> Template:
    """Store ``source``'s layers and return its template record without adding it to the store. Layers no
    record uses are garbage: the caller holds ``store.importing()`` until a record names them."""
    limits = limits or store.limits
    transport, path, tag = parse_source(source)
    try:
        return _import(store, name, source, transport, path, tag, credentials, start_command, ready_command,
                       progress, limits)
    except TemplateError:
        store.gc(wait=False)  # layers this import stored before it failed (none if another import runs)
        raise


def _import(store: TemplateStore, name: str, source: str, transport: str, path: str, tag: str,
            credentials: Credentials | None, start_command: list[str] | None, ready_command: list[str] | None,
            progress: Callable[[Progress], None] | None, limits: Limits) -> Template:
    with store.importing():
        work = store.temp_dir("import")
        tar: tarfile.TarFile | None = None
        try:
            if transport == "oci":
                root = Path(path)
                try:
                    index_bytes = (root / "index.json").read_bytes()
                except OSError as exc:
                    raise TemplateError(f"{source}: not an OCI layout ({exc})") from None
                image = _open_oci(_DirBlobs(root, source, "oci"), index_bytes, tag, source)
            elif transport == "oci-archive":
                tar = _open_tar(path, source)
                blobs = _TarBlobs(tar, source)
                with blobs.member("index.json") as f:
                    image = _open_oci(blobs, f.read(MAX_JSON), tag, source)
            elif transport == "docker-archive":
                image, tar = _open_docker_archive(path, tag, source)
            else:
                image = _pull(path, work / "image", credentials or Credentials(), source)
            return _store_image(store, name, source, image, limits, start_command, ready_command, progress)
        finally:
            if tar is not None:
                tar.close()
            remove_tree(work)


def _store_image(store: TemplateStore, name: str, source: str, image: _Image, limits: Limits,
                 start: list[str] | None, ready: list[str] | None,
                 progress: Callable[[Progress], None] | None) -> Template:
    config = _config(image.config, source, start, ready)
    if config.os and config.os != "linux":
        raise TemplateError(f"{source}: the image is for {config.os}, not linux")
    if config.architecture and config.architecture != _arch():
        raise TemplateError(f"{source}: the image is for {config.architecture}, this machine is {_arch()}")
    count = len(image.layers)
    if count > limits.max_layers:
        raise TemplateError(f"{source}: {count} layers, more than {limits.max_layers} (STOCKADE_TEMPLATE_MAX_LAYERS)")
    total = 0
    infos = []
    for i, (digest, size, diff_id) in enumerate(image.layers):
        label = f"{source}: layer {i + 1}/{count} ({diff_id[:19]})"
        if store.has_layer(diff_id):
            info = store.layer_info(diff_id)
            if progress:
                progress(Progress(i + 1, count, diff_id, "present", info.size, info.entries))
        else:
            if progress:
                progress(Progress(i + 1, count, diff_id, "start"))
            started = time.monotonic()
            left = max(limits.max_image_bytes - total, 0)
            layer_limits = Limits(**{**limits.__dict__, "max_layer_bytes": min(limits.max_layer_bytes, left)})

            def extract(tree: Path, digest: str | None = digest, size: Any = size, diff_id: str = diff_id,
                        index: int = i, label: str = label, layer_limits: Limits = layer_limits) -> Any:
                if digest is None:
                    assert image.layer_paths is not None and isinstance(image.blobs, _TarBlobs)
                    blob = image.blobs.member(image.layer_paths[index])
                else:
                    blob = image.blobs.open(digest)
                with blob:
                    return extract_layer(blob, tree, label=label, limits=layer_limits, diff_id=diff_id,
                                         digest=digest, blob_size=size if isinstance(size, int) else None)

            try:
                info = store.add_layer(diff_id, extract)
            except LayerError as exc:
                if left < limits.max_layer_bytes and exc.reason.startswith(
                        ("the uncompressed layer is larger than", "the layer's files add up to")):
                    raise TemplateError(f"{label}: the image is larger than {limits.max_image_bytes} bytes "
                                        "uncompressed (STOCKADE_TEMPLATE_MAX_IMAGE_SIZE)") from None
                raise
            if progress:
                progress(Progress(i + 1, count, diff_id, "done", info.size, info.entries,
                                  time.monotonic() - started))
        total += max(info.size, info.file_bytes)
        if total > limits.max_image_bytes:
            raise TemplateError(f"{source}: the image is larger than {limits.max_image_bytes} bytes uncompressed "
                                "(STOCKADE_TEMPLATE_MAX_IMAGE_SIZE)")
        infos.append(info)
    diff_ids = [d for _, _, d in image.layers]
    labels = [f"{source}: layer {i + 1}/{count} ({d[:19]})" for i, d in enumerate(diff_ids)]
    check_stack([str(store.layer_path(d) / "tree") for d in diff_ids], infos, labels)
    template = Template(name=name, layers=diff_ids, config=config, source=source, digest=image.manifest_digest,
                        created=time.time(), size=sum(i.file_bytes for i in infos))
    return template
