"""The conformance suite: behaviour every backend must show. Parametrized by backend; a new runtime or
transport (microVM, remote server) adds itself to BACKENDS and must pass all of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade import Sandbox
from stockade.manager import Manager
from stockade.sdk.portal import portal
from stockade.sdk.sandbox import _transport
from stockade.sdk.transports.base import Transport
from stockade.sdk.transports.remote import RemoteTransport

from ..conftest import sandbox_factory


async def _local_manager() -> Manager:
    return await _transport(None).manager()  # type: ignore[attr-defined, no-any-return]


def _remote(request: pytest.FixtureRequest) -> Transport:
    server = request.getfixturevalue("api_server")
    if not hasattr(server, "transport"):
        server.transport = RemoteTransport(server.url, server.key("conformance"))
    return server.transport  # type: ignore[no-any-return]


# backend name -> (transport factory (None: the default local transport, jail runtime), its manager)
BACKENDS: dict[str, tuple[Callable[[pytest.FixtureRequest], Transport | None], Callable[[Any], Manager]]] = {
    "jail": (lambda request: None, lambda request: portal().call(_local_manager())),
    "remote": (_remote, lambda request: request.getfixturevalue("api_server").server.manager),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def transport(backend: str, request: pytest.FixtureRequest) -> Transport | None:
    """The backend's transport, for the SDK's class methods (Sandbox.list, connect, create)."""
    return BACKENDS[backend][0](request)


@pytest.fixture
def make_sandbox(transport: Transport | None) -> Iterator[Callable[..., Sandbox]]:
    yield from sandbox_factory(transport)


@pytest.fixture
def backend_manager(backend: str, request: pytest.FixtureRequest) -> Manager:
    """The manager behind the backend (to map test names to local servers, as a host's config would)."""
    return BACKENDS[backend][1](request)
