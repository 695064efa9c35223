"""The service core: one Manager over the runtimes, made of one part per concern.

Runs on one asyncio loop. Front ends (the SDK's local mode, the server) call its methods; each part is a
module: ``lifecycle`` (create, time to live, end), ``commands``, ``contexts`` (code interpreter),
``files``, ``ports`` (inbound connections to exposed ports), ``egress`` (the broker's rules) and
``artifact_intake``, ``snapshots`` (a template sandbox's files as a new template); ``base`` holds the shared state.
"""

from __future__ import annotations

from .contexts import Contexts
from .files import Files
from .lifecycle import Lifecycle
from .ports import Ports
from .snapshots import Snapshots


class Manager(Lifecycle, Contexts, Files, Ports, Snapshots):
    """The registry of live sandboxes and every request they serve."""
