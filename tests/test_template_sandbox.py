"""Sandboxes whose root is a template: the image's files, the sandbox's own copy-on-write layer, the agent
in an image without python, teardown, and the isolation basics on a template root, on every runtime (the
jail and gVisor, where it can run here).

The images are built by tests/template_images.py: the host's dash as /bin/sh and cat, with the C library
and loader they need, a few files, a world-writable file under /usr/bin and a sticky world-writable
directory (so the sandbox's uid 1000 may write inside the image's own directories, which belong to root),
and one with users (node, app) and files of theirs. No python in them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from stockade import Policy, Sandbox
from stockade.errors import PolicyError
from stockade.runtime.registry import runtime_class
from stockade.templates import TemplateInUseError, TemplateStore, import_image
from stockade.templates.layers import STORE_ID_BASE

from . import template_images as ti
from .conformance.conftest import RUNTIMES_UNDER_TEST, usable_runtime
from .conftest import base_policy
from .mountinfo import host_leaks

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/ns/user"), reason="needs user namespaces")


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore()  # the store the runtime uses: <data dir>/templates


@pytest.fixture(scope="module")
def template(store: TemplateStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"test-tpl-{secrets.token_hex(4)}"
    img = tmp_path_factory.mktemp("img")
    ti.oci_layout(img, ti.image_layers(), Env=["PATH=/usr/bin:/bin", "GREETING=hello from the image"],
                  WorkingDir="/srv/app")
    import_image(store, name, f"oci:{img}")
    yield name
    if store.exists(name):
        store.remove(name)


@pytest.fixture(params=RUNTIMES_UNDER_TEST)
def runtime(request: pytest.FixtureRequest) -> str:
    usable_runtime(request.param)
    if request.param == "gvisor" and os.geteuid() != 0:
        pytest.skip("rootless gVisor refuses templates (the host mounts their overlay): tests/test_gvisor.py "
                    "checks the refusal")
    return str(request.param)


@pytest.fixture
def make(template: str, runtime: str) -> Iterator[Callable[..., Sandbox]]:
    made: list[Sandbox] = []

    def create(**kwargs: object) -> Sandbox:
        sb = Sandbox.create(policy=base_policy(), template=template, runtime=runtime,  # type: ignore[arg-type]
                            **kwargs)
        made.append(sb)
        return sb

    yield create
    for sb in made:
        sb.kill()


def _run(sb: Sandbox, script: str) -> str:
    r = sb.commands.run(["/bin/sh", "-c", script])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout


def test_the_image_files_env_and_working_dir_apply_and_the_agent_needs_no_python(make):
    sb = make(envs={"CALLER": "mine"})
    assert _run(sb, "cat /etc/hello") == "from the top layer\n"  # the top layer replaced the file
    assert _run(sb, "cat /srv/app/readme") == "the app\n"
    assert _run(sb, "tool") == "original tool\n"  # on the image's PATH
    out = _run(sb, 'echo "$GREETING|$CALLER|$(pwd)"')
    assert out == "hello from the image|mine|/srv/app\n"
    # no python in the image: the agent runs on the host's, which is only under /opt/stockade
    assert _run(sb, "for p in /usr/bin/python3 /bin/python3 /usr/lib/python3; do [ -e $p ] && echo $p; done; "
                    "echo end") == "end\n"
    assert str(sb.info().runtime["template"]).startswith("test-tpl-")


def test_writes_anywhere_stay_in_the_sandbox_own_layer(make, store: TemplateStore, template: str):
    first, second = make(), make()
    _run(first, "echo changed > /usr/bin/tool; echo new > /srv/app/new; echo x > /toplevel")
    assert _run(first, "cat /usr/bin/tool /srv/app/new /toplevel") == "changed\nnew\nx\n"
    # the other sandbox of the same template sees the image as it is
    assert _run(second, "cat /usr/bin/tool; [ -e /srv/app/new ] || echo no-new; [ -e /toplevel ] || echo no-top") \
        == "#!/bin/sh\necho original tool\nno-new\nno-top\n"
    # and so does the store: the layer trees are unchanged
    resolved = store.resolve(template)
    top = resolved.layer_dirs[-1]
    assert (top / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho original tool\n"
    assert not (top / "srv/app/new").exists()
    assert not any((d / "toplevel").exists() for d in resolved.layer_dirs)
    # as root the image's directories are root's and stay closed to the sandbox's user; unprivileged the
    # store (and so the image) belongs to the caller, whose uid the sandbox's user is: it may write there,
    # into its own layer as everywhere
    r = first.commands.run(["/bin/sh", "-c", "echo x > /etc/new && cat /etc/new"])
    if os.geteuid() == 0:
        assert r.exit_code != 0
    else:
        assert (r.exit_code, r.stdout) == (0, "x\n")
        assert not any((d / "etc/new").exists() for d in resolved.layer_dirs)
        assert _run(second, "[ -e /etc/new ] || echo absent") == "absent\n"


def test_teardown_removes_the_layer_and_releases_the_template(make, store: TemplateStore, template: str,
                                                              runtime: str):
    sb = make()
    _run(sb, "echo data > /srv/app/file")
    described = sb.info().runtime
    assert described["template"] == template
    # as root the writable layer is on the workspace's image of workspace_size; unprivileged it is unbounded,
    # and said to be
    assert described["root_write_limit"] == (Policy().filesystem.workspace_size if os.geteuid() == 0 else None)
    with pytest.raises(TemplateInUseError):
        store.remove(template)
    host = runtime_class(runtime)()
    layer_dir = host.overlay_dir / sb.sandbox_id
    assert layer_dir.is_dir()
    assert any("template overlay" in t for t in host.leftovers(sb.sandbox_id))
    sb.kill()
    # (processes are not asked for here: another sandbox on this host may get the same uid at once)
    assert host.leftovers(sb.sandbox_id) == []
    assert not layer_dir.exists()
    assert store.in_use(template) is None


def test_the_sweep_removes_a_writable_layer_a_dead_process_left(runtime: str):
    host = runtime_class(runtime)()
    stale = host.overlay_dir / f"sbx-stale{secrets.token_hex(4)}"
    (stale / "upper" / "usr").mkdir(parents=True)
    (stale / "upper" / "usr" / "written").write_text("left behind")
    (stale / "work").mkdir()
    assert any("template overlay" in t for t in host.leftovers(stale.name))
    assert stale.name in asyncio.run(host.sweep_stale())
    assert not stale.exists()
    assert host.leftovers(stale.name) == []


def test_an_unknown_template_is_refused_naming_it(runtime: str):
    with pytest.raises(PolicyError) as err:
        Sandbox.create(policy=base_policy(), template="no-such-template", runtime=runtime)
    assert err.value.field == "template"
    assert "no-such-template" in str(err.value)


def test_isolation_basics_hold_on_a_template_root(make, tmp_path: Path):
    secret = tmp_path / "host-secret"
    secret.write_text("host only")
    sb = make()
    status = _run(sb, "while read k v rest; do case $k in Uid:|Gid:|CapEff:) echo $k $v;; esac; done "
                      "< /proc/self/status")
    assert status == "Uid: 1000\nGid: 1000\nCapEff: 0000000000000000\n"
    assert _run(sb, f"[ -e {secret} ] && echo visible; [ -e /work ] && echo work; [ -e /root ] && echo root; "
                    "[ -e /var/lib/stockade ] && echo state; echo end") == "end\n"
    # no network but loopback
    devices = _run(sb, "while read a rest; do echo $a; done < /proc/net/dev")
    assert [d for d in devices.split() if d.endswith(":")] == ["lo:"]
    assert _run(sb, "cat /etc/hostname") == "sandbox\n"
    assert "user:x:1000:1000" in _run(sb, "cat /etc/passwd")  # the image's, with the sandbox user's entry added


def test_through_a_server_a_template_sandbox_is_never_a_default_root_warm_one(api_server, tmp_path: Path):
    from stockade.sdk.transports.remote import RemoteTransport

    # the server's templates are those of its own data directory
    server_store = TemplateStore(Path(api_server.data_dir) / "templates")
    template = f"test-tpl-{secrets.token_hex(4)}"
    ti.oci_layout(tmp_path / "img", ti.image_layers())
    import_image(server_store, template, f"oci:{tmp_path}/img")
    transport = RemoteTransport(api_server.url, api_server.key("conformance"))
    # the server's warm pool holds sandboxes of this very policy: a template sandbox must not be one of them
    with Sandbox.create(policy=base_policy(), template=template, transport=transport) as sb:
        assert sb.info().runtime["template"] == template
        assert _run(sb, "cat /etc/hello") == "from the top layer\n"
    with pytest.raises(PolicyError) as err:
        Sandbox.create(policy=base_policy(), template="no-such-template", transport=transport)
    assert err.value.field == "template"
    server_store.remove(template)  # released: the sandbox has ended


def test_a_server_keeps_a_warm_pool_per_template(runtime: str, tmp_path: Path, shared_dir: Path):
    from stockade.sdk.transports.remote import RemoteTransport

    from .conftest import sandbox_traces
    from .server_support import RunningServer
    from .waiting import wait_until

    data = shared_dir / "server"
    data.mkdir()
    template = f"test-tpl-{secrets.token_hex(4)}"
    ti.oci_layout(tmp_path / "img", ti.image_layers(), Env=["PATH=/usr/bin:/bin"])
    import_image(TemplateStore(data / "templates"), template, f"oci:{tmp_path}/img")
    from stockade.config import HostConfig

    # the server's default runtime is the one under test, over the server's own data directory
    host_runtime = runtime_class(runtime)(dataclasses.replace(HostConfig.from_env(), data_dir=data))
    server = RunningServer(data_dir=data, runtime=host_runtime, warm_pools={template: 2},
                           warm_pool_policy=base_policy().model_dump(mode="json"))
    pool = server.server.manager.pools[template]  # type: ignore[union-attr]
    waiting: list[tuple[str, dict[str, object]]] = []
    try:
        assert None not in server.server.manager.pools  # type: ignore[union-attr]  # warm_pool = 0
        wait_until(lambda: len(pool.ready) == 2, 60, "the template's warm pool to fill")
        warm_ids = {sb.id for sb, _ in pool.ready}
        key = server.key("alice")
        transport = RemoteTransport(server.url, key)
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        health = http.get("/health").json()
        assert (health["warm"], health["warm_by_template"]) == (2, {template: 2})
        # a pooled sandbox holds its template: it cannot be removed under it
        with pytest.raises(TemplateInUseError):
            TemplateStore(data / "templates").remove(template)
        a = Sandbox.create(policy=base_policy(), template=template, envs={"GREETING": "hi a"}, transport=transport)
        b = Sandbox.create(policy=base_policy(), template=template, transport=transport)
        try:
            assert {a.sandbox_id, b.sandbox_id} == warm_ids
            assert a.info().runtime["template"] == template
            # the template's files, the caller's variables bound at claim time, and a root of its own
            assert _run(a, "cat /etc/hello; echo $GREETING; echo mine > /mark; cat /mark") == \
                "from the top layer\nhi a\nmine\n"
            assert _run(b, "echo ${GREETING:-unset}; cat /mark 2>&1 || true") == \
                "unset\ncat: /mark: No such file or directory\n"
            other = Sandbox.create(policy=base_policy(limits={"pids": 100}), template=template, transport=transport)
            with other:
                assert other.sandbox_id not in warm_ids  # another policy: started for the caller
            host_root = Sandbox.create(policy=base_policy(), transport=transport)
            with host_root:  # this server pools the template only
                assert host_root.sandbox_id not in warm_ids and host_root.info().runtime["template"] is None
            events = http.get("/events", params={"type": "sandbox.create"}).json()
            creates = {e["sandbox_id"]: e["data"]["warm"] for e in events}
            assert creates == {a.sandbox_id: True, b.sandbox_id: True, other.sandbox_id: False,
                               host_root.sandbox_id: False}
        finally:
            a.kill()
            b.kill()
        wait_until(lambda: len(pool.ready) == 2, 60, "the template's warm pool to refill")
        assert not {sb.id for sb, _ in pool.ready} & warm_ids  # never handed out twice
        waiting = [(sb.id, sb.describe()) for sb, _ in pool.ready]
    finally:
        server.stop()
    for sid, facts in waiting:  # the pool's sandboxes go with the server, and release the template
        wait_until(lambda: not sandbox_traces(facts, sid), 15, f"warm sandbox {sid} to leave no trace",  # noqa: B023
                   show=lambda: sandbox_traces(facts, sid))  # noqa: B023 - called at once
    TemplateStore(data / "templates").remove(template)


def test_a_server_refuses_to_start_a_warm_pool_of_an_unknown_template(shared_dir: Path):
    from stockade.config import HostConfig
    from stockade.server.service import Server
    from stockade.server.settings import ServerSettings

    settings = ServerSettings.model_validate({"data_dir": str(shared_dir), "warm_pools": {"no-such-tpl": 1}})
    server = Server(settings, dataclasses.replace(HostConfig.from_env(), data_dir=shared_dir))
    with pytest.raises(PolicyError) as err:
        asyncio.run(server.start())
    assert err.value.field == "warm_pools.no-such-tpl" and "template import" in str(err.value)


def test_stockade_run_takes_a_template(template: str, tmp_path: Path):
    import subprocess
    import sys

    weak = []
    if os.geteuid() != 0:  # unprivileged: no cgroups, accepted through a policy file
        (tmp_path / "policy.toml").write_text('allow_missing_controls = ["memory", "pids", "cpu"]\n')
        weak = ["--policy", str(tmp_path / "policy.toml")]
    run = [sys.executable, "-m", "stockade.cli", "run", *weak]
    r = subprocess.run([*run, "--template", template, "--", "/bin/sh", "-c", "cat /etc/hello"],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "from the top layer\n"), r.stderr
    r = subprocess.run([*run, "--template", "no-such-template", "--", "true"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "template" in r.stderr and "no-such-template" in r.stderr


def test_image_symlinks_never_lead_the_host_to_create_mount_points_outside(store: TemplateStore, tmp_path: Path,
                                                                           runtime: str):
    """An image whose /home, /opt and /etc/hostname are symlinks out of it (absolute and through ..): root
    makes bwrap's mount points in the merged tree, and must follow none of them onto the host."""
    marker = tmp_path / "host"
    marker.mkdir()
    hostile = ti.layer(*ti.image_layers_entries(), ti.entry("symlink", "home", target=str(marker)),
                       ti.entry("symlink", "opt", target="../../../../../../" + str(marker).lstrip("/")),
                       ti.entry("symlink", "tmp", target="/"))
    name = f"test-tpl-{secrets.token_hex(4)}"
    ti.oci_layout(tmp_path / "img", [hostile])
    import_image(store, name, f"oci:{tmp_path}/img")
    try:
        try:
            with Sandbox.create(policy=base_policy(), template=name, runtime=runtime) as sb:
                sb.commands.run(["/bin/sh", "-c", "echo x > /home/user/f"])
        except Exception as exc:  # noqa: BLE001 - refusing to start is fine; writing on the host is not
            assert "sandbox" in str(exc).lower() or "mount" in str(exc).lower(), exc
        assert list(marker.iterdir()) == []
        assert not os.path.exists("/user") and not os.path.exists("/stockade")
    finally:
        store.remove(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root the writable layer is on the workspace's disk image; "
                    "unprivileged it is the state dir's disk, unbounded (doctor says so)")
