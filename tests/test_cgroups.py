"""The cgroup v2 driver on a fake cgroupfs tree (this CI host is v1; the conformance suite covers v1 for
real), and v1/v2 detection."""

from __future__ import annotations

import os
from pathlib import Path

from stockade.runtime.jail import cgroups
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


def test_v2_missing_controller_is_reported_not_faked(tmp_path):
    host = cgroups._detect_v2(fake_v2(tmp_path / "cg", "cpu io"), "stockade")
    assert host.usable == ("cpu",)
    assert "memory" in host.problems["memory"] and "not enabled" in host.problems["memory"]


def test_this_host_is_detected():
    host = cgroups.detect()
    assert host.version in (1, 2, None)
    for c in cgroups.CONTROLLERS:
        assert (c in host.parents) != (c in host.problems)
