"""Bad input gets a clear error and harms nothing: hostile paths, huge writes, odd commands."""

from __future__ import annotations

import os

import pytest

from stockade import FilesystemError, PathNotFoundError, PolicyError, Sandbox, SandboxNotFoundError


def test_unknown_ids_are_not_found(make_sandbox, transport):
    with pytest.raises(SandboxNotFoundError, match="does not exist"):
        Sandbox.connect("sbx-0000000000000000", transport=transport)
    make_sandbox()  # ids of live sandboxes do not help guess others
    for bad in ("../../etc", "sbx-%2e%2e", "a/b", "x" * 5000, "sbx-\u00e9\n"):
        with pytest.raises(SandboxNotFoundError):
            Sandbox.connect(bad, transport=transport)


@pytest.mark.parametrize("policy,field", [
    ({"limits": {"memory": "lots"}}, "limits.memory"),
    ({"limits": {"pids": 0}}, "limits.pids"),
    ({"limits": {"cpus": -1}}, "limits.cpus"),
    ({"network": {"mode": "open"}}, "network.mode"),
    ({"filesystem": {"mounts": [{"source": "relative", "target": "/mnt/x"}]}}, "filesystem.mounts.0.source"),
    ({"filesystem": {"mounts": [{"source": "/etc", "target": "/usr/lib"}]}}, "filesystem.mounts.0.target"),
    ({"lifetime": {"timeout": "2h", "max_lifetime": "1h"}}, "lifetime.timeout"),
    ({"limits": {"memroy": "1G"}}, "limits.memroy"),
])
def test_invalid_policies_name_the_field(policy, field, transport, runtime_name):
    with pytest.raises(PolicyError) as err:
        Sandbox.create(policy=policy, transport=transport, runtime=runtime_name)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_mount_of_a_missing_host_path_names_the_field(make_sandbox):
    with pytest.raises(PolicyError, match=r"filesystem.mounts.0.source: /nonexistent/x does not exist"):
        make_sandbox(filesystem={"mounts": ["/nonexistent/x:/mnt/x"]})


def test_dotdot_paths_stay_inside_the_sandbox(make_sandbox):
    sb = make_sandbox()
    name = f"escape-{sb.sandbox_id}.txt"
    sb.files.write(f"../../tmp/{name}", "inside")
    assert sb.files.read(f"/tmp/{name}") == "inside"
    assert not os.path.exists(f"/tmp/{name}")  # the host's /tmp never saw it
    with pytest.raises(PathNotFoundError):
        sb.files.read("../../../../root/.bashrc")
    passwd = sb.files.read("../../../../../etc/passwd")
    assert "user:x:1000:1000" in passwd and "daemon:" not in passwd  # the generated file, not the host's


def test_symlinks_to_host_only_paths_lead_nowhere(make_sandbox, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("HOST-ONLY")
    sb = make_sandbox()
    sb.commands.run(f"ln -s {secret} link; ln -s /root/.ssh/id_rsa key; ln -s /proc/1/root/etc/shadow shadow")
    for name in ("link", "key", "shadow"):
        with pytest.raises(FilesystemError):
            sb.files.read(name)
    assert sb.files.get_info("link").type == "symlink"
    sb.files.remove("link")  # removes the link, never the target
    assert secret.read_text() == "HOST-ONLY"


def test_reading_special_files_is_refused_not_hung(make_sandbox):
    sb = make_sandbox()
    sb.commands.run("mkfifo /tmp/fifo")
    for path in ("/tmp/fifo", "/dev/zero", "/tmp"):
        with pytest.raises(FilesystemError):
            sb.files.read(path)
    assert sb.commands.run("echo fine").stdout == "fine\n"


def test_huge_write_fails_cleanly_with_enospc(make_sandbox):
    sb = make_sandbox(filesystem={"workspace_size": "4MiB"})
    with pytest.raises(FilesystemError) as err:
        sb.files.write("big.bin", b"\0" * (16 << 20))
    assert err.value.errno_name in ("ENOSPC", "EFBIG")
    sb.files.remove("big.bin")
    sb.files.write("small.txt", "ok")
    assert sb.files.read("small.txt") == "ok"


def test_command_that_closes_stdout_early_keeps_running(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run("echo before; exec 1>&-; sleep 0.3; echo after >&2; exit 4")
    assert (r.stdout, r.stderr, r.exit_code) == ("before\n", "after\n", 4)


def test_background_grandchild_holding_stdout_does_not_block(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run("sleep 30 & echo started", timeout=10)
    assert r.stdout == "started\n" and r.exit_code == 0 and not r.timed_out


def test_binary_garbage_output(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run("head -c 100000 /dev/urandom")
    assert len(r.stdout_bytes) == 100000
    assert isinstance(r.stdout, str)  # decoded with replacement characters
    r = sb.commands.run(["printf", "\\377\\376\\000ok"])
    assert r.stdout_bytes == b"\xff\xfe\x00ok"


def test_missing_program_and_bad_cwd(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run(["no-such-program"])
    assert r.exit_code == 127 and "no-such-program" in r.stderr
    r = sb.commands.run(["true"], cwd="/nonexistent")
    assert r.exit_code == 127 and "No such file" in r.stderr
    with pytest.raises(PolicyError):
        sb.commands.run([])
    with pytest.raises(PolicyError, match="environment variable name"):
        sb.commands.run("true", envs={"BAD=NAME": "x"})
