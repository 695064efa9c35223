"""The conformance suite: behaviour every backend must show. Parametrized by backend; a new runtime or
transport (microVM, remote server) adds itself to BACKENDS and must pass all of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade import Sandbox
from stockade.sdk.transports.base import Transport

from ..conftest import base_policy

# backend name -> transport factory (None: the default local transport, jail runtime)
BACKENDS: dict[str, Callable[[], Transport | None]] = {"jail": lambda: None}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_sandbox(backend: str) -> Iterator[Callable[..., Sandbox]]:
    made: list[Sandbox] = []
    transport = BACKENDS[backend]()

    def make(timeout: float | None = None, envs: dict[str, str] | None = None, **sections: Any) -> Sandbox:
        sb = Sandbox.create(policy=base_policy(**sections), timeout=timeout, envs=envs, transport=transport)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.kill()
