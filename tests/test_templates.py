"""The template store and the layer applier: hostile layers are refused with an error naming the layer,
the entry and why, and nothing is written outside the store; whiteouts and opaque directories behave as
overlayfs makes them; templates share layers, are listed, shown, removed, and held in use."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stockade.templates import (
    LayerError,
    Limits,
    TemplateError,
    TemplateInUseError,
    TemplateNotFoundError,
    TemplateStore,
    import_image,
    materialize,
)
from stockade.templates.layers import STORE_ID_BASE, store_id

from .template_images import entry, layer, oci_layout, sha

ROOT = os.geteuid() == 0


def _snapshot(area: Path) -> dict[str, tuple[int, int]]:
    """Every path under area except the store, with its type and size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(area):
        if Path(dirpath) == area:
            dirnames[:] = [d for d in dirnames if d != "store"]
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), area)] = (stat.S_IFMT(st.st_mode), st.st_size)
    return out


def _passwd() -> str:
    return hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()


@pytest.fixture
def area(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_text("untouched")
    return tmp_path


def _import_layers(area: Path, layers: list[bytes], name: str = "t", limits: Limits | None = None,
                   compress: str = "gzip"):
    image = area / f"img-{name}-{len(list(area.iterdir()))}"
    oci_layout(image, layers, compress=compress)
    store = TemplateStore(area / "store", limits=limits or Limits())
    return store, import_image(store, name, f"oci:{image}")


def _refused(area: Path, layers: list[bytes], *reason: str, limits: Limits | None = None,
             entry_name: str | None = None, compress: str = "gzip") -> LayerError:
    before, passwd = _snapshot(area), _passwd()
    with pytest.raises(LayerError) as err:
        _import_layers(area, layers, limits=limits, compress=compress)
    message = str(err.value)
    for part in reason:
        assert part in message, message
    assert "layer " in message and "sha256:" in message, message   # which layer
    if entry_name is not None:
        assert err.value.entry == entry_name, message
    store = area / "store"
    assert list((store / "templates").iterdir()) == []
    assert list((store / "layers" / "sha256").iterdir()) == []        # what it extracted went away
    assert list((store / "tmp").iterdir()) == []
    after = _snapshot(area)
    new = {k for k in after if k not in before and not k.startswith("img-")}
    assert new == set(), f"written outside the store: {new}"
    assert (area / "outside" / "canary").read_text() == "untouched"
    assert _passwd() == passwd
    assert not Path("/pwned").exists() and not Path("/tmp/pwned").exists()
    return err.value


# --- hostile layers --------------------------------------------------------------------------------

def test_dotdot_paths_are_refused(area: Path) -> None:
    _refused(area, [layer(entry("file", "../outside/pwned", b"x"))], "'..'", entry_name="../outside/pwned")
    _refused(area, [layer(entry("dir", "a"), entry("file", "a/../../outside/pwned", b"x"))], "'..'")


def test_absolute_paths_are_refused(area: Path) -> None:
    target = str(area / "outside" / "pwned")
    err = _refused(area, [layer(entry("file", target, b"x"))], "absolute path")
    assert err.entry == target


def test_a_file_written_through_a_symlink_of_the_same_layer_is_refused(area: Path) -> None:
    out = str(area / "outside")
    _refused(area, [layer(entry("symlink", "evil", target=out), entry("file", "evil/pwned", b"x"))],
             "'evil' is a symlink", entry_name="evil/pwned")
    _refused(area, [layer(entry("symlink", "root", target="/"), entry("file", "root/tmp/pwned", b"x"))],
             "symlink")
    # relative, and a directory entry through it
    _refused(area, [layer(entry("symlink", "up", target="../../outside"), entry("dir", "up/sub"))], "symlink")


def test_a_file_written_through_a_symlink_of_a_lower_layer_is_refused(area: Path) -> None:
    out = str(area / "outside")
    err = _refused(area, [layer(entry("symlink", "evil", target=out)),
                          layer(entry("file", "evil/pwned", b"x"))], "is a symlink in a lower layer")
    assert "layer 2/2" in str(err)
    _refused(area, [layer(entry("dir", "usr"), entry("symlink", "usr/lib", target="/")),
                    layer(entry("file", "usr/lib/tmp/pwned", b"x"))], "'usr/lib' is a symlink in a lower layer")


def test_an_explicit_directory_replaces_a_lower_symlink(area: Path) -> None:
    store, t = _import_layers(area, [layer(entry("symlink", "lib", target="/")),
                                     layer(entry("dir", "lib"), entry("file", "lib/ok", b"fine"))])
    merged = area / "merged"
    merged.mkdir()
    r = store.resolve(t.name)
    materialize([str(d) for d in r.layer_dirs], r.layer_infos, merged)
    assert (merged / "lib").is_dir() and not (merged / "lib").is_symlink()
    assert (merged / "lib" / "ok").read_text() == "fine"


def test_hard_links_outside_the_layer_are_refused(area: Path) -> None:
    _refused(area, [layer(entry("hardlink", "passwd", target="/etc/passwd"))], "absolute hard link target",
             entry_name="passwd")
    _refused(area, [layer(entry("hardlink", "passwd", target="../../../../etc/passwd"))], "'..'")
    _refused(area, [layer(entry("symlink", "etc", target="/etc"), entry("hardlink", "p", target="etc/passwd"))],
             "symlink")
    # to a file of a lower layer: not an entry of this layer
    _refused(area, [layer(entry("file", "a", b"lower")), layer(entry("hardlink", "b", target="a"))],
             "no earlier entry of this layer")
    _refused(area, [layer(entry("dir", "d"), entry("hardlink", "b", target="d"))], "not a regular file")


@pytest.mark.parametrize("kind,major,minor", [("chr", 1, 3), ("chr", 0, 0), ("blk", 8, 0)])
def test_device_nodes_are_refused(area: Path, kind: str, major: int, minor: int) -> None:
    _refused(area, [layer(entry(kind, "dev/node", major=major, minor=minor))], "device nodes are refused",
             f"{major}:{minor}", entry_name="dev/node")


def test_whiteouts_that_point_outside_are_refused(area: Path) -> None:
    _refused(area, [layer(entry("file", "../.wh.outside"))], "'..'")
    _refused(area, [layer(entry("dir", "etc"), entry("file", "etc/.wh.."))], "names no file")
    _refused(area, [layer(entry("file", ".wh."))], "names no file")
    _refused(area, [layer(entry("symlink", "s", target=str(area / "outside")), entry("file", "s/.wh.canary"))],
             "symlink")


def test_a_huge_entry_and_too_many_entries_are_refused(area: Path) -> None:
    _refused(area, [layer(entry("file", "big", b"x" * 5000))], "larger than 4096 bytes", entry_name="big",
             limits=Limits(max_entry_bytes=4096))
    # a header that claims more than it holds is refused before anything is read
    _refused(area, [entry("file", "liar", b"", size=1 << 40)[0].tobuf(tarfile.PAX_FORMAT)], "larger than",
             limits=Limits(max_entry_bytes=1 << 30))
    _refused(area, [layer(*[entry("file", f"f{i}", b"") for i in range(11)])], "more than 10 entries",
             limits=Limits(max_entries=10))


def test_a_gzip_bomb_stops_at_the_layer_bound(area: Path) -> None:
    info = tarfile.TarInfo("zeros")
    info.size = 64 << 20
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        gz.write(info.tobuf())
        block = bytes(1 << 20)
        for _ in range(64):
            gz.write(block)
    bomb = buf.getvalue()
    assert len(bomb) < 200_000
    image = area / "bomb"
    oci_layout(image, [b"placeholder"])
    # replace the layer blob with the bomb (digest and diff_id made to match, so only the bound stops it)
    blobs, _ = _retarget(image, bomb, gzip.decompress(bomb))
    before = _snapshot(area)
    store = TemplateStore(area / "store", limits=Limits(max_layer_bytes=8 << 20))
    with pytest.raises(LayerError, match="the uncompressed layer is larger than 8388608 bytes"):
        import_image(store, "bomb", f"oci:{image}")
    assert {k for k in _snapshot(area) if k not in before} == set()
    assert list((area / "store" / "layers" / "sha256").iterdir()) == []


def _retarget(image: Path, blob: bytes, tar: bytes) -> tuple[Path, str]:
    """Rewrite a one-layer OCI layout so its layer is ``blob`` (uncompressed: ``tar``), digests consistent."""
    import json

    blobs = image / "blobs" / "sha256"
    index = json.loads((image / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((blobs / mdigest.split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config["rootfs"]["diff_ids"] = [sha(tar)]
    cbytes = json.dumps(config).encode()
    (blobs / sha(cbytes).split(":")[1]).write_bytes(cbytes)
    (blobs / sha(blob).split(":")[1]).write_bytes(blob)
    manifest["config"].update(digest=sha(cbytes), size=len(cbytes))
    manifest["layers"][0].update(digest=sha(blob), size=len(blob))
    mbytes = json.dumps(manifest).encode()
    (blobs / sha(mbytes).split(":")[1]).write_bytes(mbytes)
    index["manifests"][0].update(digest=sha(mbytes), size=len(mbytes))
    (image / "index.json").write_text(json.dumps(index))
    return blobs, sha(mbytes)


def test_a_huge_tar_header_is_refused(area: Path) -> None:
    info, data = entry("file", "f", b"x")
    info.pax_headers = {"comment": "y" * (2 << 20)}
    _refused(area, [layer((info, data))], "tar headers", limits=Limits(max_header_bytes=1 << 20))


def test_setuid_and_setgid_bits_are_stripped_and_owners_mapped(area: Path) -> None:
    store, t = _import_layers(area, [layer(entry("dir", "bin"), entry("file", "bin/su", b"x", mode=0o4755),
                                           entry("file", "bin/wall", b"y", mode=0o2755, gid=5),
                                           entry("dir", "tmp", mode=0o1777),
                                           entry("file", "home/u/f", b"z", uid=1200000005, gid=1200000005))])
    r = store.resolve(t.name)
    tree = r.layer_dirs[0]
    assert stat.S_IMODE((tree / "bin" / "su").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "bin" / "wall").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "tmp").stat().st_mode) == 0o1777       # sticky stays
    info = r.layer_infos[0]
    assert sorted(info.stripped) == ["bin/su", "bin/wall"]
    # no file is handed to a host or sandbox uid: as root each belongs to its image owner shifted into the
    # store's range (an id beyond it to the range's nobody), unprivileged to the store's owner; the image's
    # owners are recorded either way
    expect = {"home/u/f": (store_id(65534), store_id(65534)), "bin/wall": (store_id(0), store_id(5))}
    for path in [tree, *tree.rglob("*")]:
        want = expect.get(str(path.relative_to(tree)), (store_id(0), store_id(0))) if ROOT else (os.geteuid(),) * 2
        assert (path.lstat().st_uid, path.lstat().st_gid) == want, path
    assert info.owners["home/u/f"] == [1200000005, 1200000005]
    assert info.owners["bin/wall"] == [0, 5]
    assert info.id_base == (STORE_ID_BASE if ROOT else None)


@pytest.mark.skipif(not ROOT, reason="only root shifts owners")
def test_a_layer_stored_before_owners_were_shifted_is_shifted_once_when_used(area: Path) -> None:
    store, t = _import_layers(area, [layer(entry("dir", "home"), entry("file", "home/f", b"z", uid=1000, gid=1000),
                                           entry("symlink", "link", target="/etc/shadow"))])
    layer_dir = store.layer_path(t.layers[0])
    record = json.loads((layer_dir / "layer.json").read_text())
    record.pop("id_base")
    (layer_dir / "layer.json").write_text(json.dumps(record))
    for path in [layer_dir / "tree", *(layer_dir / "tree").rglob("*")]:
        os.chown(path, 0, 0, follow_symlinks=False)
    shadow = os.stat("/etc/shadow")
    tree = store.resolve(t.name).layer_dirs[0]
    assert (tree / "home" / "f").stat().st_uid == store_id(1000)
    assert (tree / "home").stat().st_uid == store_id(0)
    assert (tree / "link").lstat().st_uid == store_id(0)
    after = os.stat("/etc/shadow")                      # the symlink was not followed
    assert (after.st_uid, after.st_gid) == (shadow.st_uid, shadow.st_gid)
    assert store.layer_info(t.layers[0]).id_base == STORE_ID_BASE


def test_a_tampered_blob_and_a_wrong_diff_id_are_refused(area: Path) -> None:
    image = area / "img"
    oci_layout(image, [layer(entry("file", "a", b"real"))])
    blob = next(p for p in (image / "blobs" / "sha256").iterdir() if p.read_bytes()[:2] == b"\x1f\x8b")
    blob.write_bytes(gzip.compress(layer(entry("file", "a", b"evil"))))
    store = TemplateStore(area / "store")
    with pytest.raises(LayerError, match="not the manifest's sha256:"):
        import_image(store, "t", f"oci:{image}")
    image2 = area / "img2"
    oci_layout(image2, [b"x"])
    real = layer(entry("file", "a", b"real"))
    _retarget(image2, gzip.compress(real), layer(entry("file", "a", b"other")))
    with pytest.raises(LayerError, match="not the image config's diff_id"):
        import_image(store, "t", f"oci:{image2}")
    assert list((area / "store" / "layers" / "sha256").iterdir()) == []


def test_not_a_tar_is_refused(area: Path) -> None:
    _refused(area, [b"\x1f\x8b\x08\x00garbage" * 10], "not a valid")
    _refused(area, [b"x" * 700], "not a valid", compress="none")


# --- whiteouts and opaque directories ----------------------------------------------------------------

WHITEOUT_LAYERS = [
    layer(entry("dir", "etc"), entry("file", "etc/a", b"a1"), entry("file", "etc/b", b"b1"),
          entry("dir", "d"), entry("file", "d/x", b"x"), entry("dir", "d/sub"), entry("file", "d/sub/y", b"y"),
          entry("dir", "opt"), entry("file", "opt/keep", b"k"), entry("symlink", "link", target="/etc/b")),
    layer(entry("file", "etc/.wh.a"), entry("file", "d/.wh..wh..opq"), entry("file", "d/z", b"z"),
          entry("file", "new", b"n"), entry("file", ".wh.link")),
    layer(entry("file", "etc/a", b"a3"), entry("file", ".wh.opt"),
          # same layer: a whiteout and an entry of the same name: the entry stays
          entry("file", ".wh.same"), entry("file", "same", b"s")),
]
EXPECTED = {"etc": None, "etc/a": b"a3", "etc/b": b"b1", "d": None, "d/z": b"z", "new": b"n", "same": b"s"}


def _tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return out


def test_whiteouts_and_opaque_directories_across_layers(area: Path) -> None:
    store, t = _import_layers(area, WHITEOUT_LAYERS)
    r = store.resolve(t.name)
    assert r.layer_infos[1].whiteouts == ["etc/a", "link"] and r.layer_infos[1].opaque_dirs == ["d"]
    assert r.layer_infos[2].whiteouts == ["opt"]                       # not "same": its own entry won
    wh = r.layer_dirs[1] / "etc" / "a"
    assert stat.S_ISCHR(wh.lstat().st_mode) and wh.lstat().st_rdev == 0  # overlayfs's whiteout
    assert "user.overlay.opaque" in r.layer_infos[1].opaque_xattrs or not _user_xattrs(area)
    merged = area / "merged"
    merged.mkdir()
    materialize([str(d) for d in r.layer_dirs], r.layer_infos, merged)
    assert _tree(merged) == EXPECTED


def _user_xattrs(area: Path) -> bool:
    probe = area / "probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ROOT, reason="mounting an overlay needs root")
def test_the_kernels_overlay_reads_the_layers_the_same_way(area: Path) -> None:
    store, t = _import_layers(area, WHITEOUT_LAYERS)
    r = store.resolve(t.name)
    merged = area / "mnt"
    merged.mkdir()
    lower = ":".join(str(d) for d in reversed(r.layer_dirs))
    script = (f"mount -t overlay overlay -o ro,lowerdir={lower} {merged} && "
              f"{sys.executable} -c 'import os,sys; [print(os.path.relpath(os.path.join(d,n),sys.argv[1])) "
              f"for d,ds,fs in os.walk(sys.argv[1]) for n in ds+fs]' {merged}")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(EXPECTED)


# --- the store -----------------------------------------------------------------------------------------

def test_templates_share_layers_and_removal_keeps_what_another_uses(area: Path) -> None:
    base = layer(entry("file", "base", b"shared"))
    store, a = _import_layers(area, [base, layer(entry("file", "a", b"a"))], name="a")
    _, b = _import_layers(area, [base, layer(entry("file", "b", b"b"))], name="b")
    assert a.layers[0] == b.layers[0] == sha(base)
    assert len(list((area / "store" / "layers" / "sha256").iterdir())) == 3   # the base once
    assert [t.name for t in store.list()] == ["a", "b"]
    assert store.get("a").config.architecture
    removed = store.remove("a")
    assert removed == [a.layers[1]]
    assert store.resolve("b").layer_dirs[0].joinpath("base").read_bytes() == b"shared"
    assert sorted(store.remove("b")) == sorted(b.layers)
    assert list((area / "store" / "layers" / "sha256").iterdir()) == []
    with pytest.raises(TemplateNotFoundError):
        store.get("a")


def test_names_are_checked_and_templates_are_immutable(area: Path) -> None:
    store, _ = _import_layers(area, [layer(entry("file", "f", b"1"))], name="one")
    with pytest.raises(TemplateError, match="already exists"):
        _import_layers(area, [layer(entry("file", "f", b"2"))], name="one")
    for bad in ("", "../x", "A", "a/b", "-x", "x" * 65):
        with pytest.raises(TemplateError, match="template name"):
            store.get(bad)


def test_a_template_in_use_cannot_be_removed(area: Path) -> None:
    store, t = _import_layers(area, [layer(entry("file", "f", b"1"))], name="busy")
    lease = store.use("busy")
    assert lease.resolved.layer_dirs[0].joinpath("f").read_bytes() == b"1"
    assert store.in_use("busy")
    with pytest.raises(TemplateInUseError, match="in use"):
        store.remove("busy")
    lease.release()
    assert store.in_use("busy") is None
    # a lease held by another process ends with it
    code = ("import sys,time; from stockade.templates import TemplateStore; "
            f"l = TemplateStore({str(area / 'store')!r}).use('busy'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(TemplateInUseError):
            store.remove("busy")
    finally:
        proc.kill()
        proc.wait()
    # the runtime's own registry can say so too
    hooked = TemplateStore(area / "store", in_use=lambda name: "sandbox sbx-1" if name == "busy" else None)
    with pytest.raises(TemplateInUseError, match="sbx-1"):
        hooked.remove("busy")
    assert store.remove("busy") == t.layers


def test_gc_removes_leftovers_of_a_dead_import(area: Path) -> None:
    store = TemplateStore(area / "store")
    leftover = store.temp_dir("layer")
    (leftover / "tree" / "d").mkdir(parents=True)
    (leftover / "tree" / "d").chmod(0o500)
    orphan = store.layer_path(sha(b"orphan"))
    (orphan / "tree").mkdir(parents=True)
    assert store.gc() == [sha(b"orphan")]
    assert list((area / "store" / "tmp").iterdir()) == []


def test_limits_from_the_environment() -> None:
    limits = Limits.from_env({"STOCKADE_TEMPLATE_MAX_LAYER_SIZE": "1GiB", "STOCKADE_TEMPLATE_MAX_ENTRIES": "5"})
    assert limits.max_layer_bytes == 1 << 30 and limits.max_entries == 5
    with pytest.raises(TemplateError, match="STOCKADE_TEMPLATE_MAX_ENTRIES"):
        Limits.from_env({"STOCKADE_TEMPLATE_MAX_ENTRIES": "many"})


def test_nothing_is_left_when_the_store_is_removed(area: Path) -> None:
    store, _ = _import_layers(area, WHITEOUT_LAYERS)
    shutil.rmtree(area / "store")
    assert not (area / "store").exists()


def test_a_stored_layer_is_checked_again_on_a_new_stack(area: Path) -> None:
    # The upper layer is harmless on the first base and is stored; on a base where its parent is a symlink
    # to outside it is refused, although it is already in the store (the check is per stack, not per layer).
    upper = layer(entry("file", "evil/pwned", b"x"))
    store, first = _import_layers(area, [layer(entry("dir", "evil")), upper], name="first")
    before = _snapshot(area)
    with pytest.raises(LayerError, match="'evil' is a symlink in a lower layer"):
        _import_layers(area, [layer(entry("symlink", "evil", target=str(area / "outside"))), upper], name="second")
    assert [t.name for t in store.list()] == ["first"]
    assert store.has_layer(first.layers[1])                 # still used by "first"
    assert {k for k in _snapshot(area) if k not in before and not k.startswith("img-")} == set()
    assert sorted(p.name for p in (area / "outside").iterdir()) == ["canary"]


def _gnu_sparse(name: str, real_size: int) -> bytes:
    """An old-GNU sparse entry: 512 stored bytes at the end of a file of real_size bytes (the rest holes)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    def octal(n: int) -> bytes:
        return b"%011o\0" % n
    header[386:398], header[398:410] = octal(real_size - 512), octal(512)
    header[483:495] = octal(real_size)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"s" * 512 + bytes(1024)


def test_sparse_entries_cannot_fill_the_disk(area: Path) -> None:
    bomb = _gnu_sparse("sparse", 1 << 30)
    assert len(bomb) < 4096
    err = _refused(area, [bomb], "the layer's files add up to more than", limits=Limits(max_layer_bytes=16 << 20))
    assert err.entry == "sparse"


def test_deep_paths_are_refused(area: Path) -> None:
    deep = "/".join(["d"] * 300) + "/f"
    _refused(area, [layer(entry("file", deep, b"x"))], "deeper than 256 directories")


def test_bwraps_overlay_reads_the_layers_the_same_way(area: Path) -> None:
    # What the runtime will do: one --overlay-src per layer, bottom first (bwrap stacks the last on top),
    # in a user namespace, so it also runs unprivileged.
    from stockade.runtime.jail.bwrap import locate

    store, t = _import_layers(area, WHITEOUT_LAYERS)
    r = store.resolve(t.name)
    mnt = area / "mnt"
    mnt.mkdir()
    argv = [locate().path, "--unshare-user", "--ro-bind", "/", "/"]
    for d in r.layer_dirs:
        argv += ["--overlay-src", str(d)]
    argv += ["--ro-overlay", str(mnt), sys.executable, "-I", "-c",
             "import os,sys; [print(os.path.relpath(os.path.join(d,n),sys.argv[1])) "
             "for d,ds,fs in os.walk(sys.argv[1]) for n in ds+fs]", str(mnt)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0 and "overlay" in out.stderr and not ROOT:
        pytest.skip(f"this kernel refuses an overlay in a user namespace: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(EXPECTED)


def test_the_whole_image_is_bounded(area: Path) -> None:
    layers = [layer(entry("file", f"f{i}", b"x" * 30000)) for i in range(3)]
    with pytest.raises(TemplateError, match=r"layer 2/3 .*the image is larger than 60000 bytes uncompressed"):
        _import_layers(area, layers, limits=Limits(max_image_bytes=60000))
    assert list((area / "store" / "layers" / "sha256").iterdir()) == []
