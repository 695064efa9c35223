"""The conformance suite: behaviour every backend must show. Parametrized by backend; a new runtime or
transport (microVM, remote server) adds itself to BACKENDS and must pass all of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from stockade import Sandbox
from stockade.sdk.transports.base import Transport

from ..conftest import sandbox_factory

# backend name -> transport factory (None: the default local transport, jail runtime)
BACKENDS: dict[str, Callable[[], Transport | None]] = {"jail": lambda: None}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_sandbox(backend: str) -> Iterator[Callable[..., Sandbox]]:
    yield from sandbox_factory(BACKENDS[backend]())
