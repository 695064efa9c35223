"""A template's user: the image's USER resolved in its own /etc/passwd and /etc/group (never root, never
through a symlink of the image), and the id mappings that show the store's shifted owners to a sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.runtime import idmap
from stockade.runtime.jail.template_root import layer_id_maps
from stockade.templates import TemplateError, TemplateStore, import_image
from stockade.templates.layers import STORE_ID_BASE, STORE_ID_COUNT
from stockade.templates.users import image_user

from .template_images import entry, layer, oci_layout

PASSWD = b"root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\napp:x:1500:50::/srv:/bin/sh\n"
GROUP = b"root:x:0:\nstaff:x:50:\nnode:x:1000:\n"


def _user(tmp_path: Path, user: str, *layers: bytes):
    image = tmp_path / f"img{len(list(tmp_path.iterdir()))}"
    oci_layout(image, list(layers) or [_etc()], User=user)
    store = TemplateStore(tmp_path / "store")
    name = f"t{len(store.list())}"
    import_image(store, name, f"oci:{image}")
    return image_user(store.resolve(name))


def _etc(passwd: bytes = PASSWD, group: bytes = GROUP) -> bytes:
    return layer(entry("dir", "etc"), entry("file", "etc/passwd", passwd), entry("file", "etc/group", group))


@pytest.mark.parametrize(("spec", "uid", "gid", "name"), [
    ("", 1000, 1000, "node"),            # root, the default: uid 1000, here the image's node
    ("root", 1000, 1000, "node"),
    ("0:0", 1000, 1000, "node"),
    ("node", 1000, 1000, "node"),
    ("app", 1500, 50, "app"),            # the passwd entry's group
    ("app:node", 1500, 1000, "app"),
    ("node:staff", 1000, 50, "node"),
    ("1500", 1500, 50, "app"),
    ("2345", 2345, 2345, "user"),        # a uid the image does not list gets an entry
    ("2345:50", 2345, 50, "user"),
])
def test_the_image_user_is_resolved_in_the_image_and_is_never_root(tmp_path: Path, spec: str, uid: int, gid: int,
                                                                   name: str) -> None:
    user = _user(tmp_path, spec)
    assert (user.uid, user.gid, user.name) == (uid, gid, name)
    entries = [line.split(":") for line in user.passwd.splitlines()]
    assert [e[0] for e in entries if e[2] == str(uid)] == [name]
    assert any(line.split(":")[2] == str(gid) for line in user.group.splitlines())
    assert user.passwd.startswith(PASSWD.decode())   # the image's own entries are kept as they are


@pytest.mark.parametrize(("spec", "says"), [
    ("ghost", "no user 'ghost' in the image's /etc/passwd"),
    ("node:ghosts", "no group 'ghosts' in the image's /etc/group"),
    ("70000", "must have ids below 65536"),
    ("1000:70000", "must have ids below 65536"),
    ("4294967296", "no user"),
])
def test_an_unknown_or_out_of_range_user_is_refused_naming_it(tmp_path: Path, spec: str, says: str) -> None:
    with pytest.raises(TemplateError) as err:
        _user(tmp_path, spec)
    assert says in str(err.value) and repr(spec) in str(err.value)


def test_the_image_databases_are_never_read_through_a_symlink(tmp_path: Path) -> None:
    # /etc/passwd pointing at the host's, and an /etc that is a symlink: neither is followed (the image
    # is read as root); the sandbox gets its own entry instead
    linked = layer(entry("dir", "etc"), entry("symlink", "etc/passwd", target="/etc/passwd"))
    user = _user(tmp_path, "", linked)
    assert (user.uid, user.name) == (1000, "user")
    assert "root:x:0:0:root" not in user.passwd
    with pytest.raises(TemplateError, match="no user 'root'"):
        _user(tmp_path, "root:root", layer(entry("symlink", "etc", target="/etc")))


def test_a_whiteout_in_an_upper_layer_hides_the_lower_passwd(tmp_path: Path) -> None:
    top = layer(entry("dir", "etc"), entry("file", "etc/.wh.passwd"))
    assert _user(tmp_path, "", _etc(), top).name == "user"
    with pytest.raises(TemplateError, match="no user 'node'"):
        _user(tmp_path, "node", _etc(), top)


def test_a_user_named_in_an_upper_layer_passwd_wins(tmp_path: Path) -> None:
    top = layer(entry("dir", "etc"), entry("file", "etc/passwd", b"dev:x:1234:1234::/d:/bin/sh\n"))
    user = _user(tmp_path, "dev", _etc(), top)
    assert (user.uid, user.name) == (1234, "dev")


def test_the_id_map_shows_image_root_and_the_user_and_keeps_the_rest_in_the_store_range() -> None:
    text = idmap.id_map(STORE_ID_BASE, STORE_ID_COUNT, {0: 0, 1000: 1_200_000_777})
    lines = [tuple(int(x) for x in line.split()) for line in text.splitlines()]
    assert lines == [(STORE_ID_BASE, 0, 1), (STORE_ID_BASE + 1, STORE_ID_BASE + 1, 999),
                     (STORE_ID_BASE + 1000, 1_200_000_777, 1),
                     (STORE_ID_BASE + 1001, STORE_ID_BASE + 1001, STORE_ID_COUNT - 1001)]
    assert sum(n for _, _, n in lines) == STORE_ID_COUNT
    # the kernel refuses overlapping ranges: none overlap on either side
    for side in (0, 1):
        spans = sorted((line[side], line[side] + line[2]) for line in lines)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    # the top of the range as the user: no trailing identity line
    top = idmap.id_map(STORE_ID_BASE, STORE_ID_COUNT, {0: 0, STORE_ID_COUNT - 1: 5})
    assert top.splitlines()[-1] == f"{STORE_ID_BASE + STORE_ID_COUNT - 1} 5 1"


def test_layers_not_shifted_get_no_id_map(tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [_etc()])
    store = TemplateStore(tmp_path / "store")
    import_image(store, "t", f"oci:{tmp_path / 'img'}")
    resolved = store.resolve("t")
    user = image_user(resolved)
    maps = layer_id_maps(resolved.layer_infos, user, 1_200_000_001, 1_200_000_001)
    if resolved.layer_infos[0].id_base is None:     # unprivileged: the store owner's files, nothing to map
        assert maps is None
    else:
        assert maps is not None
        assert f"{STORE_ID_BASE + 1000} 1200000001 1" in maps[0].splitlines()
        assert f"{STORE_ID_BASE} 0 1" in maps[1].splitlines()
