"""Artifacts: the explicit way out of a sandbox for files, with quotas, and kept after the sandbox."""

from __future__ import annotations

import hashlib
import time

import pytest

from stockade import ArtifactError, Artifacts, Sandbox
from stockade.artifacts import DirectoryStore, check_name
from stockade.policy import ArtifactsPolicy


def test_saved_from_a_command_a_script_and_a_cell_and_kept_after_kill(make_sandbox, tmp_path):
    sb = make_sandbox()
    r = sb.commands.run("printf 'a,b\\n1,2\\n' > t.csv && save-artifact table.csv t.csv && "
                        "echo streamed | save-artifact notes.txt")
    assert r.exit_code == 0, r.stderr
    payload = bytes(range(256)) * 4096  # 1 MiB through the python helper
    sb.files.write("blob.bin", payload)
    r = sb.commands.run(["python3", "-c", "from stockade_artifacts import save; "
                                          "print(save('blob.bin', path='blob.bin')['sha256'])"])
    assert r.stdout.strip() == hashlib.sha256(payload).hexdigest()
    e = sb.run_code("save_artifact('cell.txt', 'from a cell')")
    assert e.error is None
    infos = {a.name: a for a in sb.artifacts.list()}
    assert set(infos) == {"table.csv", "notes.txt", "blob.bin", "cell.txt"}
    assert infos["table.csv"].media_type == "text/csv" and infos["table.csv"].size == 8
    assert "save-artifact table.csv" in infos["table.csv"].command
    assert infos["blob.bin"].sha256 == hashlib.sha256(payload).hexdigest()
    sandbox_id = sb.sandbox_id
    sb.kill()
    after = Artifacts(sandbox_id)
    assert after.get("notes.txt") == b"streamed\n"
    assert after.download("blob.bin", tmp_path / "b").read_bytes() == payload
    assert sb.artifacts.get("cell.txt") == b"from a cell"  # the handle of a dead sandbox still works
    with pytest.raises(ArtifactError):
        after.get("missing")


def test_a_figure_is_saved_as_an_image(make_sandbox):
    sb = make_sandbox()
    e = sb.run_code("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                    "fig = plt.figure(); plt.plot([1, 2]); save_artifact('plot.png', fig)")
    if e.error and e.error.name == "ModuleNotFoundError":
        pytest.skip("matplotlib is not in the sandbox environment (stockade env build)")
    assert e.error is None
    assert sb.artifacts.get("plot.png").startswith(b"\x89PNG\r\n\x1a\n")
    assert [a.media_type for a in sb.artifacts.list()] == ["image/png"]


def test_quotas_refuse_and_leave_nothing(make_sandbox):
    sb = make_sandbox(artifacts={"count": 2, "max_size": "64KiB", "total_size": "100KiB"})
    assert sb.commands.run("head -c 70000 /dev/zero | save-artifact big").exit_code == 1
    r = sb.commands.run("head -c 70000 /dev/zero | save-artifact big")
    assert "artifacts.max_size" in r.stderr
    assert sb.commands.run("head -c 60000 /dev/zero | save-artifact one").exit_code == 0
    r = sb.commands.run("head -c 60000 /dev/zero | save-artifact two")
    assert r.exit_code == 1 and "artifacts.total_size" in r.stderr
    assert sb.commands.run("echo small | save-artifact two").exit_code == 0
    r = sb.commands.run("echo x | save-artifact three")
    assert r.exit_code == 1 and "artifacts.count" in r.stderr
    assert sb.commands.run("echo replaced | save-artifact two").exit_code == 0  # same name: not a new one
    assert sorted(a.name for a in sb.artifacts.list()) == ["one", "two"]
    assert sb.artifacts.get("two") == b"replaced\n"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "..", "", "tab\there", "nl\nhere", "x" * 300,
                                  "rtl\u202eoverride"])
def test_bad_names_are_refused(name):
    with pytest.raises(ArtifactError):
        check_name(name)


def test_bad_names_from_inside_never_reach_the_disk(make_sandbox):
    sb = make_sandbox()
    for name in ("../../../../tmp/escape", ".bashrc", "a/b"):
        r = sb.commands.run(["save-artifact", name, "-"], stdin="x")
        assert r.exit_code == 1 and "artifact name" in r.stderr
    assert sb.artifacts.list() == []


def test_retention_prunes_old_artifacts(tmp_path):
    store = DirectoryStore(tmp_path)
    writer = store.begin("sbx-00aa", "old.txt", "test", ArtifactsPolicy(retention=60))
    writer.write(b"data")
    writer.commit()
    assert store.prune(now=time.time() + 30) == 0
    assert store.prune(now=time.time() + 120) == 1
    assert store.list("sbx-00aa") == []


def test_unknown_sandboxes_have_no_artifacts():
    assert Artifacts("sbx-ffffffffffffffff").list() == []
    with pytest.raises(ArtifactError):
        Artifacts("../../etc").list()
    assert isinstance(Sandbox, type)


def test_hostile_clients_of_the_artifact_socket_do_not_harm_the_agent(make_sandbox):
    sb = make_sandbox()
    code = """
import socket
held = []
for i in range(100):  # more connections than the agent serves at once, none finishing
    s = socket.socket(socket.AF_UNIX); s.connect("\\0stockade-agent"); held.append(s)
for s in held[:5]:
    s.sendall(b"this is not json\\n" + b"x" * 100000); s.shutdown(socket.SHUT_WR)
for s in held[5:10]:
    s.sendall(b'{"name": "../../escape"}\\n data'); s.shutdown(socket.SHUT_WR)
answers = [s.recv(200) for s in held[:10]]
print(sum(b'"ok":false' in a or a == b"" for a in answers))
"""
    r = sb.commands.run(["python3", "-c", code], timeout=30)
    assert r.stdout.strip() == "10", r.stderr
    assert sb.commands.run("echo alive").stdout == "alive\n"
    assert sb.commands.run("echo fine | save-artifact fine.txt").exit_code == 0
    assert [a.name for a in sb.artifacts.list()] == ["fine.txt"]
