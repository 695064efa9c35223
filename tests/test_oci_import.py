"""Importing each image transport: an OCI layout, an OCI archive, a docker-save archive, and a registry
(Debian's docker-registry, the distribution registry, started here on 127.0.0.1 with htpasswd basic auth;
images pushed with skopeo) by tag and by digest; wrong digests are refused."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.templates import Credentials, TemplateError, TemplateStore, import_image, parse_source

from .template_images import ARCH, docker_archive, entry, layer, oci_layout, oci_multiarch_layout, tar_dir

LAYERS = [layer(entry("dir", "etc"), entry("file", "etc/os-release", b"ID=test\n"),
                entry("dir", "usr/bin"), entry("file", "usr/bin/tool", b"#!/bin/sh\n", mode=0o755)),
          layer(entry("file", "etc/.wh.os-release"), entry("file", "app/main.py", b"print(1)\n"))]
CONFIG = {"Env": ["PATH=/usr/bin", "APP=1"], "WorkingDir": "/app", "User": "1000",
          "Cmd": ["python3", "main.py"], "Labels": {"org.example": "yes"}}


def _check(store: TemplateStore, name: str) -> None:
    r = store.resolve(name)
    assert len(r.layer_dirs) == 2
    assert (r.layer_dirs[0] / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert (r.layer_dirs[1] / "app/main.py").read_bytes() == b"print(1)\n"
    assert r.layer_infos[1].whiteouts == ["etc/os-release"]
    c = r.config
    assert c.env == {"PATH": "/usr/bin", "APP": "1"} and c.working_dir == "/app" and c.user == "1000"
    assert c.image_command == ["python3", "main.py"] and c.labels == {"org.example": "yes"}
    assert c.start_command is None


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_oci_layout(tmp_path: Path, compress: str) -> None:
    digest = oci_layout(tmp_path / "img", LAYERS, tag="v1", compress=compress, **CONFIG)
    store = TemplateStore(tmp_path / "store")
    events = []
    t = import_image(store, "app", f"oci:{tmp_path}/img:v1", progress=events.append)
    assert t.digest == digest and t.source == f"oci:{tmp_path}/img:v1"
    _check(store, "app")
    assert [(e.index, e.state) for e in events] == [(1, "start"), (1, "done"), (2, "start"), (2, "done")]
    # the same layers again: stored once, reported as present
    events.clear()
    import_image(store, "app2", f"oci:{tmp_path}/img", progress=events.append)  # one image: no tag needed
    assert [e.state for e in events] == ["present", "present"]


def test_oci_layout_tags(tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", LAYERS, tag="v1", **CONFIG)
    oci_layout(tmp_path / "img", LAYERS[:1], tag="v2", **CONFIG)
    store = TemplateStore(tmp_path / "store")
    with pytest.raises(TemplateError, match="holds 2 images; name one with :TAG"):
        import_image(store, "x", f"oci:{tmp_path}/img")
    with pytest.raises(TemplateError, match="no image tagged 'v3'"):
        import_image(store, "x", f"oci:{tmp_path}/img:v3")
    assert len(import_image(store, "x", f"oci:{tmp_path}/img:v2").layers) == 1


OTHER_ARCH = "arm64" if ARCH != "arm64" else "amd64"


def test_an_image_index_picks_this_machines_image(tmp_path: Path) -> None:
    _, digests = oci_multiarch_layout(tmp_path / "img", {OTHER_ARCH: [layer(entry("file", "wrong", b"x"))],
                                                         ARCH: LAYERS}, **CONFIG)
    store = TemplateStore(tmp_path / "store")
    t = import_image(store, "app", f"oci:{tmp_path}/img")
    assert t.digest == digests[ARCH]
    _check(store, "app")
    oci_multiarch_layout(tmp_path / "other", {OTHER_ARCH: LAYERS}, **CONFIG)
    with pytest.raises(TemplateError, match=f"no linux/{ARCH} image in the index"):
        import_image(store, "x", f"oci:{tmp_path}/other")


def test_oci_archive(tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", LAYERS, tag="latest", **CONFIG)
    tar_dir(tmp_path / "img", tmp_path / "img.tar")
    store = TemplateStore(tmp_path / "store")
    import_image(store, "app", f"oci-archive:{tmp_path}/img.tar:latest")
    _check(store, "app")


def test_docker_archive(tmp_path: Path) -> None:
    docker_archive(tmp_path / "save.tar", LAYERS, "example/app:1.0", **CONFIG)
    store = TemplateStore(tmp_path / "store")
    import_image(store, "app", f"docker-archive:{tmp_path}/save.tar")
    _check(store, "app")
    with pytest.raises(TemplateError, match="no image tagged 'example/app:2.0'"):
        import_image(store, "other", f"docker-archive:{tmp_path}/save.tar:example/app:2.0")


def test_source_syntax_errors_name_the_fix() -> None:
    for bad in ("ubuntu", "oci:", "docker://nohost", "docker://h/r@sha256:short", "dir:/x"):
        with pytest.raises(TemplateError, match="image source"):
            parse_source(bad)
    assert parse_source("docker://127.0.0.1:5000/a/b:1") == ("docker", "127.0.0.1:5000/a/b:1", "")


def test_a_missing_or_broken_source_is_refused(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "store")
    with pytest.raises(TemplateError, match="not an OCI layout"):
        import_image(store, "x", f"oci:{tmp_path}/nothing")
    oci_layout(tmp_path / "img", LAYERS, **CONFIG)
    blob = next(p for p in (tmp_path / "img" / "blobs" / "sha256").iterdir() if p.read_bytes()[:2] == b"\x1f\x8b")
    blob.unlink()
    os.mkfifo(blob)  # a hostile layout: a blob that would block a reader
    with pytest.raises(TemplateError, match="not a regular file"):
        import_image(store, "x", f"oci:{tmp_path}/img")
    blob.unlink()
    blob.symlink_to("/dev/zero")
    with pytest.raises(TemplateError, match="a blob must be a regular file"):
        import_image(store, "x", f"oci:{tmp_path}/img")
    (tmp_path / "junk.tar").write_bytes(b"junk")
    with pytest.raises(TemplateError, match="cannot read the archive"):
        import_image(store, "x", f"docker-archive:{tmp_path}/junk.tar")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


# --- a real registry -------------------------------------------------------------------------------

REGISTRY = shutil.which("docker-registry") or shutil.which("registry")
SKOPEO = shutil.which("skopeo")
needs_registry = pytest.mark.skipif(not (REGISTRY and SKOPEO),
                                    reason="needs skopeo and docker-registry (apt-get install skopeo docker-registry)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import bcrypt

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    port = _free_port()
    root = tmp_path / "registry"
    root.mkdir()
    (root / "htpasswd").write_text("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode() + "\n")
    (root / "config.yml").write_text(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {root}/data
http:
  addr: 127.0.0.1:{port}
auth:
  htpasswd:
    realm: stockade-test
    path: {root}/htpasswd
""")
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([str(REGISTRY), "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                                stderr=log)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, (root / "log").read_text()
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _push(src: str, dest: str) -> None:
    out = subprocess.run([str(SKOPEO), "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                          "--dest-creds", "alice:s3cret", src, dest], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _manifest_digest(ref: str) -> str:
    out = subprocess.run([str(SKOPEO), "inspect", "--tls-verify=false", "--creds", "alice:s3cret",
                          "--format", "{{.Digest}}", ref], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@needs_registry
def test_registry_by_tag_and_by_digest_with_basic_auth(tmp_path: Path, registry: str) -> None:
    oci_layout(tmp_path / "img", LAYERS, tag="v1", **CONFIG)
    _push(f"oci:{tmp_path}/img:v1", f"docker://{registry}/team/app:v1")
    store = TemplateStore(tmp_path / "store")
    creds = Credentials(username="alice", password="s3cret", tls_verify=False)
    t = import_image(store, "bytag", f"docker://{registry}/team/app:v1", credentials=creds)
    _check(store, "bytag")
    digest = _manifest_digest(f"docker://{registry}/team/app:v1")
    assert t.digest == digest
    t2 = import_image(store, "bydigest", f"docker://{registry}/team/app@{digest}", credentials=creds)
    assert t2.layers == t.layers and t2.digest == digest
    # the password never reached skopeo's command line, and no auth file is left behind
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


@needs_registry
def test_registry_image_index_by_tag_and_by_digest(tmp_path: Path, registry: str) -> None:
    index, digests = oci_multiarch_layout(tmp_path / "img", {OTHER_ARCH: [layer(entry("file", "wrong", b"x"))],
                                                             ARCH: LAYERS}, tag="multi", **CONFIG)
    out = subprocess.run([str(SKOPEO), "--insecure-policy", "copy", "--all", "--quiet", "--dest-tls-verify=false",
                          "--dest-creds", "alice:s3cret", f"oci:{tmp_path}/img:multi",
                          f"docker://{registry}/team/multi:1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    store = TemplateStore(tmp_path / "store")
    creds = Credentials(username="alice", password="s3cret", tls_verify=False)
    t = import_image(store, "bytag", f"docker://{registry}/team/multi:1", credentials=creds)
    assert t.digest == digests[ARCH]
    _check(store, "bytag")
    t2 = import_image(store, "byindex", f"docker://{registry}/team/multi@{index}", credentials=creds)
    assert t2.digest == digests[ARCH] and t2.layers == t.layers


@needs_registry
def test_registry_refuses_wrong_credentials_and_wrong_digests(tmp_path: Path, registry: str) -> None:
    oci_layout(tmp_path / "img", LAYERS, tag="v1", **CONFIG)
    _push(f"oci:{tmp_path}/img:v1", f"docker://{registry}/team/app:v1")
    store = TemplateStore(tmp_path / "store")
    with pytest.raises(TemplateError, match="unauthorized|authentication required"):
        import_image(store, "x", f"docker://{registry}/team/app:v1", credentials=Credentials(tls_verify=False))
    with pytest.raises(TemplateError, match="unauthorized|authentication required|invalid username"):
        import_image(store, "x", f"docker://{registry}/team/app:v1",
                     credentials=Credentials(username="alice", password="wrong", tls_verify=False))
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TemplateError, match="manifest unknown|not found|0000000000"):
        import_image(store, "x", f"docker://{registry}/team/app@{wrong}",
                     credentials=Credentials(username="alice", password="s3cret", tls_verify=False))
    assert store.list() == [] and list((tmp_path / "store" / "layers" / "sha256").iterdir()) == []
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert not os.path.exists(tmp_path / "store" / "auth.json")


def test_a_registry_manifest_that_does_not_match_the_digest_asked_for_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # skopeo checks this too; stockade checks it again on the bytes it reads. A stand-in skopeo that
    # answers with another manifest shows stockade's own check.
    fake = tmp_path / "bin" / "skopeo"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf \'{"schemaVersion":2,"layers":[]}\'\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    store = TemplateStore(tmp_path / "store")
    wanted = "sha256:" + "ab" * 32
    with pytest.raises(TemplateError, match=f"content has digest sha256:[0-9a-f]{{64}}, not {wanted}"):
        import_image(store, "x", f"docker://127.0.0.1:1/app@{wanted}")


def test_cli_import_list_show_rm(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from stockade.cli import app

    oci_layout(tmp_path / "img", LAYERS, tag="v1", **CONFIG)
    tar_dir(tmp_path / "img", tmp_path / "img.tar")
    store = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    out = runner.invoke(app, ["template", "import", "app", f"oci-archive:{tmp_path}/img.tar", *store,
                              "--start-cmd", "python3 -m http.server 8000"])
    assert out.exit_code == 0, out.output
    assert "layer 1/2" in out.output and "layer 2/2" in out.output and "template app: 2 layers" in out.output
    out = runner.invoke(app, ["template", "list", *store])
    assert out.exit_code == 0 and out.output.startswith("app ")
    out = runner.invoke(app, ["template", "show", "app", *store])
    shown = json.loads(out.output)
    assert shown["config"]["start_command"] == ["python3", "-m", "http.server", "8000"]
    assert len(shown["layer_dirs"]) == 2 and shown["in_use"] is None
    # a hostile layer: the error names the source, the layer, the entry and why
    oci_layout(tmp_path / "bad", [layer(entry("file", "ok", b"1")),
                                  layer(entry("hardlink", "p", target="/etc/passwd"))])
    out = runner.invoke(app, ["template", "import", "bad", f"oci:{tmp_path}/bad", *store])
    assert out.exit_code == 2
    assert "layer 2/2 (sha256:" in out.output and "entry 'p': absolute hard link target" in out.output
    out = runner.invoke(app, ["template", "rm", "app", *store])
    assert out.exit_code == 0 and "2 layers freed" in out.output
    out = runner.invoke(app, ["template", "show", "app", *store])
    assert out.exit_code == 2 and "template 'app' not found" in out.output


# --- token auth: the registry trusts a token server started here (RS256 JWTs, a self-signed cert) -------

class _TokenServer:
    """The token endpoint of the registry's bearer-token flow: checks basic auth, grants what was asked."""

    def __init__(self, root: Path) -> None:
        import datetime
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stockade-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(hours=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.bundle = root / "token.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.issued: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                import base64
                from urllib.parse import parse_qs, urlparse

                query = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok = auth.startswith("Basic ") and base64.b64decode(auth[6:]) == b"bob:t0ken-pass"
                if not ok:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, repo, actions = scope.split(":")
                    access.append({"type": kind, "name": repo, "actions": actions.split(",")})
                token = outer.token(query.get("service", [""])[0], access)
                outer.issued.append(token)
                body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        import json

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, service: str, access: list[dict[str, object]]) -> str:
        import base64
        import json
        import secrets
        import time

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": "stockade-test-issuer", "sub": "bob", "aud": service, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@needs_registry
def test_registry_with_token_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "registry"
    root.mkdir()
    tokens = _TokenServer(root)
    port = _free_port()
    (root / "config.yml").write_text(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {root}/data
http:
  addr: 127.0.0.1:{port}
auth:
  token:
    realm: {tokens.url}
    service: stockade-test-registry
    issuer: stockade-test-issuer
    rootcertbundle: {tokens.bundle}
""")
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([str(REGISTRY), "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                                stderr=log)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, (root / "log").read_text()
                time.sleep(0.05)
        registry = f"127.0.0.1:{port}"
        oci_layout(tmp_path / "img", LAYERS, tag="v1", **CONFIG)
        out = subprocess.run([str(SKOPEO), "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                              "--dest-creds", "bob:t0ken-pass", f"oci:{tmp_path}/img:v1",
                              f"docker://{registry}/team/app:v1"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr + (root / "log").read_text()
        store = TemplateStore(tmp_path / "store")
        pushed = len(tokens.issued)
        with pytest.raises(TemplateError, match="unauthorized|authentication required|401"):
            import_image(store, "x", f"docker://{registry}/team/app:v1", credentials=Credentials(tls_verify=False))
        import_image(store, "app", f"docker://{registry}/team/app:v1",
                     credentials=Credentials(username="bob", password="t0ken-pass", tls_verify=False))
        _check(store, "app")
        assert len(tokens.issued) > pushed        # the pull went through the token server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        tokens.close()


def test_a_docker_archive_cannot_name_files_outside_itself(tmp_path: Path) -> None:
    import io
    import json
    import tarfile

    docker_archive(tmp_path / "save.tar", LAYERS, **CONFIG)
    with tarfile.open(tmp_path / "save.tar") as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    store = TemplateStore(tmp_path / "store")
    for key, value in (("Layers", ["../../../../etc/passwd", manifest[0]["Layers"][1]]), ("Config", "/etc/passwd")):
        hostile = [{**manifest[0], key: value}]
        with tarfile.open(tmp_path / "hostile.tar", "w") as out, tarfile.open(tmp_path / "save.tar") as tf:
            for m in tf.getmembers():
                data = (json.dumps(hostile).encode() if m.name == "manifest.json"
                        else tf.extractfile(m).read())  # type: ignore[union-attr]
                m.size = len(data)
                out.addfile(m, io.BytesIO(data))
        with pytest.raises(TemplateError, match="etc/passwd is missing from the archive"):
            import_image(store, "x", f"docker-archive:{tmp_path}/hostile.tar")
    assert list((tmp_path / "store" / "layers" / "sha256").iterdir()) == []


def test_concurrent_imports_of_the_same_layers_store_them_once(tmp_path: Path) -> None:
    import threading

    oci_layout(tmp_path / "img", LAYERS, **CONFIG)
    store = TemplateStore(tmp_path / "store")
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            import_image(TemplateStore(tmp_path / "store"), name, f"oci:{tmp_path}/img")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(t.name for t in store.list()) == ["t0", "t1", "t2", "t3"]
    assert len(list((tmp_path / "store" / "layers" / "sha256").iterdir())) == 2
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    for name in ("t0", "t1", "t2", "t3"):
        _check(store, name)
