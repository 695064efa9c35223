from __future__ import annotations

import json

import pytest

from stockade import Policy, PolicyError
from stockade.policy import parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("1G", 1 << 30), ("64k", 64 << 10), ("1.5M", 3 << 19),
    ("1GB", 10**9), (4096, 4096), ("4096", 4096), (" 2 MiB ", 2 << 20),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("30s", 30), ("5m", 300), ("1h", 3600), ("250ms", 0.25), (12.5, 12.5),
                                           ("2", 2)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12XB", "-1", "", True, "1e9", [1]])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_defaults_are_the_safe_values():
    p = Policy()
    assert p.network.mode == "none"
    assert (p.filesystem.workspace_size, p.filesystem.tmp_size, p.filesystem.mounts) == (1 << 30, 256 << 20, [])
    lim = p.limits
    assert (lim.memory, lim.cpus, lim.pids, lim.command_timeout, lim.output) == (512 << 20, 1.0, 256, 60.0, 1 << 20)
    assert (p.lifetime.timeout, p.allow_missing_controls) == (300.0, [])


def test_from_toml_and_json_files(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[limits]\nmemory = "256MiB"\ncommand_timeout = "30s"\n'
                    '[[filesystem.mounts]]\nsource = "/data"\ntarget = "/mnt/data"\n'
                    '[lifetime]\ntimeout = "2m"\n')
    p = Policy.from_file(toml)
    assert p.limits.memory == 256 << 20 and p.limits.command_timeout == 30 and p.lifetime.timeout == 120
    assert p.filesystem.mounts[0].mode == "ro"
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"filesystem": {"mounts": ["/data:/mnt/data:rw"]}}))
    assert Policy.from_file(js).filesystem.mounts[0].mode == "rw"
    assert Policy.from_dict(p.model_dump()) == p


@pytest.mark.parametrize("data,field,reason", [
    ({"limits": {"memory": "12XB"}}, "limits.memory", "unit"),
    ({"limits": {"memory": "1MiB"}}, "limits.memory", "greater than or equal"),
    ({"limit": {}}, "limit", "unknown field"),
    ({"network": {"mode": "open"}}, "network.mode", "'allowlist'"),
    ({"network": {"allow": ["a.example"]}}, "network.allow", "allowlist"),
    ({"network": {"mode": "allowlist", "allow": ["*bad*"]}}, "network.allow", "wildcard"),
    ({"network": {"mode": "allowlist", "allow_private": ["nope"]}}, "network.allow_private", "CIDR"),
    ({"filesystem": {"mounts": ["/a:/home/user"]}}, "filesystem.mounts.0.target", "would cover /home/user"),
    ({"filesystem": {"mounts": ["/a:/proc/x"]}}, "filesystem.mounts.0.target", "would cover /proc"),
    ({"filesystem": {"mounts": ["/a:/mnt/x", "/b:/mnt/x"]}}, "filesystem.mounts", "share"),
    ({"filesystem": {"mounts": ["nonsense"]}}, "filesystem.mounts.0", "HOST:SANDBOX"),
    ({"allow_missing_controls": ["seccomp"]}, "allow_missing_controls.0", "'memory'"),
])
def test_errors_name_the_field_and_the_reason(data, field, reason):
    with pytest.raises(PolicyError) as err:
        Policy.from_dict(data)
    assert err.value.field == field
    assert reason in err.value.reason


def test_bad_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.from_file(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.from_file(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match="mapping"):
        Policy.from_dict(["not", "a", "dict"])


def test_overrides_are_validated():
    p = Policy().with_overrides(limits={"memory": "1GiB"})
    assert p.limits.memory == 1 << 30
    with pytest.raises(PolicyError, match="limits.memory"):
        Policy().with_overrides(limits={"memory": "x"})
    with pytest.raises(PolicyError):
        Policy().with_overrides(nope={"a": 1})
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        Policy().limits.memory = 5  # type: ignore[misc]