def test_the_writable_root_is_bounded_by_the_workspace_size_on_disk_not_in_memory(template: str,
                                                                                   runtime: str) -> None:
    """What a template sandbox writes in its root ends in ENOSPC at filesystem.workspace_size, not on the
    host's disk and not in memory (more than limits.memory fits, no OOM kill); its root and /home/user share
    the bound, and the rest of its root stays usable."""
    policy = {"limits": {"memory": "128MiB"}, "filesystem": {"workspace_size": "200MiB"}}
    with Sandbox.create(template=template, policy=policy, runtime=runtime) as sb:
        described = sb.info().runtime
        assert described["root_write_limit"] == 200 << 20 and described["workspace_backing"] == "disk image"
        r = sb.commands.run("cat /dev/zero > /big; echo rc=$?", timeout=120)  # the image has only sh and cat
        assert "No space left on device" in r.stderr and r.stdout == "rc=1\n", (r.stdout, r.stderr)
        assert r.limit is None, r.error
        r = sb.commands.run("cat /dev/zero > /home/user/more; echo rc=$?")  # the same image, full
        assert "No space left on device" in r.stderr and r.stdout == "rc=1\n", (r.stdout, r.stderr)
        assert sb.is_running()
        assert sb.commands.run(": > /big; echo small > /ok && cat /ok").stdout == "small\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="as root the host tears down the root's mounts; unprivileged "
                    "the layer is removed by a tree walk that follows no symlink (test_teardown_... covers it)")
