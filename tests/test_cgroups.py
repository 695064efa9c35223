"""The cgroup v2 driver on a fake cgroupfs tree (this CI host is v1; the conformance suite covers v1 for
real), and v1/v2 detection: this host's, checked against its mountinfo, and a unified, a hybrid and a bare
host's from a fake mountinfo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.runtime import cgroups
from stockade.runtime.jail.runtime import _enter


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "stockade").mkdir()  # the kernel would create the interface files of a new cgroup
    (root / "stockade" / "cgroup.subtree_control").write_text("")
    return root


def test_v2_limits_are_written_where_the_kernel_reads_them(tmp_path, monkeypatch):
    root = fake_v2(tmp_path / "cg")
    writes: list[tuple[Path, str]] = []
    real_write = cgroups._write
    monkeypatch.setattr(cgroups, "_write", lambda p, v: (writes.append((p, v)), real_write(p, v)))
    host = cgroups._detect_v2(root, "stockade")
    assert host.version == 2 and host.usable == ("memory", "pids", "cpu") and not host.problems
    for c in ("memory", "pids", "cpu"):  # delegated at every level down to the sandboxes' parent
        assert (root / "cgroup.subtree_control", f"+{c}") in writes
        assert (root / "stockade" / "cgroup.subtree_control", f"+{c}") in writes
    cg = cgroups.Cgroup(host, "sbx-1")
    assert cg.dirs == [root / "stockade" / "sbx-1"]  # one directory: all controllers in one tree
    d = root / "stockade" / "sbx-1"
    d.mkdir()
    for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cgroup.procs"):
        (d / name).write_text("")
    cg._limit(memory=256 << 20, pids=64, cpus=1.5)
    assert (d / "memory.max").read_text() == str(256 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "150000 100000"
    # bwrap's process joins the sandbox's cgroup before exec (then unshares the cgroup namespace there)
    enter = _enter(cg, None)
    assert enter is not None
    enter()
    assert (d / "cgroup.procs").read_text() == str(os.getpid())


def test_memory_usage_is_read_from_each_version_s_own_files(tmp_path):
    """v2: memory.current and memory.stat's ``file``; v1: memory.usage_in_bytes and ``total_cache`` (not the
    cgroup's own ``cache``, which leaves out its children)."""
    v2 = cgroups.CgroupHost(2, {"memory": tmp_path / "v2"})
    v1 = cgroups.CgroupHost(1, {"memory": tmp_path / "v1"})
    for host, files in ((v2, {"memory.current": "1048576\n", "memory.stat": "anon 4096\nfile 65536\n"}),
                        (v1, {"memory.usage_in_bytes": "2097152\n",
                              "memory.stat": "cache 1\nrss 2\ntotal_cache 131072\ntotal_rss 3\n"})):
        d = host.parents["memory"] / "sbx-1"
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text)
    assert cgroups.Cgroup(v2, "sbx-1").memory_usage() == (1 << 20, 65536)
    assert cgroups.Cgroup(v1, "sbx-1").memory_usage() == (2 << 20, 131072)
    (tmp_path / "v2" / "sbx-1" / "memory.current").unlink()  # gone (the sandbox ended): no figure, no error
    assert cgroups.Cgroup(v2, "sbx-1").memory_usage() is None
    assert cgroups.Cgroup(cgroups.CgroupHost(2, {"pids": tmp_path}), "sbx-1").memory_usage() is None


def test_v2_missing_controller_is_reported_not_faked(tmp_path):
    host = cgroups._detect_v2(fake_v2(tmp_path / "cg", "cpu io"), "stockade")
    assert host.usable == ("cpu",)
    assert "memory" in host.problems["memory"] and "not enabled" in host.problems["memory"]


def _mountinfo_cgroups(text: str) -> dict[str, list[tuple[str, set[str]]]]:
    """fstype -> (mountpoint, super options) of each cgroup mount, read the way proc(5) lays a line out
    (written apart from the driver's own reading, so the two check each other)."""
    found: dict[str, list[tuple[str, set[str]]]] = {}
    for line in text.splitlines():
        fields = line.split()
        sep = fields.index("-")  # optional fields end at a lone hyphen
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype in ("cgroup", "cgroup2"):
            found.setdefault(fstype, []).append((fields[4], set(options.split(","))))
    return found


def _version_from(mounts: dict[str, list[tuple[str, set[str]]]]) -> int | None:
    if any(mountpoint == "/sys/fs/cgroup" for mountpoint, _ in mounts.get("cgroup2", [])):
        return 2  # unified: cgroup2 mounted on /sys/fs/cgroup itself
    return 1 if mounts.get("cgroup") else None  # v1 hierarchies (a hybrid host's empty v2 mount aside)


