"""`stockade template build`: a template from a Dockerfile subset (templates/build.py). RUN steps run in
sandboxes (every runtime that snapshots) as the template's user, COPY reads only the build context, the
cache runs only what changed, a failed build changes nothing, and the build cache is nobody's template."""

from __future__ import annotations

import http.server
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade import Sandbox
from stockade.errors import PolicyError
from stockade.templates import TemplateError, TemplateInUseError, TemplateStore, import_image
from stockade.templates.build import BuildEvent, build
from stockade.templates.store import is_build_cache

from . import template_images as ti
from .conformance.conftest import RUNTIMES_UNDER_TEST, UNMET, usable_runtime
from .conftest import base_policy

ROOT = os.geteuid() == 0
TOOLS = ("mkdir", "ls", "id", "touch", "readlink", "env", "chown", "chmod")
needs_root = pytest.mark.skipif(not ROOT, reason="RUN steps are snapshots, which need root "
                                                 "(test_unprivileged_run_is_refused_saying_why checks why)")


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore()


@pytest.fixture(scope="module")
def base(store: TemplateStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An image with /bin/sh and a few tools, a user node (1000) whose home it owns, /opt/tools a symlink
    to usr/local/bin (as merged-usr images have /bin -> usr/bin)."""
    name = f"test-buildbase-{secrets.token_hex(4)}"
    img = tmp_path_factory.mktemp("img")
    extra = ti.layer(ti.entry("dir", "usr"), ti.entry("dir", "usr/local"), ti.entry("dir", "usr/local/bin"),
                     ti.entry("dir", "opt"), ti.entry("symlink", "opt/tools", target="/usr/local/bin"))
    ti.oci_layout(img, [*ti.user_image_layers(), ti.tools_layer(*TOOLS), extra],
                  Env=["PATH=/usr/local/bin:/usr/bin:/bin"], User="node", WorkingDir="/home/node")
    import_image(store, name, f"oci:{img}")
    store.prune_build_cache()   # (a killed earlier run's: the tests count the steps that run)
    yield name
    for t in store.list():
        if t.name.startswith("test-built-"):
            store.remove(t.name)
    store.remove(name)
    store.prune_build_cache()
    store.gc()


@pytest.fixture
def built(store: TemplateStore) -> Iterator[str]:
    name = f"test-built-{secrets.token_hex(4)}"
    yield name
    if store.exists(name):
        store.remove(name)


@pytest.fixture(params=RUNTIMES_UNDER_TEST)
def runtime(request: pytest.FixtureRequest) -> str:
    return usable_runtime(request.param)


class Events(list[BuildEvent]):
    def ran(self) -> list[str]:
        """The steps that were not taken from the cache, by instruction (config steps excluded)."""
        return [e.instruction for e in self if e.kind == "done" and not e.cached and e.layer_bytes is not None]

    def cached(self) -> list[str]:
        return [e.instruction for e in self if e.kind == "done" and e.cached]

    def output(self) -> str:
        return "".join(e.text for e in self if e.kind == "output")


def _build(store: TemplateStore, name: str, text: str, context: Path, **kw: object) -> tuple[Events, object]:
    events = Events()
    result = build(store, name, text, context, progress=events.append, **kw)  # type: ignore[arg-type]
    return events, result


def _sh(sb: Sandbox, script: str) -> str:
    r = sb.commands.run(["/bin/sh", "-c", script])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout


def _sandbox_mounts() -> set[str]:
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if "sbx-" in line}


@pytest.fixture
def no_leftovers(store: TemplateStore) -> Iterator[None]:
    """Nothing of the test's builds is left: no work in the store's tmp/, no sandbox mount that was not
    there before (other tests' sandboxes may live on), no build step's id block held."""
    from stockade.config import HostConfig

    before = _sandbox_mounts()
    yield
    assert list((store.root / "tmp").iterdir()) == []
    assert _sandbox_mounts() - before == set()
    assert list((HostConfig.from_env().state_dir / "uids").glob("13*.lock")) == []


@needs_root
def test_a_build_makes_a_template_sandboxes_start_from(store, base, built, runtime, tmp_path, no_leftovers):
    ctx = tmp_path / "ctx"
    (ctx / "conf").mkdir(parents=True)
    (ctx / "app.sh").write_text("echo app\n")
    (ctx / "app.sh").chmod(0o755)
    (ctx / "conf" / "a.ini").write_text("a=1\n")
    text = f"""
FROM {base}
ENV RUNTIME={runtime}
ARG GREETING=hello
ENV APP_HOME=/home/node/app \\
    MODE=built
WORKDIR $APP_HOME
COPY app.sh conf/ ./
RUN echo "$GREETING $MODE $(id -un)" > made.txt && mkdir -p cache && touch cache/x
LABEL org.example.team=agents
START ["/bin/sh", "-c", "echo up > /tmp/started; exec sleep 600"]
READY test -f /tmp/started
"""
    events, result = _build(store, built, text, ctx, runtime=runtime)
    assert (result.steps, result.cached, result.ran) == (10, 0, 3)   # WORKDIR, COPY, RUN
    t = store.get(built)
    assert t.config.env["MODE"] == "built" and t.config.working_dir == "/home/node/app"
    assert t.config.labels == {"org.example.team": "agents"} and t.config.user == "node"
    assert t.config.start_command == ["/bin/sh", "-c", "echo up > /tmp/started; exec sleep 600"]
    assert t.config.ready_command == ["/bin/sh", "-c", "test -f /tmp/started"]
    assert built in [x.name for x in store.list()]
    assert not any(is_build_cache(x.name) for x in store.list())   # the cache records are not listed
    with Sandbox.create(template=built, runtime=runtime) as sb:
        out = _sh(sb, "pwd; cat made.txt a.ini; ./app.sh; ls -n made.txt app.sh | "
                      "while read m n u g rest; do echo $u:$g; done; cat /tmp/started; echo $MODE; "
                      "echo ${GREETING:-unset}; touch /home/node/writable")
        # the image root's files show as the overflow id, as in every template sandbox; ARGs are not in the
        # template's environment
        root_ids = "0:0" if runtime == "gvisor" else "65534:65534"   # gVisor's user namespace maps root too
        assert out.split("\n")[:9] == ["/home/node/app", "hello built node", "a=1", "app", root_ids,
                                       "1000:1000", "up", "built", "unset"], out


@needs_root
def test_a_rebuild_runs_only_what_changed(store, base, built, tmp_path):
    (tmp_path / "f").write_text("one\n")
    lines = [f"FROM {base}", "RUN echo first >> log", "COPY f /home/node/f", "RUN echo second >> log"]
    events, _ = _build(store, built, "\n".join(lines), tmp_path)
    assert len(events.ran()) == 3
    events, result = _build(store, built, "\n".join(lines), tmp_path)
    assert events.ran() == [] and len(events.cached()) == 3 and events.output() == ""
    lines.append("RUN echo third >> log")
    events, result = _build(store, built, "\n".join(lines), tmp_path)
    assert events.ran() == ["RUN echo third >> log"] and len(events.cached()) == 3
    # a changed file in the context invalidates its COPY and what follows it, not what precedes
    (tmp_path / "f").write_text("two\n")
    events, _ = _build(store, built, "\n".join(lines), tmp_path)
    assert events.ran() == ["COPY f /home/node/f", "RUN echo second >> log", "RUN echo third >> log"]
    # an ARG value RUN sees is part of its key
    lines[1:1] = ["ARG V=1"]
    events, _ = _build(store, built, "\n".join(lines), tmp_path, build_args={"V": "2"})
    assert len(events.ran()) == 4
    for _ in range(2):   # each run's result replaces the cached one
        events, _ = _build(store, built, "\n".join(lines), tmp_path, no_cache=True)
        assert len(events.ran()) == 4
    with Sandbox.create(template=built) as sb:
        assert _sh(sb, "cat log f") == "first\nsecond\nthird\ntwo\n"


@needs_root
def test_a_failed_step_names_itself_and_changes_nothing(store, base, built, tmp_path, no_leftovers):
    _build(store, built, f"FROM {base}\nRUN echo v1 > v", tmp_path)
    before = store.get(built)
    text = f"FROM {base}\nRUN echo v2 > v\nRUN echo failing >&2; exit 3\nRUN echo never"
    with pytest.raises(TemplateError, match=r"step 3/4 \(RUN echo failing >&2; exit 3\), line 3: the command "
                                            r"exited with 3") as info:
        _build(store, built, text, tmp_path)
    assert store.get(built) == before
    with Sandbox.create(template=built) as sb:
        assert _sh(sb, "cat v") == "v1\n"
    assert "never" not in str(info.value)


@needs_root
def test_a_step_over_its_time_is_ended_saying_which_limit(store, base, built, tmp_path, no_leftovers):
    from stockade import Policy

    policy = Policy().with_overrides(limits={"command_timeout": 1})
    with pytest.raises(TemplateError, match=r"step 2/2 .*limits.command_timeout"):
        _build(store, built, f"FROM {base}\nRUN while :; do :; done", tmp_path, policy=policy)
    assert not store.exists(built)


PY = "/opt/stockade/python/so/ld.so --library-path /opt/stockade/python/so /opt/stockade/python/so/python3"
CAPS = f"{PY} -c \"print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])\""


@needs_root
def test_run_is_the_images_root_in_a_block_of_host_ids(store, base, built, tmp_path, no_leftovers):
    """As in a Dockerfile, RUN runs as USER (root unless the image or the file says otherwise): root may
    write the image's system directories and give files to its users, inside a user namespace of 65536
    host ids of its own, with a container's capabilities there and no others; USER node then runs as node."""
    from stockade.runtime.jail import template_root

    text = f"""FROM {base}
USER root
RUN cat /proc/self/uid_map; id -u; {CAPS}
RUN touch /etc/by-root /usr/local/bin/tool && chmod 4755 /usr/local/bin/tool && mkdir -p /srv/app && \\
    chown node:node /srv/app && mkdir /srv/app-1500 && chown 1500:1500 /srv/app-1500 && touch /opt/x
USER node
RUN id -u; {CAPS}; touch /srv/app/mine; touch /etc/nope || echo refused
"""
    events, _ = _build(store, built, text, tmp_path, no_cache=True)   # (its output is asserted)
    out = events.output().split("\n")
    inside, outside, count = out[0].split()
    assert (int(inside), int(count)) == (0, 65536)
    assert template_root.BUILD_ID_RANGE[0] <= int(outside) <= template_root.BUILD_ID_RANGE[1]
    caps = sum(1 << n for n in (0, 1, 3, 4, 5, 6, 7, 10))   # chown dac_override fowner fsetid kill setgid setuid
    assert out[1:3] == ["0", f"{caps:016x}"], out            # net_bind_service: the package managers' set
    assert out[3:5] == ["1000", "0000000000000000"], out
    assert "cannot touch '/etc/nope': Permission denied" in events.output() and "refused" in events.output()
    with Sandbox.create(template=built) as sb:   # the template's user is node, as the last USER said
        listing = _sh(sb, "ls -ln /srv/app /usr/local/bin/tool /etc/by-root /opt/x; ls -lnd /srv/app-1500; "
                          "touch /srv/app/again && echo node-writes-its-dir; touch /etc/by-root || echo not-etc")
    assert "-rw-r--r-- 1 1000 1000" in listing and "mine" in listing          # node's file is node's
    assert "-rwxr-xr-x 1 65534 65534" in listing and "/usr/local/bin/tool" in listing   # setuid stripped
    assert "node-writes-its-dir" in listing and "not-etc" in listing, listing
    stored = store.get(built).layers
    tree = store.layer_path(stored[-2]) / "tree"   # the root step's layer, as stored: the store's ids
    from stockade.templates.layers import STORE_ID_BASE

    assert os.stat(tree / "srv" / "app").st_uid == STORE_ID_BASE + 1000
    assert os.stat(tree / "srv" / "app-1500").st_uid == STORE_ID_BASE + 1500
    assert os.stat(tree / "etc" / "by-root").st_uid == STORE_ID_BASE
    assert os.stat(tree / "usr" / "local" / "bin" / "tool").st_mode & 0o7777 == 0o755


PROBES = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def probe(name, r):
    print(name, "ALLOWED" if r == 0 else "refused: " + os.strerror(ctypes.get_errno()))
probe("unshare-user", libc.unshare(0x10000000))
probe("unshare-mount", libc.unshare(0x00020000))
probe("mount", libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
probe("setns", libc.setns(os.open("/proc/self/ns/user", os.O_RDONLY), 0))
probe("chroot", libc.chroot(b"/"))
probe("mknod", libc.mknod(b"/tmp/dev", 0o20644, os.makedev(1, 3)))
"""


@needs_root
def test_a_root_step_gets_no_namespace_mount_or_device(store, base, built, tmp_path):
    """The seccomp filter and the capability set hold for a build step's root as for any sandbox (bwrap's
    --disable-userns cannot be combined with the namespace a step's maps are written into)."""
    (tmp_path / "probes.py").write_text(PROBES)
    events, _ = _build(store, built, f"FROM {base}\nUSER root\nCOPY probes.py /probes.py\nRUN {PY} /probes.py",
                       tmp_path, no_cache=True)
    lines = events.output().splitlines()
    assert [line.split()[0] for line in lines] == ["unshare-user", "unshare-mount", "mount", "setns", "chroot",
                                                   "mknod"], lines
    assert all("refused: Operation not permitted" in line for line in lines), lines


@needs_root
def test_a_root_step_on_gvisor_is_refused_saying_why(store, base, built, tmp_path):
    if UNMET.get("gvisor") is not None:
        pytest.skip(UNMET["gvisor"])
    with pytest.raises(TemplateError, match="a build step as the image's root needs the jail runtime"):
        _build(store, built, f"FROM {base}\nUSER root\nRUN true", tmp_path, runtime="gvisor")
    _build(store, built, f"FROM {base}\nRUN id -un > who", tmp_path, runtime="gvisor")   # as node: fine
    with Sandbox.create(template=built) as sb:
        assert _sh(sb, "cat who") == "node\n"


@needs_root
def test_run_reaches_only_the_hosts_the_build_policy_allows(store, base, built, tmp_path):
    """The RUN sandbox's network is the build policy's: here the host's own python, which the agent
    brings, fetches from a local server through the egress broker."""
    from stockade import Policy

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"package contents\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    py = "/opt/stockade/python/so/ld.so --library-path /opt/stockade/python/so /opt/stockade/python/so/python3"
    # through the broker's proxy (NO_PROXY has 127.0.0.1, which in the sandbox is its own loopback)
    fetch = (f"RUN NO_PROXY= no_proxy= {py} -c \"import urllib.request as u; "
             f"open('got', 'wb').write(u.urlopen('http://127.0.0.1:{port}/pkg', timeout=10).read())\"")
    try:
        opened = Policy.from_dict({"network": {"mode": "allowlist", "allow": [f"127.0.0.1:{port}"],
                                               "allow_private": ["127.0.0.1/32"]}})
        _build(store, built, f"FROM {base}\n{fetch}", tmp_path, policy=opened)
        with Sandbox.create(template=built) as sb:
            assert _sh(sb, "cat got") == "package contents\n"
        with pytest.raises(TemplateError, match="step 2/2"):
            _build(store, built, f"FROM {base}\n{fetch} # again", tmp_path)   # default policy: no network
    finally:
        server.shutdown()
        server.server_close()


@needs_root
def test_copy_semantics(store, base, built, tmp_path):
    ctx = tmp_path
    (ctx / "d" / "sub").mkdir(parents=True)
    (ctx / "d" / "sub" / "deep.txt").write_text("deep\n")
    (ctx / "d" / "top.txt").write_text("top\n")
    (ctx / "one.txt").write_text("one\n")
    (ctx / "two.txt").write_text("two\n")
    (ctx / "tool").write_text("#!/bin/sh\necho tool\n")
    (ctx / "tool").chmod(0o4755)   # setuid: never kept
    os.symlink("one.txt", ctx / "alias")
    text = f"""
FROM {base}
COPY one.txt /home/node/renamed.txt
COPY *.txt /home/node/all/
COPY d /home/node/d
COPY --chown=node:node --chmod=0600 one.txt /home/node/private
COPY tool /opt/tools/tool
COPY alias /home/node/alias
WORKDIR /srv/new/dir
COPY one.txt here.txt
"""
    _build(store, built, text, ctx)
    with Sandbox.create(template=built) as sb:
        out = _sh(sb, "cd /home/node; cat renamed.txt; ls all; ls -R d; ls -n private | "
                      "while read m n u g rest; do echo $m $u:$g; done; readlink /opt/tools; /opt/tools/tool; "
                      "ls -l /usr/local/bin/tool | while read m rest; do echo $m; done; readlink alias; "
                      "cat /srv/new/dir/here.txt; ls -nd /home/node | while read m n u g rest; do echo $u; done")
    assert out.split("\n") == [
        "one", "one.txt", "two.txt", "d:", "sub", "top.txt", "", "d/sub:", "deep.txt",
        "-rw------- 1000:1000", "/usr/local/bin", "tool", "-rwxr-xr-x", "one.txt", "one",
        "1000", ""], out   # /home/node is still node's: a COPY under it keeps its parent's owner and mode


@needs_root
@pytest.mark.parametrize("line,why", [
    ("COPY ../outside /x", "outside the build context"),
    ("COPY sub/../../outside /x", "outside the build context"),
    ("COPY linked/passwd /x", "'linked' on the way is a symlink"),
    ("COPY missing /x", "no such file in the build context"),
    ("COPY nomatch* /x/", "no file in the build context matches"),
    ("COPY fifo /x", "not a file, directory or symlink"),
    ("ADD https://files.example.test/x.tgz /x", "URLs are not fetched"),
    ("ADD bundle.tar.gz /x", "archives are not unpacked"),
    ("COPY --chown=nobody-here x.txt /x", "no user 'nobody-here'"),
    ("USER ghost", "no user 'ghost'"),
    ("COPY x.txt /home/node/app.txt/below", "is not a directory in the image"),
])
def test_copy_refusals(store, base, built, tmp_path, line, why, no_leftovers):
    ctx = tmp_path / "ctx"
    (ctx / "sub").mkdir(parents=True)
    (tmp_path / "outside").write_text("secret\n")
    os.symlink("/etc", ctx / "linked")
    os.mkfifo(ctx / "fifo")
    (ctx / "x.txt").write_text("x\n")
    (ctx / "bundle.tar.gz").write_bytes(b"")
    with pytest.raises(TemplateError, match=f"step 2/2 .*line 2: .*{why}"):
        _build(store, built, f"FROM {base}\n{line}", ctx)
    assert not store.exists(built)


def test_copy_only_builds_need_no_sandbox(store, base, built, tmp_path):
    """COPY, ENV and WORKDIR are written by the host: they build unprivileged too."""
    (tmp_path / "x.txt").write_text("x\n")
    _, result = _build(store, built, f"FROM {base}\nENV A=1\nWORKDIR /home/node/w\nCOPY x.txt .", tmp_path)
    t = store.get(built)
    assert len(t.layers) == len(store.get(base).layers) + 2 and t.config.env["A"] == "1"


def _visible(store: TemplateStore, name: str, path: str) -> bool:
    from stockade.templates.build import _stack
    from stockade.templates.layers import visible_stat

    trees, infos = _stack(store, store.get(name).layers)
    return visible_stat(trees, infos, path.strip("/").split("/")) is not None


def test_the_dockerignore_keeps_paths_out_of_copy(store, base, built, tmp_path):
    """What the context's .dockerignore excludes never reaches a layer, from COPY . or a glob; an
    exception (!) brings a path back; a source it excludes outright is refused naming the file; a change
    to the ignore file that changes what is copied changes the layer (the cache key is its content)."""
    ctx = tmp_path
    for rel in ("app/main.py", "app/.env", "node_modules/x/index.js", "node_modules/keep/k.js", ".git/config",
                "notes.md", "README.md", "src/cache/a.pyc", "src/b.py"):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(rel)
    (ctx / ".dockerignore").write_text("# local junk\n.git\nnode_modules\n!node_modules/keep\n**/.env\n"
                                       "*.md\n!README.md\n**/*.pyc\n")
    _build(store, built, f"FROM {base}\nCOPY . /srv/ctx/\nCOPY *.md /srv/docs/", ctx)
    present = {rel: _visible(store, built, f"/srv/ctx/{rel}") for rel in (
        "app/main.py", "app/.env", "node_modules/x/index.js", "node_modules/keep/k.js", ".git/config", ".git",
        "notes.md", "README.md", "src/cache/a.pyc", "src/b.py", ".dockerignore")}
    assert present == {"app/main.py": True, "app/.env": False, "node_modules/x/index.js": False,
                       "node_modules/keep/k.js": True, ".git/config": False, ".git": False, "notes.md": False,
                       "README.md": True, "src/cache/a.pyc": False, "src/b.py": True, ".dockerignore": True}
    assert _visible(store, built, "/srv/docs/README.md") and not _visible(store, built, "/srv/docs/notes.md")
    with pytest.raises(TemplateError, match="step 2/2 .*app/.env: excluded by the build context's .dockerignore"):
        _build(store, built, f"FROM {base}\nCOPY app/.env /x", ctx)
    with pytest.raises(TemplateError, match=r"notes\*.md: no file .* \(the 1 that do are excluded by "):
        _build(store, built, f"FROM {base}\nCOPY notes*.md /x/", ctx)
    (ctx / ".dockerignore").write_text(".git\n")
    _build(store, built, f"FROM {base}\nCOPY . /srv/ctx/", ctx)
    assert _visible(store, built, "/srv/ctx/app/.env") and _visible(store, built, "/srv/ctx/notes.md")


@pytest.mark.skipif(ROOT, reason="as root RUN steps run (the tests above)")
def test_unprivileged_run_is_refused_saying_why(store, base, built, tmp_path):
    with pytest.raises(TemplateError, match="step 3/3 .*needs the jail runtime run as root"):
        _build(store, built, f"FROM {base}\nUSER root\nRUN true", tmp_path, policy=base_policy())
    with pytest.raises(TemplateError, match="(?s)step 2/2 .*run stockade as root to snapshot sandboxes"):
        _build(store, built, f"FROM {base}\nRUN true", tmp_path, policy=base_policy())
    assert not store.exists(built)


@needs_root
def test_a_template_in_use_is_not_replaced(store, base, built, tmp_path):
    _build(store, built, f"FROM {base}\nENV V=1", tmp_path)
    with Sandbox.create(template=built) as sb:
        with pytest.raises(TemplateInUseError, match="in use"):
            _build(store, built, f"FROM {base}\nENV V=2", tmp_path)
        assert _sh(sb, "echo $V") == "1\n"
    _build(store, built, f"FROM {base}\nENV V=2", tmp_path)
    assert store.get(built).config.env["V"] == "2"


def test_build_args_and_from(store, base, built, tmp_path):
    with pytest.raises(TemplateError, match="--build-arg NOPE: no ARG of that name"):
        _build(store, built, f"FROM {base}", tmp_path, build_args={"NOPE": "1"})
    _build(store, built, f"ARG BASE={base}\nFROM $BASE\nARG V=default\nENV V=$V", tmp_path, build_args={"V": "given"})
    assert store.get(built).config.env["V"] == "given"
    with pytest.raises(TemplateError, match="FROM 'Not_A_Name': not a template name, and not an image source"):
        _build(store, built, "FROM Not_A_Name", tmp_path)
    with pytest.raises(TemplateError, match="template 'absent-template' not found"):
        _build(store, built, "FROM absent-template", tmp_path)
    with pytest.raises(TemplateError, match="template name '.build-"):
        _build(store, ".build-" + "0" * 40, f"FROM {base}", tmp_path)


def test_from_an_image_source(store, built, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    ti.oci_layout(img, ti.image_layers(), Env=["PATH=/bin", "FROM_IMAGE=1"])
    events, _ = _build(store, built, f"FROM oci:{img}\nENV MORE=2", tmp_path)
    t = store.get(built)
    assert t.config.env == {"PATH": "/bin", "FROM_IMAGE": "1", "MORE": "2"} and len(t.layers) == 2
    assert "layer 1/2" in events.output()


def test_a_tenant_never_gets_the_build_cache(store, base, built, tmp_path):
    """The build cache's records are the host's: no server tenant starts a sandbox from one or names a
    snapshot like one (which a later host build would take from its cache)."""
    from stockade.server.service import _check_template

    _build(store, built, f"FROM {base}\nENV A=1", tmp_path)
    cache = store.build_cache()
    assert cache

    class Srv:
        class config:
            data_dir = store.root.parent

    class Who:
        tenant = "tenant-a"

    with pytest.raises(PolicyError, match="no template named"):
        _check_template(Srv, Who, cache[0].name)  # type: ignore[arg-type]


def test_cli_build_and_gc(store, base, tmp_path):
    name = f"test-built-{secrets.token_hex(4)}"
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nENV A=1\nCOPY Dockerfile /home/node/\n")
    cmd = [sys.executable, "-m", "stockade.cli", "template", "build", name, str(tmp_path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "[1/3] FROM" in r.stderr and "[3/3] COPY Dockerfile /home/node/" in r.stderr
        assert f"template {name}:" in r.stdout
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert "  cached" in r.stderr, r.stderr
        bad = tmp_path / "bad"
        bad.write_text(f"FROM {base}\nVOLUME /data\n")
        r = subprocess.run([*cmd, "-f", str(bad)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "line 2: VOLUME is not supported" in r.stderr
        r = subprocess.run([*cmd, "--allow-host", "bad host!"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "network.allow" in r.stderr
    finally:
        if store.exists(name):
            store.remove(name)
    r = subprocess.run([sys.executable, "-m", "stockade.cli", "template", "gc", "--build-cache"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "build cache records" in r.stdout, r.stderr
    assert store.build_cache() == []
