from __future__ import annotations

import os

import pytest

from stockade import StockadeError
from stockade.config import HostConfig
from stockade.runtime.jail.config import DEFAULT_UID_RANGE, JailConfig


def test_uid_range_from_env(monkeypatch):
    monkeypatch.setenv("STOCKADE_UID_RANGE", "300000-300009")
    assert JailConfig.from_env().uid_range == (300000, 300009)
    monkeypatch.delenv("STOCKADE_UID_RANGE")
    assert JailConfig.from_env().uid_range == DEFAULT_UID_RANGE


@pytest.mark.parametrize("bad", ["abc", "10-5", "0-100", "5", "1000-4294967295"])
def test_bad_uid_ranges_are_refused(monkeypatch, bad):
    monkeypatch.setenv("STOCKADE_UID_RANGE", bad)
    with pytest.raises(StockadeError, match="STOCKADE_UID_RANGE"):
        JailConfig.from_env()


def test_state_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(tmp_path / "s"))
    assert HostConfig.from_env().state_dir == tmp_path / "s"


def test_a_state_dir_owned_by_someone_else_is_refused(tmp_path):
    from stockade import SandboxUnavailableError
    from stockade.runtime.jail.runtime import _check_owned

    d = tmp_path / "state"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    with pytest.raises(SandboxUnavailableError, match="0700"):
        _check_owned(d, private=True)  # group/world-writable: another user could plant files
    if os.geteuid() == 0:
        os.chown(d, 12345, 12345)
        with pytest.raises(SandboxUnavailableError, match="not a directory owned by"):
            _check_owned(d, private=False)


def test_server_settings_layer_file_env_and_options(tmp_path, monkeypatch):
    from stockade import PolicyError
    from stockade.server.settings import ServerSettings

    config = tmp_path / "server.toml"
    config.write_text('[server]\nport = 9000\nmax_upload = "1MiB"\n\n[tenant_defaults]\nmax_sandboxes = 3\n\n'
                      '[tenants.acme]\nmax_memory = "2GiB"\n')
    monkeypatch.setenv("STOCKADE_MAX_UPLOAD", "2MiB")
    monkeypatch.setenv("STOCKADE_AUDIT_RETENTION", "7d")
    s = ServerSettings.load(config, port=9100)
    assert (s.port, s.max_upload, s.audit_retention) == (9100, 2 << 20, 7 * 86400)
    assert s.tenant("acme").max_memory == 2 << 30 and s.tenant("acme").max_sandboxes == 3
    assert s.tenant("other").max_sandboxes == 3
    config.write_text("[server]\nwarm_pol = 3\n")
    with pytest.raises(PolicyError) as err:
        ServerSettings.load(config)
    assert err.value.field == "warm_pol"
    config.write_text('[tenants.acme]\none_sandbox_per_user = "maybe"\n')
    with pytest.raises(PolicyError) as err:
        ServerSettings.load(config)
    assert err.value.field == "tenants.acme.one_sandbox_per_user"


def test_warm_pools_per_template_come_from_the_file_or_the_environment(tmp_path, monkeypatch):
    from stockade import PolicyError
    from stockade.server.settings import ServerSettings

    config = tmp_path / "stockade.toml"
    config.write_text('[server]\nwarm_pools = { "py312" = 4, "node.22" = 0 }\n')
    assert ServerSettings.load(config).warm_pools == {"py312": 4, "node.22": 0}
    monkeypatch.setenv("STOCKADE_WARM_POOLS", "py312=2, node=1")
    assert ServerSettings.load().warm_pools == {"py312": 2, "node": 1}
    for bad, field in [("py312", "warm_pools"), ("Py312=1", "warm_pools"), ("../x=1", "warm_pools"),
                       ("py312=-1", "warm_pools.py312"), ("py312=lots", "warm_pools.py312"),
                       ("py312=1001", "warm_pools.py312")]:
        monkeypatch.setenv("STOCKADE_WARM_POOLS", bad)
        with pytest.raises(PolicyError) as err:
            ServerSettings.load()
        assert err.value.field == field, (bad, err.value)
