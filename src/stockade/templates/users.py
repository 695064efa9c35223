"""Who a template's sandbox runs as: the image's USER, resolved in the image's own /etc/passwd and /etc/group.

The rule, the same in every runtime: commands run as the image's user (``USER node``, ``1000:1000``,
``app:staff``), and the files the image gave that user are the sandbox user's to write (the runtime maps
them, ``runtime/idmap.py``). stockade never runs sandbox code as root: an image whose user is root (the
default of most base images) runs as uid 1000, as a sandbox without a template does, and its files
owned by uid 1000 (``node``'s home in the node images) are the sandbox user's; root's files stay root's.

The sandbox's /etc/passwd and /etc/group are the image's, plus an entry for that user when the image has
none, so ``id``, ``whoami`` and ``ls -l`` show the image's names."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TemplateError
from .layers import STORE_ID_COUNT as MAX_ID
from .layers import LayerInfo, read_visible
from .store import ResolvedTemplate

DEFAULT_UID = DEFAULT_GID = 1000
_MAX_DB = 1 << 20          # bytes of /etc/passwd or /etc/group read from an image
HOME = "/home/user"


@dataclass(frozen=True)
class ImageUser:
    uid: int
    gid: int
    name: str
    passwd: str    # the sandbox's /etc/passwd
    group: str     # the sandbox's /etc/group


def _entries(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#") and
            line.count(":") >= 2]


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 10 and int(text) < 2**32 - 1 else None


def image_databases(trees: list[str], infos: list[LayerInfo]) -> tuple[str, str]:
    """The image's /etc/passwd and /etc/group ("" where it has none)."""
    passwd = (read_visible(trees, infos, "etc/passwd", _MAX_DB) or b"").decode("utf-8", "replace")
    group = (read_visible(trees, infos, "etc/group", _MAX_DB) or b"").decode("utf-8", "replace")
    return passwd, group


def image_user(resolved: ResolvedTemplate, keep_root: bool = False) -> ImageUser:
    """The template's sandbox user; a user or group the image does not know is a TemplateError naming it.
    ``keep_root``: the image's root stays root (a build step's, in ids of its own: runtime/jail/template_root)."""
    passwd, group = image_databases([str(d) for d in resolved.layer_dirs], resolved.layer_infos)
    users, groups = _entries(passwd), _entries(group)
    spec = resolved.config.user.strip()
    where = f"template {resolved.template.name!r}: its user {spec!r}"
    uid, gid = lookup_ids(spec, passwd, group, where)
    if uid == 0 and not keep_root:  # never root: see the module's docstring
        uid, gid = DEFAULT_UID, DEFAULT_GID if gid == 0 else gid
    if uid >= MAX_ID or gid >= MAX_ID:  # the store's id range (layers.py), and never a host's sandbox uid
        raise TemplateError(f"{where}: uid {uid}, gid {gid}: a template's user must have ids below {MAX_ID}")
    name = next((e[0] for e in users if e[2] == str(uid)), "")
    if not name:
        name = "root" if uid == 0 else "user"
        passwd = _ending(passwd) + f"{name}:x:{uid}:{gid}:sandbox user:{HOME}:/bin/sh\n"
    if not any(e[2] == str(gid) for e in groups):
        group = _ending(group) + f"{'user' if not any(e[0] == 'user' for e in groups) else f'g{gid}'}:x:{gid}:\n"
    return ImageUser(uid, gid, name, passwd, group)


def lookup_ids(spec: str, passwd: str, group: str, where: str) -> tuple[int, int]:
    """``USER``-style ``user[:group]`` (names or numbers) in the image's databases: (uid, gid). A user
    with no group part gets its passwd entry's group (its own number for a bare number)."""
    users, groups = _entries(passwd), _entries(group)
    user_part, _, group_part = spec.strip().partition(":")
    uid, gid = 0, 0
    if user_part:
        number = _number(user_part)
        entry = next((e for e in users if (e[2] == user_part if number is not None else e[0] == user_part)
                      and len(e) >= 4), None)
        if number is None and entry is None:
            raise TemplateError(f"{where}: no user {user_part!r} in the image's /etc/passwd")
        uid = number if number is not None else int(entry[2]) if entry and _number(entry[2]) is not None else 0
        if entry is not None and _number(entry[3]) is not None:
            gid = int(entry[3])
        elif number is not None:
            gid = number
    if group_part:
        number = _number(group_part)
        if number is None:
            found = next((e for e in groups if e[0] == group_part and _number(e[2]) is not None), None)
            if found is None:
                raise TemplateError(f"{where}: no group {group_part!r} in the image's /etc/group")
            number = int(found[2])
        gid = number
    return uid, gid


def _ending(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


__all__ = ["DEFAULT_GID", "DEFAULT_UID", "ImageUser", "image_databases", "image_user", "lookup_ids"]