def test_a_symlink_planted_in_the_root_does_not_steer_the_teardown(template: str, shared_dir: Path,
                                                                    runtime: str) -> None:
    canary = shared_dir / "canary"
    canary.mkdir()
    (canary / "keep").write_text("host file")
    # the image has no ln: the host's (it needs only the C library the image has) is mounted in
    mounts = [{"source": os.path.realpath("/bin/ln"), "target": "/opt/ln"}]
    sb = Sandbox.create(template=template, policy=base_policy(filesystem={"mounts": mounts}), runtime=runtime)
    try:
        described = sb.info().runtime
        _run(sb, f"/opt/ln -s {canary} /planted && /opt/ln -s {canary} /srv/app/planted && "
                 f"/opt/ln -s / /srv/app/root && /opt/ln -s {canary} /home/user/planted")
    finally:
        sb.kill()
    assert (canary / "keep").read_text() == "host file"
    assert runtime_class(runtime)().leftovers(sb.sandbox_id, described) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="as root the overlay is the host's mount; unprivileged it is in "
                    "bwrap's own mount namespace, under the caller's state dir")
def test_the_sandbox_mountinfo_names_no_host_directory_uid_or_device(make, store: TemplateStore) -> None:
    """overlayfs shows its options as given: the jail names the layers and the writable layer by
    descriptor, so the sandbox's mountinfo carries neither the data directory nor its own id."""
    sb = make()
    mountinfo = _run(sb, "cat /proc/self/mountinfo")
    assert str(store.root) not in mountinfo and str(store.root.parent) not in mountinfo
    assert sb.sandbox_id not in mountinfo, mountinfo
    root_line = next(line for line in mountinfo.splitlines() if line.split()[4] == "/")
    assert "/var/" not in root_line and "/run/" not in root_line, root_line
    # nor anything else of the host: the agent's python, /dev, the generated files (host_mounts.py)
    assert host_leaks(mountinfo, sb.info().runtime.get("host_uid"), sb.sandbox_id) == [], mountinfo


