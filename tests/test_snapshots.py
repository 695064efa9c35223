"""Snapshots: a template sandbox's files saved as a new template, on every runtime that runs templates as
root. What a snapshot keeps (new, changed and deleted files, /home/user, owners, links), what it never
takes (the host's files through a sandbox's symlinks, even swapped in during the walk; setuid bits;
stockade's own mount points), the errors, and a server's snapshots being its tenant's only."""

from __future__ import annotations

import io
import os
import secrets
import socket
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stockade import Sandbox
from stockade.errors import PolicyError, UnenforceableError
from stockade.runtime.registry import runtime_class
from stockade.templates import Limits, TemplateError, TemplateStore, import_image
from stockade.templates.layers import STORE_ID_BASE
from stockade.templates.snapshot import SnapshotSource, write_layer

from . import template_images as ti
from .conformance.conftest import RUNTIMES_UNDER_TEST, usable_runtime
from .conftest import base_policy

ROOT = os.geteuid() == 0
TOOLS = ("mkdir", "ln", "chmod", "rm", "mv", "ls", "seq")


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore()


@pytest.fixture(scope="module")
def template(store: TemplateStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"test-snapbase-{secrets.token_hex(4)}"
    img = tmp_path_factory.mktemp("img")
    cfg = ti.layer(ti.entry("dir", "home"), ti.entry("dir", "home/node", uid=1000, gid=1000),
                   ti.entry("dir", "home/node/cfg", uid=1000, gid=1000),
                   ti.entry("file", "home/node/cfg/old", b"old\n", uid=1000, gid=1000))
    layers = [*ti.user_image_layers(), ti.tools_layer(*TOOLS), cfg]
    ti.oci_layout(img, layers, Env=["PATH=/usr/bin:/bin", "FROM_IMAGE=yes"], User="node", WorkingDir="/home/node")
    import_image(store, name, f"oci:{img}")
    yield name
    for t in store.list():
        if t.name.startswith(f"{name}-") or t.name.startswith("test-snap-"):
            store.remove(t.name)
    store.remove(name)


@pytest.fixture(params=RUNTIMES_UNDER_TEST)
def runtime(request: pytest.FixtureRequest) -> str:
    usable_runtime(request.param)
    if not ROOT:
        pytest.skip("snapshots need root (test_unprivileged_snapshots_are_refused_saying_why checks why)")
    return str(request.param)


def _run(sb: Sandbox, script: str) -> str:
    r = sb.commands.run(["/bin/sh", "-c", script])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout


def _no_work_left(store: TemplateStore) -> None:
    assert list((store.root / "tmp").iterdir()) == []


CHANGES = """
set -e
echo new > /home/node/new.txt
echo more >> /home/node/app.txt
mkdir -p /srv && echo mine > /srv/mine
mkdir -p /srv/tree/deep && echo deep > /srv/tree/deep/f && chmod 0750 /srv/tree
ln -s /etc/shadow /srv/link-to-host-path
echo linked > /srv/hard1 && ln /srv/hard1 /srv/hard2
echo work > /home/user/work.txt && mkdir -p /home/user/proj && echo code > /home/user/proj/main.c
echo s > /home/node/suid && chmod 4755 /home/node/suid
echo tmp > /tmp/scratch
"""


def test_a_snapshot_keeps_the_sandbox_files_and_a_new_sandbox_starts_from_them(store: TemplateStore,
                                                                              template: str, runtime: str) -> None:
    with Sandbox.create(policy=base_policy(), template=template, runtime=runtime) as sb:
        _run(sb, CHANGES)
        name = sb.snapshot(f"{template}-{runtime}")
        assert name == f"{template}-{runtime}"
        _run(sb, "echo after > /home/node/after.txt")   # the sandbox runs on, and later writes are not in it
    _no_work_left(store)
    snap = store.get(name)
    base = store.get(template)
    assert snap.layers[:-1] == base.layers and len(snap.layers) == len(base.layers) + 1
    assert snap.config == base.config and f"from template {template}" in snap.source
    with Sandbox.create(policy=base_policy(), template=name, runtime=runtime) as sb:
        out = _run(sb, "cat /home/node/new.txt /home/node/app.txt /srv/mine /srv/tree/deep/f /srv/hard2 "
                       "/home/user/work.txt /home/user/proj/main.c")
        assert out == "new\nnode's\nmore\nmine\ndeep\nlinked\nwork\ncode\n"
        assert _run(sb, "echo $FROM_IMAGE; pwd; cat /proc/self/status") .startswith("yes\n/home/node\n")
        assert "Uid:\t1000\t" in _run(sb, "cat /proc/self/status")
        assert _run(sb, "ls /home/node/after.txt 2>&1 || true").strip().endswith("No such file or directory")
        assert _run(sb, "ls /tmp") == ""                                     # /tmp is not kept
        _run(sb, "echo again >> /home/node/new.txt")                         # still the user's to write
        r = sb.commands.run(["/bin/sh", "-c", "echo x > /etc/rootfile"])
        assert r.exit_code != 0                                              # root's stay root's
    layer = store.layer_path(snap.layers[-1]) / "tree"
    st = (layer / "home" / "node" / "suid").stat()
    assert not st.st_mode & stat.S_ISUID                                     # setuid stripped
    assert (st.st_uid, st.st_gid) == (STORE_ID_BASE + 1000, STORE_ID_BASE + 1000)   # the image's node, shifted
    assert os.readlink(layer / "srv" / "link-to-host-path") == "/etc/shadow"  # a symlink, never its target
    assert (layer / "srv" / "hard1").stat().st_ino == (layer / "srv" / "hard2").stat().st_ino
    assert stat.S_IMODE((layer / "srv" / "tree").stat().st_mode) == 0o750
    assert not (layer / "opt" / "stockade").exists() and not (layer / "proc").exists()
    # the template it came from is unchanged
    with Sandbox.create(policy=base_policy(), template=template, runtime=runtime) as sb:
        assert _run(sb, "cat /home/node/app.txt") == "node's\n"
        assert _run(sb, "ls /home/user") == ""


def test_a_deletion_and_a_replaced_directory_are_kept_as_whiteouts(template: str, runtime: str,
                                                                   store: TemplateStore) -> None:
    with Sandbox.create(policy=base_policy(), template=template, runtime=runtime) as sb:
        _run(sb, "rm /home/node/app.txt && rm -r /home/node/cfg && mkdir /home/node/cfg && "
                 "echo fresh > /home/node/cfg/only")
        name = sb.snapshot()
    assert name.startswith(f"{template}-snap-")
    with Sandbox.create(policy=base_policy(), template=name, runtime=runtime) as sb:
        assert _run(sb, "ls /home/node/app.txt 2>&1 || true").strip().endswith("No such file or directory")
        assert _run(sb, "ls /home/node/cfg") == "only\n"     # the image's cfg/old stays hidden (opaque)
    # a snapshot of a snapshot stacks one more layer
    with Sandbox.create(policy=base_policy(), template=name, runtime=runtime) as sb:
        _run(sb, "echo third > /home/node/cfg/third")
        second = sb.snapshot()
    assert len(store.get(second).layers) == len(store.get(name).layers) + 1
    with Sandbox.create(policy=base_policy(), template=second, runtime=runtime) as sb:
        assert _run(sb, "ls /home/node/cfg") == "only\nthird\n"


def test_a_symlink_swapped_in_during_the_walk_never_takes_a_host_file(template: str, runtime: str,
                                                                      store: TemplateStore, shared_dir: Path) -> None:
    """The sandbox swaps a regular file and a symlink to a host path, as fast as it can, while the host
    walks its layer: the snapshot fails or keeps the symlink, and the host file's content is in no layer."""
    secret = f"host-secret-{secrets.token_hex(8)}"
    host_file = shared_dir / "secret"
    host_file.write_text(secret)
    script = (f"while :; do echo data > /home/node/w/f.tmp; mv /home/node/w/f.tmp /home/node/w/swap; "
              f"ln -sf {host_file} /home/node/w/l; mv -T /home/node/w/l /home/node/w/swap; done")
    outcomes = set()
    with Sandbox.create(policy=base_policy(), template=template, runtime=runtime) as sb:
        _run(sb, "mkdir /home/node/w && for i in $(seq 200); do echo $i > /home/node/w/many$i; done")
        sb.commands.run(["/bin/sh", "-c", script], background=True)
        for _ in range(8):
            try:
                name = sb.snapshot()
                outcomes.add("saved")
                layer = store.layer_path(store.get(name).layers[-1]) / "tree"
                for path in layer.rglob("*"):
                    if path.is_file() and not path.is_symlink():
                        assert secret.encode() not in path.read_bytes(), path
            except TemplateError as exc:
                outcomes.add("refused")
                assert "while the snapshot was taken" in str(exc)
    assert outcomes
    _no_work_left(store)


def test_a_snapshot_needs_a_template_sandbox_and_a_valid_free_name(template: str, runtime: str,
                                                                   store: TemplateStore) -> None:
    with Sandbox.create(policy=base_policy(), runtime=runtime) as sb:
        with pytest.raises(PolicyError) as err:
            sb.snapshot("test-snap-x")
        assert err.value.field == "template" and "only a sandbox started from a template" in str(err.value)
    with Sandbox.create(policy=base_policy(), template=template, runtime=runtime) as sb:
        for bad in ("Bad Name", "../x", "", "x" * 65):
            with pytest.raises(PolicyError) as err:
                sb.snapshot(bad)
            assert err.value.field == "name"
        with pytest.raises(TemplateError, match="already exists"):
            sb.snapshot(template)
        assert _run(sb, "echo still here") == "still here\n"
    assert store.get(template).source.startswith("oci:")    # the existing template is untouched
    _no_work_left(store)


def _source(upper: Path) -> SnapshotSource:
    return SnapshotSource(TemplateStore(upper.parent / "store"), "unused", upper,
                          lambda uid, gid: (1000 if uid == os.geteuid() else 0, 1000 if gid == os.getegid() else 0))


def _members(upper: Path, limits: Limits | None = None) -> dict[str, tarfile.TarInfo]:
    buf = io.BytesIO()
    write_layer(buf, _source(upper), limits or Limits())
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_the_layer_tar_of_an_upper_dir_in_overlay_format(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    home = upper / "home" / "user"
    for d in (upper / "etc", upper / "srv" / "replaced", upper / "opt" / "stockade" / "agent", upper / "proc",
              upper / "tmp", home / "proj"):
        d.mkdir(parents=True)
    (upper / "srv" / "f").write_text("f")
    os.link(upper / "srv" / "f", upper / "srv" / "f2")
    os.symlink("/etc/shadow", upper / "srv" / "link")
    os.mkfifo(upper / "srv" / "fifo")
    (upper / "opt" / "stockade" / "agent" / "agent.zip").write_text("")
    (upper / "tmp" / "scratch").write_text("no")
    (home / "proj" / "main.c").write_text("code")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(upper / "srv" / "sock"))
    sock.close()
    if ROOT:  # overlayfs's own markers, as root makes them
        os.mknod(upper / "etc" / "gone", stat.S_IFCHR | 0o600, 0)
        os.setxattr(upper / "srv" / "replaced", "trusted.overlay.opaque", b"y")
    m = _members(upper)
    assert m["srv/f"].isreg() and m["srv/f2"].islnk() and m["srv/f2"].linkname == "srv/f"
    assert m["srv/link"].issym() and m["srv/link"].linkname == "/etc/shadow"
    assert m["srv/fifo"].isfifo() and "srv/sock" not in m
    assert m["home/user"].isdir() and m["home/user/proj/main.c"].size == 4
    assert m["srv/f"].uid == 1000 and m["home/user/proj/main.c"].uid == 1000
    assert not any(n.startswith(("opt/stockade", "proc", "tmp")) for n in m), sorted(m)   # stockade's mount points
    if ROOT:
        assert m["etc/.wh.gone"].isreg() and m["etc/.wh.gone"].size == 0
        assert "srv/replaced/.wh..wh..opq" in m
    with pytest.raises(TemplateError, match="more entries than"):
        _members(upper, Limits(max_entries=5))
    with pytest.raises(TemplateError, match="larger than"):
        (home / "big").write_bytes(b"x" * 10_000)
        _members(upper, Limits(max_layer_bytes=5_000))


def test_unprivileged_snapshots_are_refused_saying_why(template: str) -> None:
    if ROOT:
        pytest.skip("as root snapshots are taken (the tests above)")
    with Sandbox.create(policy=base_policy(), template=template) as sb, \
            pytest.raises(UnenforceableError, match="run stockade as root"):
        sb.snapshot()


def test_through_a_server_a_snapshot_is_its_tenant_own(runtime: str) -> None:
    from stockade.sdk.transports.remote import RemoteTransport

    from .server_support import RunningServer

    server = RunningServer(runtimes=[runtime])
    try:
        server_store = TemplateStore(server.data_dir / "templates")
        img = server.data_dir / "img"
        ti.oci_layout(img, ti.user_image_layers(), Env=["PATH=/usr/bin:/bin"], User="node")
        import_image(server_store, "base", f"oci:{img}")
        mine = RemoteTransport(server.url, server.key("alpha"))
        theirs = RemoteTransport(server.url, server.key("beta"))
        with Sandbox.create(policy=base_policy(), template="base", runtime=runtime, transport=mine) as sb:
            _run(sb, "echo alpha-secret > /home/user/notes")
            name = sb.snapshot("alpha-snap")
        assert server_store.get(name).owner == "alpha"
        with Sandbox.create(policy=base_policy(), template=name, runtime=runtime, transport=mine) as sb:
            assert _run(sb, "cat /home/user/notes") == "alpha-secret\n"
        with pytest.raises(PolicyError) as err:
            Sandbox.create(policy=base_policy(), template=name, runtime=runtime, transport=theirs)
        assert err.value.field == "template" and "no template named 'alpha-snap'" in str(err.value)
        # another tenant cannot snapshot a sandbox it does not own either
        beta = server.key("beta")
        with Sandbox.create(policy=base_policy(), template="base", runtime=runtime, transport=mine) as sb:
            r = httpx.post(f"{server.url}/sandboxes/{sb.sandbox_id}/snapshot", json={"name": "beta-snap"},
                           headers={"Authorization": f"Bearer {beta}"})
            assert r.status_code == 404, r.text
        assert not server_store.exists("beta-snap")
    finally:
        deadline = time.monotonic() + 5
        while server.server.m.sandboxes and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()


@pytest.mark.skipif(not ROOT, reason="snapshots need root")
def test_a_tenant_lists_shows_and_removes_only_its_own_templates() -> None:
    from .server_support import RunningServer

    server = RunningServer()
    try:
        server_store = TemplateStore(server.data_dir / "templates")
        img = server.data_dir / "img"
        ti.oci_layout(img, ti.user_image_layers(), Env=["PATH=/usr/bin:/bin"], User="node")
        import_image(server_store, "shared-base", f"oci:{img}")

        def call(method: str, path: str, tenant: str) -> httpx.Response:
            return httpx.request(method, f"{server.url}{path}",
                                 headers={"Authorization": f"Bearer {server.key(tenant)}"})

        from stockade.sdk.transports.remote import RemoteTransport

        with Sandbox.create(policy=base_policy(), template="shared-base",
                            transport=RemoteTransport(server.url, server.key("alpha"))) as sb:
            _run(sb, "echo mine > /home/user/notes")
            snap = sb.snapshot("alpha-own")
            listed = {t["name"]: t for t in call("GET", "/templates", "alpha").json()}
            assert set(listed) == {"shared-base", "alpha-own"}
            assert listed["alpha-own"]["yours"] and not listed["alpha-own"]["shared"]
            assert listed["shared-base"]["shared"] and listed["shared-base"]["config"]["user"] == "node"
            assert {t["name"] for t in call("GET", "/templates", "beta").json()} == {"shared-base"}
            assert call("GET", f"/templates/{snap}", "beta").status_code == 404
            assert call("DELETE", f"/templates/{snap}", "beta").status_code == 404
            r = call("DELETE", "/templates/shared-base", "alpha")
            assert r.status_code == 403 and "shared" in r.json()["message"], r.text
            with Sandbox.create(policy=base_policy(), template=snap,
                                transport=RemoteTransport(server.url, server.key("alpha"))):
                r = call("DELETE", f"/templates/{snap}", "alpha")
                assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        # the host's build cache and names that are no names are not found either
        for name in (".build-" + "0" * 40, "..", "UPPER", "x" * 300):
            assert call("GET", f"/templates/{name}", "alpha").status_code == 404, name
        assert call("DELETE", f"/templates/{snap}", "alpha").status_code == 204
        assert not server_store.exists(snap) and server_store.exists("shared-base")
        assert call("GET", f"/templates/{snap}", "alpha").status_code == 404
    finally:
        deadline = time.monotonic() + 5
        while server.server.m.sandboxes and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()


def test_nothing_of_a_snapshot_is_left_in_the_runtime(template: str, runtime: str) -> None:
    with Sandbox.create(policy=base_policy(), template=template, runtime=runtime) as sb:
        _run(sb, "echo x > /home/user/x")
        sb.snapshot()
        sandbox_id = sb.sandbox_id
    assert runtime_class(runtime)().leftovers(sandbox_id) == []



@pytest.mark.parametrize("swap", ["symlink", "other file"])
def test_an_entry_replaced_between_its_listing_and_its_read_is_refused(tmp_path: Path, swap: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The race above, made to happen: the file is swapped right before the host opens it."""
    import stockade.templates.snapshot as snapshot_mod

    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "victim").write_text("mine")
    if swap == "other file":
        (upper / "other").write_text("other")
    secret = tmp_path / "host-secret"
    secret.write_text("host-secret-content")
    real_open = os.open

    def racing_open(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if path == "victim" and dir_fd is not None:
            os.unlink("victim", dir_fd=dir_fd)
            if swap == "symlink":
                os.symlink(str(secret), "victim", dir_fd=dir_fd)
            else:  # a file that exists meanwhile, so its inode is not the freed one
                os.rename("other", "victim", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(snapshot_mod.os, "open", racing_open)
    buf = io.BytesIO()
    with pytest.raises(TemplateError, match="/victim changed while the snapshot was taken"):
        write_layer(buf, _source(upper), Limits())
    assert b"host-secret-content" not in buf.getvalue()


def test_a_sandbox_killed_during_its_snapshot_leaves_no_template_and_no_work(template: str, runtime: str,
                                                                             store: TemplateStore) -> None:
    import threading

    from stockade.errors import SandboxNotFoundError

    sb = Sandbox.create(policy=base_policy(), template=template, runtime=runtime)
    _run(sb, "mkdir /home/node/m && cd /home/node/m && for i in $(seq 3000); do echo $i > f$i; done")
    outcome: list[object] = []

    def take() -> None:
        try:
            outcome.append(sb.snapshot("test-snap-killed"))
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            outcome.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    time.sleep(0.05)
    sb.kill()
    thread.join(60)
    assert len(outcome) == 1
    if isinstance(outcome[0], Exception):
        assert isinstance(outcome[0], (SandboxNotFoundError, TemplateError)), outcome[0]
        assert not store.exists("test-snap-killed")
    else:   # it was done before the kill landed: a whole snapshot
        with Sandbox.create(policy=base_policy(), template="test-snap-killed", runtime=runtime) as again:
            assert _run(again, "cat /home/node/m/f3000") == "3000\n"
    _no_work_left(store)
