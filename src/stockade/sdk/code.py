"""The code-interpreter values: ``Execution``, ``Result``, ``Logs``, ``ExecutionError``, ``Context``.
Names and fields follow E2B's code-interpreter SDK."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# MIME type in an interpreter's bundle -> Result attribute
FORMATS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "text/latex": "latex",
    "application/json": "json", "application/javascript": "javascript", "image/png": "png",
    "image/jpeg": "jpeg", "image/svg+xml": "svg",
}


@dataclass
class Result:
    """One displayed value. Images are base64 text; ``is_main_result`` marks the cell's last expression."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    png: str | None = None
    jpeg: str | None = None
    svg: str | None = None
    is_main_result: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, data: Any, main: bool) -> Result:
        result = cls(is_main_result=bool(main))
        for mime, value in (data.items() if isinstance(data, dict) else ()):
            attr = FORMATS.get(mime)
            if attr == "json":
                result.json = value
            elif attr is not None and isinstance(value, str):
                setattr(result, attr, value)
            elif isinstance(mime, str) and len(result.extra) < 32:
                result.extra[mime] = value
        return result

    def formats(self) -> list[str]:
        return [attr for attr in FORMATS.values() if getattr(self, attr) is not None] + list(self.extra)


@dataclass
class Logs:
    """A cell's output, each stream a list of chunks in the order they arrived (as E2B's SDK gives them).
    Chunk boundaries are not part of the contract: they follow how the code wrote and when the agent read
    the pipe, so three ``echo`` lines may come as one chunk or three. Join them for the text."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: str


@dataclass
class Execution:
    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    truncated: bool = False      # output passed limits.output and was cut
    timed_out: bool = False

    @property
    def text(self) -> str | None:
        """The text of the main result (the value of the cell's last expression)."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None


@dataclass(frozen=True)
class Context:
    id: str
    language: str
    cwd: str
    backend: str = ""        # "ipython", "stdlib", "bash" or "node": what runs the code


def event_to_result_or_error(event: dict[str, Any]) -> Result | ExecutionError | None:
    """An interpreter event (untrusted: it comes from user code's process) as a Result or an error."""
    kind = event.get("type")
    if kind == "result":
        return Result.from_bundle(event.get("data"), bool(event.get("main")))
    if kind == "error":
        return ExecutionError(str(event.get("name", "Error"))[:200], str(event.get("value", ""))[:10000],
                              str(event.get("traceback", ""))[:100000])
    return None


class ExecutionBuilder:
    """Accumulates a cell's stream into an ``Execution``, calling the user's callbacks as parts arrive."""

    def __init__(self, on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
                 on_result: Callable[[Result], Any] | None = None,
                 on_error: Callable[[ExecutionError], Any] | None = None) -> None:
        self.execution = Execution()
        self._callbacks: dict[str, Any] = {"stdout": on_stdout, "stderr": on_stderr}
        self._on_result, self._on_error = on_result, on_error
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}

    def output(self, stream: str, data: bytes) -> Any:
        text = self._decoders[stream].decode(data)
        if text:
            getattr(self.execution.logs, stream).append(text)
            callback = self._callbacks[stream]
            return callback(text) if callback else None
        return None

    def event(self, event: dict[str, Any]) -> Any:
        item = event_to_result_or_error(event)
        if isinstance(item, Result):
            self.execution.results.append(item)
            return self._on_result(item) if self._on_result else None
        if isinstance(item, ExecutionError):
            self.execution.error = item
            return self._on_error(item) if self._on_error else None
        return None

    def finish(self, done: dict[str, Any]) -> Execution:
        count = done.get("execution_count")
        self.execution.execution_count = count if isinstance(count, int) and count > 0 else None
        truncated = done.get("truncated")
        self.execution.truncated = isinstance(truncated, dict) and any(v is True for v in truncated.values())
        self.execution.timed_out = done.get("timed_out") is True
        return self.execution