def test_no_other_host_user_reaches_the_sandbox_root_layer(make, runtime: str) -> None:
    """The merged root and the writable layer are the sandbox's own: no other host user may list or read
    them (uid 1000, whom gVisor's sandbox user maps to on the host, and nobody)."""
    sb = make()
    _run(sb, "echo mine > /srv/app/written")
    base = runtime_class(runtime)().overlay_dir / sb.sandbox_id
    targets = [base / "root" / "srv/app", base / "root" / "srv/app/written", base / "upper"]
    for uid in (1000, 65534):
        pid = os.fork()
        if pid == 0:  # the child: become the host user, then try each path
            code = 0
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                for target in targets:
                    try:
                        os.listdir(target) if target.name != "written" else target.read_bytes()
                        code = 1
                    except (PermissionError, FileNotFoundError, NotADirectoryError):
                        pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"host uid {uid} reached the sandbox's root layer"


def test_run_code_works_in_an_image_without_python(make):
    """The code interpreter runs on the host's python through its own loader, as the agent does: cells keep
    their state and see the image's environment, errors come back named. A context starts in /home/user,
    as everywhere (the image's working directory is the commands' default)."""
    sb = make()
    assert sb.run_code("x = 21").error is None
    assert sb.run_code("x * 2").text == "42"
    where = sb.run_code("import os; (os.getcwd(), os.environ['GREETING'])").text
    assert where == "('/home/user', 'hello from the image')"
    failed = sb.run_code("1 / 0")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    assert sb.run_code("x").text == "21"   # the context lived through the error
    # the image's own files, read from a cell; an artifact saved from a cell reaches the host
    assert sb.run_code("open('/etc/hello').read()").text == "'from the top layer\\n'"
    assert sb.run_code("from stockade_artifacts import save; save('out.txt', 'made in a template')").error is None
    assert sb.artifacts.get("out.txt") == b"made in a template"


