"""Building a template from a build file (buildfile.py): every step a layer or a config change, cached.

- ``FROM`` starts from a template of the store or an image source (fetched as ``template import`` does).
- ``RUN`` is untrusted code like any other: it runs in a fresh stockade sandbox of the step before (the
  build policy's network, limits and runtime), as the template's user, never as root (templates/users.py);
  what it wrote anywhere in its root is then saved as the step's layer, by the snapshot path
  (snapshot.py: read by descriptor, stored through the layer checks). Writing the image's root-owned
  system directories therefore fails as it would in any sandbox: bring system packages in the image
  ``FROM`` names, install into the user's prefix (``pip install --user``, ``npm --prefix``).
- ``COPY``/``ADD`` write a layer from the build context on the host: sources are resolved inside the
  context and read by descriptor (``..`` out of it, a symlink on the way and anything that is not a file,
  directory or symlink are refused); the destination's directories are resolved through the image's
  own symlinks (an image's /bin -> usr/bin stays a link) and keep their owners and modes.
- ``ENV``, ``ARG``, ``WORKDIR``, ``USER``, ``LABEL``, ``CMD``/``ENTRYPOINT``, ``START``, ``READY`` change the
  config (``WORKDIR`` also creates the directory, owned by the step's user, when the image lacks it).

The cache: every step has a key, sha256 of its parent's key and what the step does (for ``RUN`` its
command and the ``ARG`` values it sees; for ``COPY`` the sources' names, modes, owners and contents; for
``FROM`` the base's layers and config). A step whose key has a record in the store (``.build-<key>``, a
name no user can give, never listed, never served to a server tenant, store.py) is not run again, so a
rebuild that changed only the last line runs only that line. ``stockade template gc --build-cache``
drops the records (and then their layers).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import StockadeError
from . import dockerignore
from .buildfile import Instruction, expand, parse
from .dockerignore import IgnoreRules
from .errors import TemplateError
from .layers import (
    LayerInfo,
    check_stack,
    remove_tree,
    resolve_in_stack,
    visible_owner,
    visible_stat,
)
from .store import Template, TemplateConfig, TemplateStore, check_name
from .users import image_databases, lookup_ids

if TYPE_CHECKING:
    from ..policy import Policy

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst")


@dataclass(frozen=True)
class BuildEvent:
    """What the build reports as it goes: a step starting (``step``), a RUN's output (``output``, with
    ``stream``), a step done (``done``, with ``seconds``, ``cached`` and the layer's ``layer_bytes``)."""

    kind: str
    index: int
    count: int
    instruction: str
    stream: str = ""
    text: str = ""
    cached: bool = False
    seconds: float = 0.0
    layer_bytes: int | None = None


@dataclass(frozen=True)
class BuildResult:
    template: Template
    steps: int
    cached: int        # of them, how many came from the cache
    ran: int           # and how many made a layer (RUN, COPY, ADD, a new WORKDIR)
    seconds: float


@dataclass
class _State:
    layers: list[str]
    config: TemplateConfig      # without start/ready: build sandboxes do not run them
    key: str


@dataclass
class _Build:
    store: TemplateStore
    context: Path
    policy: Policy
    runtime: str | None
    no_cache: bool
    progress: Callable[[BuildEvent], None]
    args: dict[str, str] = field(default_factory=dict)          # ARG values in scope
    build_args: dict[str, str] = field(default_factory=dict)    # --build-arg, by name
    start: list[str] | None = None
    ready: list[str] | None = None
    cached: int = 0
    ignore: IgnoreRules = field(default_factory=lambda: IgnoreRules([]))   # the context's .dockerignore
    transport: Any = None     # the RUN sandboxes' (a LocalTransport: this host's manager), made at the first


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _record_name(key: str) -> str:
    return f".build-{key}"


def build(store: TemplateStore, name: str, text: str, context: str | os.PathLike[str], *,
          policy: Policy | None = None, runtime: str | None = None, build_args: dict[str, str] | None = None,
          no_cache: bool = False, source: str = "build file",
          progress: Callable[[BuildEvent], None] | None = None) -> BuildResult:
    """Build template ``name`` from the build file ``text`` with ``context`` (a directory) as the COPY
    sources' root. ``policy`` is the RUN sandboxes' (default: no network, the default limits); an existing
    ``name`` is replaced unless a sandbox uses it. A TemplateError (naming the step) on any failure, after
    which no template of that name has changed."""
    from ..policy import Policy

    check_name(name)
    instructions = parse(text)
    ctx = Path(context)
    if not ctx.is_dir():
        raise TemplateError(f"the build context {ctx} is not a directory")
    b = _Build(store, ctx.resolve(), policy or Policy(), runtime, no_cache, progress or (lambda e: None),
               build_args=dict(build_args or {}))
    with _Opened(os.open(b.context, _DIR_FLAGS)) as fd:
        b.ignore = IgnoreRules.read(fd)
    started = time.monotonic()
    count = len(instructions)
    ran = 0
    state: _State | None = None
    with store.importing(), _closing(b):     # no garbage collection takes a layer before a record names it
        for index, ins in enumerate(instructions, 1):
            b.progress(BuildEvent("step", index, count, ins.display))
            t0 = time.monotonic()
            before = b.cached
            try:
                state, layer = _step(b, state, ins, index, count)
            except StockadeError as exc:   # (a TemplateError too; a sandbox's error says which policy field)
                raise TemplateError(f"step {index}/{count} ({ins.display[:80]}), line {ins.line}: {exc}") from None
            b.progress(BuildEvent("done", index, count, ins.display, cached=b.cached > before,
                                  seconds=time.monotonic() - t0, layer_bytes=layer))
            ran += layer is not None
        assert state is not None  # parse() guarantees a FROM
        unused = set(b.build_args) - set(b.args)
        if unused:
            raise TemplateError(f"--build-arg {', '.join(sorted(unused))}: no ARG of that name in the build file")
        config = replace(state.config, start_command=b.start, ready_command=b.ready)
        template = Template(name=name, layers=list(state.layers), config=config, source=source,
                            created=time.time(), size=_size(store, state.layers))
        store.replace_template(template)
    return BuildResult(template, count, b.cached, ran, time.monotonic() - started)


@contextlib.contextmanager
def _closing(b: _Build) -> Iterator[None]:
    try:
        yield
    finally:
        if b.transport is not None:
            from ..sdk.portal import portal

            portal().call(b.transport.close())


def _size(store: TemplateStore, layers: list[str]) -> int:
    return sum(store.layer_info(d).file_bytes for d in layers)


def _variables(b: _Build, state: _State | None) -> dict[str, str]:
    return {**b.args, **(state.config.env if state else {})}


def _step(b: _Build, state: _State | None, ins: Instruction, index: int, count: int
          ) -> tuple[_State | None, int | None]:
    """One instruction: the state after it, and the bytes of the layer it added (None: none)."""
    if ins.keyword == "ARG":
        for word in ins.words:
            name, eq, default = word.partition("=")
            value = b.build_args.get(name, expand(default, _variables(b, state), ins.line) if eq else "")
            b.args[name] = value
        return state, None
    if ins.keyword == "FROM":
        return _from(b, expand(ins.words[0], b.args, ins.line), index, count), None
    assert state is not None
    variables = _variables(b, state)
    config = state.config
    if ins.keyword == "ENV":
        env = dict(config.env)
        for word in ins.words:
            k, _, v = word.partition("=")
            env[k] = expand(v, {**variables, **env}, ins.line)
        return _config_step(state, ins, replace(config, env=env)), None
    if ins.keyword == "LABEL":
        labels = dict(config.labels)
        for word in ins.words:
            k, _, v = word.partition("=")
            labels[expand(k, variables, ins.line)] = expand(v, variables, ins.line)
        return _config_step(state, ins, replace(config, labels=labels)), None
    if ins.keyword == "USER":
        user = expand(ins.words[0], variables, ins.line)
        trees, infos = _stack(b.store, state.layers)
        lookup_ids(user, *image_databases(trees, infos), f"USER {user!r}")    # unknown names fail here
        return _config_step(state, ins, replace(config, user=user)), None
    if ins.keyword in ("CMD", "ENTRYPOINT"):
        return _config_step(state, ins, replace(config, image_command=list(ins.argv))), None
    if ins.keyword == "START":
        b.start = list(ins.argv)
        return state, None
    if ins.keyword == "READY":
        b.ready = list(ins.argv)
        return state, None
    if ins.keyword == "EXPOSE":
        return state, None
    if ins.keyword == "WORKDIR":
        path = os.path.normpath(os.path.join(config.working_dir or "/", expand(ins.words[0], variables, ins.line)))
        path = "/" + path.lstrip("/")
        new = _config_step(state, ins, replace(config, working_dir=path))
        return _workdir_layer(b, new, path)
    if ins.keyword == "RUN":
        return _run(b, state, ins, index, count)
    return _copy(b, state, ins, variables)   # COPY, ADD


def _config_step(state: _State, ins: Instruction, config: TemplateConfig) -> _State:
    return _State(state.layers, config, _key(state.key, ins.keyword, ins.display, config.to_json()))


def _from(b: _Build, source: str, index: int, count: int) -> _State:
    from .oci import SOURCE_PREFIXES, fetch_image

    if source.startswith(SOURCE_PREFIXES):
        def progress(p: Any) -> None:
            if p.state != "start":
                b.progress(BuildEvent("output", index, count, f"FROM {source}", stream="stderr",
                                      text=f"layer {p.index}/{p.count} {p.digest[7:19]}: "
                                           f"{'present' if p.state == 'present' else 'stored'}\n"))

        base = fetch_image(b.store, source, progress=progress)
    else:
        try:
            check_name(source)
        except TemplateError:
            raise TemplateError(f"FROM {source!r}: not a template name, and not an image source "
                                f"({', '.join(t + '...' for t in SOURCE_PREFIXES)})") from None
        base = b.store.get(source)
        if base.owner:
            raise TemplateError(f"FROM {source!r}: a server tenant's template; build from the host's own")
    b.start, b.ready = base.config.start_command, base.config.ready_command
    config = replace(base.config, start_command=None, ready_command=None)
    return _State(list(base.layers), config, _key("FROM", base.layers, config.to_json()))


def _stack(store: TemplateStore, layers: list[str]) -> tuple[list[str], list[LayerInfo]]:
    return [str(store.layer_path(d) / "tree") for d in layers], [store.layer_info(d) for d in layers]


def _cached(b: _Build, key: str) -> _State | None:
    if b.no_cache or not b.store.exists(_record_name(key)):
        return None
    t = b.store.get(_record_name(key))
    if t.owner or any(not b.store.has_layer(d) for d in t.layers):
        return None
    b.cached += 1
    return _State(list(t.layers), t.config, key)


def _ensure_record(b: _Build, state: _State) -> str:
    """A store record of ``state``, for a sandbox to start from."""
    name = _record_name(state.key)
    if not b.store.exists(name):
        try:
            b.store.add_template(Template(name=name, layers=list(state.layers), config=state.config,
                                          source="build cache", created=time.time(),
                                          size=_size(b.store, state.layers)))
        except TemplateError:
            if not b.store.exists(name):   # anything but another build that made the same record first
                raise
    return name


# --- RUN ----------------------------------------------------------------------------------------------

def _run(b: _Build, state: _State, ins: Instruction, index: int, count: int) -> tuple[_State, int | None]:
    from ..sdk.portal import portal
    from ..sdk.sandbox import Sandbox
    from ..sdk.transports.local import LocalTransport

    args = {k: v for k, v in b.args.items() if k not in state.config.env}
    key = _key(state.key, "RUN", ins.argv, sorted(args.items()))
    if (hit := _cached(b, key)) is not None:
        return hit, None
    if b.store.exists(_record_name(key)):   # --no-cache: this run's result replaces the cached one
        b.store.remove(_record_name(key), collect=False)
    parent = _ensure_record(b, state)

    def emit(stream: str) -> Callable[[str], None]:
        return lambda text: b.progress(BuildEvent("output", index, count, ins.display, stream=stream, text=text))

    if b.transport is None:
        b.transport = LocalTransport()
    manager = portal().call(b.transport.manager())
    started = portal().call(manager.create(b.policy, runtime=b.runtime, template=parent, build_step=True))
    with Sandbox(manager.info_of(started), b.transport) as sb:
        result = sb.commands.run(ins.argv, envs=args, on_stdout=emit("stdout"), on_stderr=emit("stderr"))
        if result.error or result.exit_code != 0:
            raise TemplateError(result.error or f"the command exited with {result.exit_code}")
        record = portal().call(manager.snapshot(sb.sandbox_id, _record_name(key), build_step=state.config))
    return _State(list(record.layers), state.config, key), b.store.layer_info(record.layers[-1]).file_bytes


# --- COPY, ADD, WORKDIR: layers written from the host ----------------------------------------------------

class _Layer:
    """One layer tar being written (to a file in the store's tmp/), with the content key of what it holds
    (names, types, modes, owners, link targets and file contents; not times)."""

    def __init__(self, out: IO[bytes], store: TemplateStore) -> None:
        self.tar = tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by _store_layer)
        self.hash = hashlib.sha256()
        self.entries = store.limits.max_entries
        self.bytes = store.limits.max_layer_bytes

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        self.entries -= 1
        self.bytes -= info.size
        if self.entries < 0:
            raise TemplateError("more entries than STOCKADE_TEMPLATE_MAX_ENTRIES allows")
        if self.bytes < 0:
            raise TemplateError("more bytes than STOCKADE_TEMPLATE_MAX_LAYER_SIZE allows")
        self.hash.update(json.dumps([info.name, info.type.decode(), info.mode, info.uid, info.gid,
                                     info.linkname, info.size]).encode())
        if data is not None:
            self.tar.addfile(info, _Hashed(data, self.hash))
        else:
            self.tar.addfile(info)


