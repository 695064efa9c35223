"""The conformance suite: behaviour every runtime must show, through every transport. Parametrized by
runtime x transport: a registered runtime (stockade.runtime.registry.RUNTIMES) is in it by default, and
runs in-process (local) and through a live server (remote). STOCKADE_TEST_RUNTIMES narrows it
("jail,gvisor") for a host that can only run some; CI runs them all."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade import Sandbox
from stockade.core.manager import Manager
from stockade.runtime.registry import RUNTIMES, runtime_class
from stockade.sdk.portal import portal
from stockade.sdk.sandbox import _transport
from stockade.sdk.transports.base import Transport
from stockade.sdk.transports.remote import RemoteTransport

from ..conftest import sandbox_factory

RUNTIMES_UNDER_TEST = [r.strip() for r in os.environ.get("STOCKADE_TEST_RUNTIMES", ",".join(RUNTIMES)).split(",")
                       if r.strip()]
# why a runtime cannot run on this host at all (gVisor as an ordinary user): its tests are skipped for that
# reason only, and the suite's server does not serve it
UNMET = {r: runtime_class(r).unmet_requirement() for r in RUNTIMES_UNDER_TEST}
RUNNABLE = [r for r in RUNTIMES_UNDER_TEST if UNMET[r] is None]
TRANSPORTS = ("local", "remote")


def usable_runtime(name: str) -> str:
    """``name``, or the test skipped for what this host lacks for that runtime (UNMET)."""
    if UNMET[name] is not None:
        pytest.skip(UNMET[name])
    return name


async def _local_manager() -> Manager:
    return await _transport(None).manager()  # type: ignore[attr-defined, no-any-return]


def _remote(request: pytest.FixtureRequest) -> Transport:
    server = request.getfixturevalue("api_server")
    if not hasattr(server, "transport"):
        server.transport = RemoteTransport(server.url, server.key("conformance"))
    return server.transport  # type: ignore[no-any-return]


# transport name -> (transport factory (None: the SDK's default local transport), the manager behind it)
BACKENDS: dict[str, tuple[Callable[[pytest.FixtureRequest], Transport | None], Callable[[Any], Manager]]] = {
    "local": (lambda request: None, lambda request: portal().call(_local_manager())),
    "remote": (_remote, lambda request: request.getfixturevalue("api_server").server.manager),
}


@pytest.fixture(params=[f"{r}-{t}" for r in RUNTIMES_UNDER_TEST for t in TRANSPORTS])
def backend(request: pytest.FixtureRequest) -> str:
    """"<runtime>-<transport>", e.g. "jail-remote"."""
    unmet = UNMET[str(request.param).rsplit("-", 1)[0]]
    if unmet is not None:
        pytest.skip(unmet)
    return str(request.param)


@pytest.fixture
def runtime_name(backend: str) -> str:
    return backend.rsplit("-", 1)[0]


@pytest.fixture
def transport(backend: str, request: pytest.FixtureRequest) -> Transport | None:
    """The backend's transport, for the SDK's class methods (Sandbox.list, connect, create)."""
    return BACKENDS[backend.rsplit("-", 1)[1]][0](request)


@pytest.fixture
def make_sandbox(transport: Transport | None, runtime_name: str) -> Iterator[Callable[..., Sandbox]]:
    yield from sandbox_factory(transport, runtime_name)


@pytest.fixture
def backend_manager(backend: str, request: pytest.FixtureRequest) -> Manager:
    """The manager behind the backend (to map test names to local servers, as a host's config would)."""
    return BACKENDS[backend.rsplit("-", 1)[1]][1](request)
