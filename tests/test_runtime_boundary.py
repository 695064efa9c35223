"""The runtime boundary: runtimes are chosen by name, from the SDK, the CLI and the server, and a runtime
registered under a new name is used with no change to the SDK, the core or the server."""

from __future__ import annotations

import asyncio

import pytest

from stockade import PolicyError, Sandbox
from stockade.runtime import registry
from stockade.runtime.jail.runtime import JailRuntime
from stockade.server.settings import ServerSettings

from .conftest import base_policy, sandbox_traces
from .server_support import RunningServer
from .waiting import wait_until


class RenamedJail(JailRuntime):
    """A 'new' runtime for the test: the jail under another name, registered like any runtime would be."""

    name = "jail-renamed"


@pytest.fixture
def renamed_runtime(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(registry.RUNTIMES, RenamedJail.name, f"{__name__}:RenamedJail")
    return RenamedJail.name


def test_the_default_runtime_is_reported():
    with Sandbox.create(policy=base_policy()) as sb:
        assert sb.info().runtime["runtime"] == "jail"


def test_an_unknown_runtime_names_the_field_and_the_choices():
    with pytest.raises(PolicyError) as err:
        Sandbox.create(policy=base_policy(), runtime="vmware")
    assert err.value.field == "runtime" and "'vmware'" in str(err.value) and "jail" in str(err.value)


def test_a_registered_runtime_is_used_by_name_with_nothing_else_changed(renamed_runtime: str):
    with Sandbox.create(policy=base_policy(), runtime=renamed_runtime) as sb:
        info = sb.info().runtime
        assert info["runtime"] == renamed_runtime
        assert sb.commands.run("echo hi").stdout == "hi\n"
    wait_until(lambda: not sandbox_traces(info, sb.sandbox_id), 10, "the sandbox's traces to go",
               show=lambda: sandbox_traces(info, sb.sandbox_id))


def test_the_server_serves_only_the_runtimes_it_is_configured_for(renamed_runtime: str):
    server = RunningServer(runtimes=[renamed_runtime], tenants={"narrow": {"runtimes": ["jail"]}})
    try:
        wide = Sandbox.create(policy=base_policy(), runtime=renamed_runtime, api_url=server.url,
                              api_key=server.key("wide"))
        try:
            assert wide.info().runtime["runtime"] == renamed_runtime
        finally:
            wide.kill()
        with pytest.raises(PolicyError) as err:  # not served by this server
            Sandbox.create(policy=base_policy(), runtime="other", api_url=server.url, api_key=server.key("wide"))
        assert err.value.field == "runtime" and "not available" in str(err.value)
        with pytest.raises(PolicyError) as err:  # served, but not to this tenant
            Sandbox.create(policy=base_policy(), runtime=renamed_runtime, api_url=server.url,
                           api_key=server.key("narrow"))
        assert err.value.field == "runtime" and "may not use" in str(err.value)
        narrow = Sandbox.create(policy=base_policy(), api_url=server.url, api_key=server.key("narrow"))
        try:  # the server's default runtime is one the tenant may use
            assert narrow.info().runtime["runtime"] == "jail"
        finally:
            narrow.kill()
    finally:
        server.stop()


def test_server_runtimes_come_from_a_comma_list(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STOCKADE_RUNTIMES", "jail, gvisor")
    monkeypatch.setenv("STOCKADE_RUNTIME", "gvisor")
    settings = ServerSettings.load()
    assert settings.runtimes == ["jail", "gvisor"] and settings.runtime == "gvisor"


@pytest.mark.parametrize("settings", [{"runtime": "vmware"}, {"runtimes": ["jail", "vmware"]}])
def test_a_server_configured_with_an_unknown_runtime_does_not_start(settings: dict[str, object], tmp_path):
    from stockade.config import HostConfig
    from stockade.server.app import Server

    server = Server(ServerSettings.model_validate({"data_dir": str(tmp_path), **settings}), HostConfig.from_env())
    with pytest.raises(PolicyError) as err:
        asyncio.run(server.start())
    assert err.value.field == "runtime" and "'vmware'" in str(err.value)
    asyncio.run(server.stop())


def test_only_known_file_operations_with_their_own_arguments_reach_the_agent(sandbox: Sandbox):
    from stockade.sdk.portal import portal
    from stockade.sdk.sandbox import _transport

    async def ask(op: str, **args: object) -> dict[str, object]:
        manager = await _transport(None).manager()  # type: ignore[attr-defined]
        return await manager.file_op(sandbox.sandbox_id, op, **args)  # type: ignore[no-any-return]

    with pytest.raises(PolicyError) as err:
        portal().call(ask("exec", path="/bin/sh"))  # an agent op, but not a file operation
    assert err.value.field == "op"
    with pytest.raises(PolicyError) as err:
        portal().call(ask("stat", path="/tmp", argv=["sh"]))
    assert err.value.field == "argv"
    assert portal().call(ask("stat", path="/tmp"))["entry"]["type"] == "dir"  # type: ignore[index]