@pytest.fixture
def serving_template(store: TemplateStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """Templates of the same image with a start and a ready command (sleep is the host's, mounted at
    /opt/sleep by the policy: the image has only sh and cat)."""
    names: list[str] = []

    def make(start: list[str], ready: list[str] | None) -> str:
        name = f"test-tpl-{secrets.token_hex(4)}"
        img = tmp_path_factory.mktemp("img")
        ti.oci_layout(img, ti.image_layers(), Env=["PATH=/usr/bin:/bin"], WorkingDir="/srv/app")
        import_image(store, name, f"oci:{img}", start_command=start, ready_command=ready)
        names.append(name)
        return name

    yield make
    for name in names:
        if store.exists(name):
            store.remove(name)


SLEEP_MOUNT = {"mounts": [{"source": os.path.realpath("/bin/sleep"), "target": "/opt/sleep"}]}


def test_a_template_sandbox_is_handed_out_once_its_start_command_is_ready(serving_template, runtime: str):
    name = serving_template(["/bin/sh", "-c", "/opt/sleep 0.5; echo up > /srv/app/ready; exec /opt/sleep 600"],
                            ["/bin/sh", "-c", "cat /srv/app/ready"])
    with Sandbox.create(template=name, runtime=runtime, policy=base_policy(filesystem=SLEEP_MOUNT)) as sb:
        # create returned only after the ready command succeeded: the file is there at once
        assert _run(sb, "cat /srv/app/ready") == "up\n"
        running = [p.cmd for p in sb.commands.list()]
        assert any("/opt/sleep 600" in c for c in running), running


def test_a_template_whose_ready_command_never_succeeds_is_refused_and_leaves_nothing(
        serving_template, runtime: str, monkeypatch: pytest.MonkeyPatch):
    from stockade.core import lifecycle
    from stockade.errors import SandboxUnavailableError

    monkeypatch.setattr(lifecycle, "READY_TIMEOUT", 1.0)
    name = serving_template(["/opt/sleep", "600"], ["/bin/sh", "-c", "echo not yet >&2; exit 3"])
    before = {s.sandbox_id for s in Sandbox.list()}
    with pytest.raises(SandboxUnavailableError) as err:
        Sandbox.create(template=name, runtime=runtime, policy=base_policy(filesystem=SLEEP_MOUNT))
    message = str(err.value)
    assert "ready command" in message and "exit code 3" in message and "not yet" in message
    assert "--ready-cmd" in err.value.advice
    assert {s.sandbox_id for s in Sandbox.list()} == before   # killed, not left running
    # a start command that cannot start is refused the same way, naming it
    missing = serving_template(["/no/such/server"], None)
    with pytest.raises(SandboxUnavailableError, match="start command '/no/such/server' could not start"):
        Sandbox.create(template=missing, runtime=runtime, policy=base_policy())


# --- the image's user and its files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def user_templates(store: TemplateStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Templates of one image whose USER is node, unset (root) and app."""
    made = {}
    for user in ("node", "", "app"):
        name = f"test-user-{user or 'root'}-{secrets.token_hex(3)}"
        img = tmp_path_factory.mktemp("img")
        ti.oci_layout(img, ti.user_image_layers(), Env=["PATH=/usr/bin:/bin"], User=user)
        import_image(store, name, f"oci:{img}")
        made[user] = name
    yield made
    for name in made.values():
        if store.exists(name):
            store.remove(name)


def _ids(sb: Sandbox) -> tuple[str, str]:
    status = _run(sb, "cat /proc/self/status")
    line = {k: v.split() for k, _, v in (row.partition(":") for row in status.splitlines())}
    return line["Uid"][0], line["Gid"][0]


def test_a_template_sandbox_runs_as_the_image_user_who_owns_the_image_files_it_gave_that_user(
        user_templates: dict[str, str], runtime: str, store: TemplateStore) -> None:
    with Sandbox.create(policy=base_policy(), template=user_templates["node"], runtime=runtime) as sb:
        assert _ids(sb) == ("1000", "1000")
        assert _run(sb, 'echo "$USER $LOGNAME"') == "node node\n"
        assert "node:x:1000:1000::/home/node:/bin/sh" in _run(sb, "cat /etc/passwd")
        _run(sb, "echo more >> /home/node/app.txt && echo new > /home/node/new")
        assert _run(sb, "cat /home/node/app.txt /home/node/new") == "node's\nmore\nnew\n"
        r = sb.commands.run(["/bin/sh", "-c", "echo x > /etc/rootfile"])
        # as root, root's files stay root's; unprivileged every file of the store is its owner's, whom the
        # sandbox user is (the write lands in the sandbox's own layer either way)
        assert (r.exit_code != 0 and "Permission denied" in r.stderr) == (os.geteuid() == 0), r
        info = sb.info().runtime
        assert info["user"] == {"uid": 1000, "gid": 1000, "name": "node"}
        if os.geteuid() == 0:
            assert info["image_owners"] == "mapped (idmapped layers)"
        # another sandbox of the template sees the image's file, not the first one's write
        with Sandbox.create(policy=base_policy(), template=user_templates["node"], runtime=runtime) as other:
            assert _run(other, "cat /home/node/app.txt") == "node's\n"
            if os.geteuid() == 0 and runtime == "jail":   # one host uid per sandbox, each its own mapping
                assert sb.info().runtime["host_uid"] != other.info().runtime["host_uid"]
    # the store's copy is untouched, and kept at the shifted owner (as root)
    layer = store.resolve(user_templates["node"]).layer_dirs[0] / "home" / "node" / "app.txt"
    assert layer.read_bytes() == b"node's\n"
    if os.geteuid() == 0:
        assert layer.stat().st_uid == STORE_ID_BASE + 1000


def test_an_image_whose_user_is_root_runs_as_uid_1000_and_owns_uid_1000_files(
        user_templates: dict[str, str], runtime: str) -> None:
    with Sandbox.create(policy=base_policy(), template=user_templates[""], runtime=runtime) as sb:
        assert _ids(sb) == ("1000", "1000")
        assert _run(sb, "echo $USER") == "node\n"
        _run(sb, "echo more >> /home/node/app.txt")
        r = sb.commands.run(["/bin/sh", "-c", "echo x > /etc/rootfile"])
        assert (r.exit_code != 0) == (os.geteuid() == 0)


def test_another_image_user_cannot_write_what_the_image_gave_uid_1000(user_templates: dict[str, str],
                                                                      runtime: str) -> None:
    with Sandbox.create(policy=base_policy(), template=user_templates["app"], runtime=runtime) as sb:
        assert _ids(sb) == ("1500", "1500")
        assert _run(sb, "cat /home/node/app.txt") == "node's\n"
        r = sb.commands.run(["/bin/sh", "-c", "echo x >> /home/node/app.txt"])
        assert (r.exit_code != 0 and "Permission denied" in r.stderr) == (os.geteuid() == 0), r
        _run(sb, "echo mine > /home/user/f && cat /home/user/f")   # the workspace is the user's


@pytest.mark.skipif(os.geteuid() != 0, reason="idmapped layers are mounted by root")
def test_the_idmapped_layers_are_detached_once_the_overlay_holds_them(user_templates: dict[str, str],
                                                                      runtime: str) -> None:
    def idmapped() -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line for line in f if "idmapped" in line.split(" - ")[0]]

    before = idmapped()
    with Sandbox.create(policy=base_policy(), template=user_templates["node"], runtime=runtime) as sb:
        base = runtime_class(runtime)().overlay_dir / sb.sandbox_id
        assert not (base / "lower").exists()
        assert idmapped() == before
        _run(sb, "cat /home/node/app.txt")
    assert idmapped() == before