class _Hashed:
    def __init__(self, f: IO[bytes], h: Any) -> None:
        self.f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def _dir_info(path: str, mode: int, ids: tuple[int, int]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    info.mode, (info.uid, info.gid) = mode, ids
    info.mtime = int(time.time())
    return info


def _parents(layer: _Layer, trees: list[str], infos: list[LayerInfo], parts: list[str], owner: tuple[int, int],
             upto: int) -> None:
    """Directory entries for ``parts[:upto]``: the image's own (mode and owner kept) where it has them,
    new ones owned by ``owner`` where not. A file on the way is refused."""
    for depth in range(1, upto + 1):
        prefix = parts[:depth]
        st = visible_stat(trees, infos, prefix)
        if st is None:
            layer.add(_dir_info("/".join(prefix), 0o755, owner))
        elif stat.S_ISDIR(st.st_mode):
            layer.add(_dir_info("/".join(prefix), stat.S_IMODE(st.st_mode), visible_owner(trees, infos, prefix)))
        else:
            raise TemplateError(f"/{'/'.join(prefix)} is not a directory in the image")


def _store_layer(b: _Build, state: _State, key_parts: list[Any], label: str,
                 write: Callable[[_Layer], None]) -> tuple[str, str]:
    """Write a layer with ``write``; returns its cache key and, after storing it, its diff_id ("" when the
    cache has the step: nothing is stored)."""
    work = b.store.temp_dir("build")
    try:
        tar_path = work / "layer.tar"
        with open(tar_path, "wb") as out:
            layer = _Layer(out, b.store)
            write(layer)
            layer.tar.close()
        key = _key(state.key, *key_parts, layer.hash.hexdigest())
        if b.store.exists(_record_name(key)) and not b.no_cache:
            return key, ""
        return key, b.store.add_layer_file(tar_path, label).diff_id
    finally:
        remove_tree(work)


def _finish_layer(b: _Build, state: _State, key: str, diff_id: str) -> tuple[_State, int | None]:
    if not diff_id:
        hit = _cached(b, key)
        if hit is not None:
            return hit, None
    layers = [*state.layers, diff_id]
    if len(layers) > b.store.limits.max_layers:
        raise TemplateError(f"more than {b.store.limits.max_layers} layers (STOCKADE_TEMPLATE_MAX_LAYERS)")
    trees, infos = _stack(b.store, layers)
    check_stack(trees, infos, [f"layer {i + 1}" for i in range(len(layers))])
    new = _State(layers, state.config, key)
    _ensure_record(b, new)
    return new, infos[-1].file_bytes


def _workdir_layer(b: _Build, state: _State, path: str) -> tuple[_State, int | None]:
    trees, infos = _stack(b.store, state.layers)
    parts = resolve_in_stack(trees, infos, path)
    st = visible_stat(trees, infos, parts) if parts else None
    if not parts or (st is not None and stat.S_ISDIR(st.st_mode)):
        return state, None
    owner = _user_ids(trees, infos, state.config.user)
    key, diff_id = _store_layer(b, state, ["WORKDIR", path], f"WORKDIR {path}",
                                lambda layer: _parents(layer, trees, infos, parts, owner, len(parts)))
    return _finish_layer(b, state, key, diff_id)


def _user_ids(trees: list[str], infos: list[LayerInfo], user: str) -> tuple[int, int]:
    """The image ids the build's current user has (root's default user is uid 1000, as in a sandbox)."""
    from .users import DEFAULT_GID, DEFAULT_UID

    uid, gid = lookup_ids(user, *image_databases(trees, infos), f"USER {user!r}")
    return (DEFAULT_UID, DEFAULT_GID if gid == 0 else gid) if uid == 0 else (uid, gid)


def _copy(b: _Build, state: _State, ins: Instruction, variables: dict[str, str]) -> tuple[_State, int | None]:
    words = [expand(w, variables, ins.line) for w in ins.words]
    *sources, dest = words
    for src in sources:
        if "://" in src:
            raise TemplateError(f"{ins.keyword} {src}: URLs are not fetched by the build; download in a RUN "
                                "step, with the host in the build policy (--allow-host)")
        if ins.keyword == "ADD" and src.endswith(_ARCHIVES):
            raise TemplateError(f"ADD {src}: archives are not unpacked; COPY it and RUN tar -xf")
    trees, infos = _stack(b.store, state.layers)
    owner = (0, 0)
    if "chown" in ins.flags:
        spec = expand(ins.flags["chown"], variables, ins.line)
        owner = lookup_ids(spec, *image_databases(trees, infos), f"--chown={spec}")
    chmod = int(ins.flags["chmod"], 8) if "chmod" in ins.flags else None
    matches = [m for src in sources for m in _context_matches(b.context, src, b.ignore)]
    if not dest.startswith("/"):
        dest = os.path.join(state.config.working_dir or "/", dest)
    into_dir = dest.endswith("/") or len(matches) > 1
    parts = resolve_in_stack(trees, infos, dest)
    if not into_dir and len(matches) == 1:
        st = visible_stat(trees, infos, parts) if parts else None
        into_dir = matches[0][1] == "dir" or (st is not None and stat.S_ISDIR(st.st_mode))

    def write(layer: _Layer) -> None:
        _parents(layer, trees, infos, parts, owner, len(parts) if into_dir else len(parts) - 1)
        for rel, kind in matches:
            target = parts if not into_dir else parts if kind == "dir" else [*parts, Path(rel).name]
            _add_source(layer, b.context, rel, "/".join(target), owner, chmod, kind == "dir", b.ignore)

    label = f"{ins.keyword} {' '.join(words)}"
    key, diff_id = _store_layer(b, state, [ins.keyword, words, sorted(ins.flags.items())], label, write)
    return _finish_layer(b, state, key, diff_id)


def _context_matches(context: Path, src: str, ignore: IgnoreRules) -> list[tuple[str, str]]:
    """The context paths ``src`` names (a glob may name several), each (relative path, "dir" | "other"),
    but those the .dockerignore leaves out."""
    rel = os.path.normpath(src.lstrip("/")) if src.strip("/") else "."
    if rel == ".." or rel.startswith("../"):
        raise TemplateError(f"{src}: outside the build context {context}")
    if glob.has_magic(rel):
        found = sorted(glob.glob(rel, root_dir=context))
        names = [n for n in found if not ignore.excluded(n) or ignore.walk_into(n)]
        if not names:
            raise TemplateError(f"{src}: no file in the build context matches" +
                                (f" (the {len(found)} that do are excluded by {dockerignore.FILE})" if found else ""))
    elif rel != "." and ignore.excluded(rel) and not ignore.walk_into(rel):
        raise TemplateError(f"{src}: excluded by the build context's {dockerignore.FILE}")
    else:
        names = [rel]
    out = []
    for name in names:
        st = _lstat_in_context(context, name, src)
        out.append((name, "dir" if stat.S_ISDIR(st.st_mode) else "other"))
    return out


@dataclass
class _Opened:
    fd: int

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _open_parent(context: Path, rel: str, src: str) -> _Opened:
    """The directory holding context/rel, walked without following a symlink."""
    fd = os.open(context, _DIR_FLAGS)
    for part in [p for p in rel.split("/") if p not in ("", ".")][:-1]:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise TemplateError(f"{src}: {part!r} on the way is a symlink or missing in the build context "
                                f"({exc.strerror}); give the real path") from None
        os.close(fd)
        fd = nxt
    return _Opened(fd)


def _lstat_in_context(context: Path, rel: str, src: str) -> os.stat_result:
    if rel == ".":
        return os.stat(context)
    with _open_parent(context, rel, src) as pfd:
        try:
            return os.stat(rel.rsplit("/", 1)[-1], dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise TemplateError(f"{src}: no such file in the build context {context}") from None


def _add_source(layer: _Layer, context: Path, rel: str, target: str, owner: tuple[int, int], chmod: int | None,
                is_dir: bool, ignore: IgnoreRules) -> None:
    """context/rel as ``target`` in the layer; a directory's contents (not itself) go under ``target``,
    without what the .dockerignore leaves out (a directory it excludes is walked into only for an
    exception's sake, and then kept, as the parent of what that includes)."""
    if not is_dir:
        with _open_parent(context, rel, rel) as pfd:
            _add_entry(layer, pfd, rel.rsplit("/", 1)[-1], target, owner, chmod)
        return
    with (_open_parent(context, rel, rel) if rel != "." else _Opened(os.open(context, _DIR_FLAGS))) as pfd:
        top = os.open(rel.rsplit("/", 1)[-1], _DIR_FLAGS, dir_fd=pfd) if rel != "." else os.dup(pfd)
    try:
        for dirpath, dirnames, filenames, dfd in _walk(top):
            kept = []
            for name in sorted(dirnames):
                inner = os.path.normpath(os.path.join(dirpath, name))
                path = os.path.normpath(os.path.join(rel, inner))
                if ignore.excluded(path) and not ignore.walk_into(path):
                    continue
                kept.append(name)
                _add_entry(layer, dfd, name, f"{target}/{inner}".lstrip("/"), owner, chmod)
            for name in sorted(filenames):
                inner = os.path.normpath(os.path.join(dirpath, name))
                if not ignore.excluded(os.path.normpath(os.path.join(rel, inner))):
                    _add_entry(layer, dfd, name, f"{target}/{inner}".lstrip("/"), owner, chmod)
            dirnames[:] = kept
    finally:
        os.close(top)


def _walk(top: int) -> Iterator[tuple[str, list[str], list[str], int]]:
    def unlistable(exc: OSError) -> None:
        raise TemplateError(f"a directory of the build context could not be read ({exc.strerror})")

    yield from os.fwalk(".", dir_fd=top, follow_symlinks=False, onerror=unlistable)


def _add_entry(layer: _Layer, dfd: int, name: str, target: str, owner: tuple[int, int], chmod: int | None) -> None:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    info = tarfile.TarInfo(target.lstrip("/"))
    info.uid, info.gid = owner
    info.mtime = int(st.st_mtime)
    info.mode = chmod if chmod is not None and not stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        layer.add(info)
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(name, dir_fd=dfd)
        layer.add(info)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise TemplateError(f"{target}: changed while it was copied")
            info.type, info.size = tarfile.REGTYPE, now.st_size
            layer.add(info, f)
    else:
        raise TemplateError(f"{target}: not a file, directory or symlink (a device, socket or pipe is not copied)")


__all__ = ["BuildEvent", "BuildResult", "build"]