def test_this_host_is_detected_as_the_version_it_mounts():
    mounts = _mountinfo_cgroups(Path("/proc/self/mountinfo").read_text())
    expected = _version_from(mounts)
    host = cgroups.detect()
    assert host.version == expected, (host, mounts)
    for c in cgroups.CONTROLLERS:
        assert (c in host.parents) != (c in host.problems)
    if expected == 1:  # each usable controller's sandboxes go under that controller's own hierarchy
        v1 = {c: Path(mp) for mp, opts in mounts["cgroup"] for c in cgroups.CONTROLLERS if c in opts}
        assert {c: p.parent for c, p in host.parents.items()} == {c: v1[c] for c in host.parents}


def _fake_mountinfo(tmp_path: Path, monkeypatch, lines: list[str]) -> None:  # noqa: ANN001
    """The driver reads ``lines`` as /proc/self/mountinfo (and every other file as itself)."""
    fake = tmp_path / "mountinfo"
    fake.write_text("".join(line + "\n" for line in lines))
    real_open = open
    monkeypatch.setattr(cgroups, "open", lambda path, *a, **kw: real_open(
        fake if str(path) == "/proc/self/mountinfo" else path, *a, **kw), raising=False)


BASE_MOUNTS = ["22 1 0:21 / /proc rw,nosuid - proc proc rw",
               "23 1 0:22 / /sys rw,nosuid - sysfs sysfs rw"]


def test_a_unified_host_is_detected_as_v2_from_its_mountinfo(tmp_path, monkeypatch):
    _fake_mountinfo(tmp_path, monkeypatch, [*BASE_MOUNTS,
                                            "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    root = fake_v2(tmp_path / "cg")
    probed: list[Path] = []
    real_detect_v2 = cgroups._detect_v2

    def detect_v2(where: Path, parent_name: str) -> cgroups.CgroupHost:  # the fake tree, not the host's
        probed.append(where)
        return real_detect_v2(root, parent_name)

    monkeypatch.setattr(cgroups, "_detect_v2", detect_v2)
    host = cgroups.detect.__wrapped__("stockade")  # uncached: the host's own answer stays as it is
    assert probed == [Path("/sys/fs/cgroup")]
    assert host.version == 2 and host.parents == {c: root / "stockade" for c in cgroups.CONTROLLERS}


def test_a_hybrid_host_is_driven_as_v1_and_a_bare_one_has_none(tmp_path, monkeypatch):
    hierarchies = {c: tmp_path / c for c in ("cpu", "memory", "pids", "devices")}
    for d in hierarchies.values():
        d.mkdir()
    lines = [*BASE_MOUNTS, "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755"]
    lines += [f"{40 + i} 31 0:{40 + i} / {d} rw,relatime - cgroup cgroup rw,{c}"
              for i, (c, d) in enumerate(hierarchies.items())]
    lines.append("50 31 0:50 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw")
    _fake_mountinfo(tmp_path, monkeypatch, lines)
    monkeypatch.setattr(cgroups, "_detect_v2", lambda *a: pytest.fail("a hybrid host was driven as v2"))
    host = cgroups.detect.__wrapped__("stockade")
    assert host.version == 1
    assert host.parents == {c: hierarchies[c] / "stockade" for c in cgroups.CONTROLLERS}
    assert all((hierarchies[c] / "stockade").is_dir() for c in cgroups.CONTROLLERS)
    _fake_mountinfo(tmp_path, monkeypatch, BASE_MOUNTS)
    bare = cgroups.detect.__wrapped__("stockade")
    assert bare.version is None and set(bare.problems) == set(cgroups.CONTROLLERS) and not bare.parents


def test_a_v1_cpuset_parent_gets_its_parents_cpus_and_nodes_and_keeps_its_own(tmp_path):
    """runsc makes each container's cpuset under the parent: a v1 cpuset made empty (as mkdir makes it)
    holds no CPU, so the parent is filled from its own parent; one already set is left as it is."""
    (tmp_path / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "cpuset.mems").write_text("0\n")
    for name, cpus in (("fresh", ""), ("set", "1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cpuset.cpus").write_text(cpus)
        (tmp_path / name / "cpuset.mems").write_text("")
    assert cgroups.fill_v1_cpuset(tmp_path, "fresh") is None
    assert (tmp_path / "fresh/cpuset.cpus").read_text() == "0-1"
    assert (tmp_path / "fresh/cpuset.mems").read_text() == "0"
    assert cgroups.fill_v1_cpuset(tmp_path, "/set/") is None
    assert (tmp_path / "set/cpuset.cpus").read_text() == "1"
    # a directory that is no cpuset cgroup (no cpuset files appear in it) is a reason, not a crash
    problem = cgroups.fill_v1_cpuset(tmp_path, "fresh/plain")
    assert problem is not None and "plain/cpuset.cpus" in problem


def test_this_host_s_v1_cpuset_parent_can_hold_a_cpu():
    mount = cgroups.v1_cpuset_mount()
    if mount is None or os.geteuid() != 0:
        pytest.skip("needs root and a v1 cpuset hierarchy")
    assert cgroups.fill_v1_cpuset(mount, "stockade") is None
    assert (mount / "stockade/cpuset.cpus").read_text().strip() and (mount / "stockade/cpuset.mems").read_text().strip()
