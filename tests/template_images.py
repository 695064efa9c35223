"""Images built by the tests themselves: layer tars, OCI layouts, OCI and docker-save archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import tarfile
from pathlib import Path
from typing import Any

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def entry(kind: str, name: str, data: bytes = b"", *, mode: int | None = None, target: str = "",
          uid: int = 0, gid: int = 0, major: int = 0, minor: int = 0, size: int | None = None
          ) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                 "fifo": tarfile.FIFOTYPE}[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.linkname = target
    info.uid, info.gid = uid, gid
    info.devmajor, info.devminor = major, minor
    info.mtime = 1_700_000_000
    if kind == "file":
        info.size = len(data) if size is None else size
    return info, data


def layer(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers: list[bytes], **config: Any) -> bytes:
    return json.dumps({"architecture": ARCH, "os": "linux", "config": config,
                       "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]}}).encode()


def oci_blobs(layers: list[bytes], compress: str = "gzip", **config: Any) -> tuple[dict[str, bytes], bytes]:
    """All blobs of one image (digest -> bytes) and its manifest."""
    blobs: dict[str, bytes] = {}
    descs = []
    for t in layers:
        if compress == "gzip":
            blob, media = gzip.compress(t, compresslevel=1, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compress == "zstd":
            import zstandard

            blob, media = zstandard.ZstdCompressor().compress(t), "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, media = t, "application/vnd.oci.image.layer.v1.tar"
        blobs[sha(blob)] = blob
        descs.append({"mediaType": media, "digest": sha(blob), "size": len(blob)})
    cfg = image_config(layers, **config)
    blobs[sha(cfg)] = cfg
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(cfg), "size": len(cfg)},
                           "layers": descs}).encode()
    blobs[sha(manifest)] = manifest
    return blobs, manifest


def oci_layout(root: Path, layers: list[bytes], tag: str = "latest", compress: str = "gzip",
               **config: Any) -> str:
    """Write an OCI image layout; returns the manifest digest."""
    blobs, manifest = oci_blobs(layers, compress, **config)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for digest, data in blobs.items():
        (root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "digest": sha(manifest), "size": len(manifest),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return sha(manifest)


def tar_dir(src: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(src)), recursive=False)


def docker_archive(dest: Path, layers: list[bytes], repo_tag: str = "example/app:latest", **config: Any) -> None:
    cfg = image_config(layers, **config)
    with tarfile.open(dest, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        names = []
        for i, t in enumerate(layers):
            names.append(f"{i:02d}{'0' * 62}/layer.tar")
            add(names[-1], t)
        cfg_name = sha(cfg).split(":")[1] + ".json"
        add(cfg_name, cfg)
        add("manifest.json", json.dumps([{"Config": cfg_name, "RepoTags": [repo_tag], "Layers": names}]).encode())


def oci_multiarch_layout(root: Path, per_arch: dict[str, list[bytes]], tag: str = "latest",
                         **config: Any) -> tuple[str, dict[str, str]]:
    """An OCI layout whose tag names an image index with one image per architecture. Returns the index's
    digest and each architecture's manifest digest."""
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    entries, digests = [], {}
    for arch, layers in per_arch.items():
        blobs, manifest = oci_blobs(layers, "gzip", **config)
        cfg_digest = json.loads(manifest)["config"]["digest"]
        cfg = json.loads(blobs.pop(cfg_digest))
        cfg["architecture"] = arch
        cbytes = json.dumps(cfg).encode()
        m = json.loads(manifest)
        m["config"].update(digest=sha(cbytes), size=len(cbytes))
        mbytes = json.dumps(m).encode()
        blobs.pop(sha(manifest))
        blobs[sha(cbytes)], blobs[sha(mbytes)] = cbytes, mbytes
        for digest, data in blobs.items():
            (root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(mbytes),
                        "size": len(mbytes), "platform": {"os": "linux", "architecture": arch}})
        digests[arch] = sha(mbytes)
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    (root / "blobs" / "sha256" / sha(index).split(":")[1]).write_bytes(index)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha(index), "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return sha(index), digests


# --- images sandboxes run from (tests/test_template_sandbox.py, tests/test_snapshots.py) ---------------
# The host's dash as /bin/sh and cat, with the C library and loader they need, a few files, a world-writable
# file under /usr/bin and a sticky world-writable directory. No python in it.
def _host(path: str) -> bytes:
    return Path(os.path.realpath(path)).read_bytes()


def image_layers_entries() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        entry("dir", "bin"), entry("file", "bin/sh", _host("/bin/dash"), mode=0o755),
        entry("file", "bin/cat", _host("/bin/cat"), mode=0o755),
        entry("dir", "lib"), entry("dir", "lib/x86_64-linux-gnu"),
        entry("file", "lib/x86_64-linux-gnu/libc.so.6", _host("/lib/x86_64-linux-gnu/libc.so.6"), mode=0o755),
        entry("dir", "lib64"),
        entry("file", "lib64/ld-linux-x86-64.so.2", _host("/lib64/ld-linux-x86-64.so.2"), mode=0o755),
        entry("dir", "etc"), entry("file", "etc/hello", b"from the image\n"),
        entry("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")]


def image_layers() -> list[bytes]:
    base = layer(*image_layers_entries())
    top = layer(
        entry("dir", "usr"), entry("dir", "usr/bin"),
        entry("file", "usr/bin/tool", b"#!/bin/sh\necho original tool\n", mode=0o777),
        entry("dir", "srv"), entry("dir", "srv/app", mode=0o1777),
        entry("file", "srv/app/readme", b"the app\n"),
        entry("file", "etc/.wh.hello"), entry("file", "etc/hello", b"from the top layer\n"))
    return [base, top]


_PASSWD = b"root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\napp:x:1500:1500::/srv:/bin/sh\n"


def user_image_layers() -> list[bytes]:
    entries = [e for e in image_layers_entries() if e[0].name != "etc/passwd"]
    return [layer(*entries, entry("file", "etc/passwd", _PASSWD),
                  entry("file", "etc/group", b"root:x:0:\nnode:x:1000:\napp:x:1500:\n"),
                  entry("dir", "home"), entry("dir", "home/node", uid=1000, gid=1000),
                  entry("file", "home/node/app.txt", b"node's\n", uid=1000, gid=1000),
                  entry("file", "etc/rootfile", b"root's\n"))]


def tools_layer(*tools: str) -> bytes:
    """A layer with the host's ``tools`` (coreutils: mkdir, ls, ...) in /bin and the libraries they need."""
    import shutil
    import subprocess

    entries, libs = [], {}
    for tool in tools:
        path = shutil.which(tool)
        assert path, tool
        entries.append(entry("file", f"bin/{tool}", _host(path), mode=0o755))
        for line in subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/") and parts[0] != "libc.so.6":
                libs[parts[0]] = parts[2]
    entries += [entry("file", f"lib/x86_64-linux-gnu/{name}", _host(src), mode=0o755) for name, src in libs.items()]
    return layer(entry("dir", "bin"), entry("dir", "lib"), entry("dir", "lib/x86_64-linux-gnu"), *entries)
