"""The build file: a Dockerfile subset (``stockade template build NAME -f FILE``), parsed into instructions.

Supported: ``FROM`` (a template, or an image source as ``stockade template import`` takes it), ``RUN``,
``COPY``/``ADD`` (from the build context; ``--chown``, ``--chmod``), ``ENV``, ``ARG``, ``WORKDIR``, ``USER``,
``LABEL``, ``CMD``/``ENTRYPOINT`` (kept as the image command, for reference: a sandbox runs the agent), and
stockade's own ``START`` and ``READY``: the template's start command (started in the background in every
sandbox before it is handed out, E2B's ``set_start_cmd``) and its ready check (``set_ready_cmd``), in
shell or exec form like ``RUN``. ``EXPOSE`` is accepted and ignored (ports open per sandbox). Anything
else (multi-stage builds, ``SHELL``, ``VOLUME``, ``HEALTHCHECK``, ``ONBUILD``, ``RUN --mount``, ``ADD URL``)
is refused with the line that has it: a build that silently did something else would be worse.

Dockerfile syntax is kept where it is supported: ``#`` comment lines, ``\\`` line continuations, exec form
as a JSON array, and ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME:+alternative}`` substitution
from ``ARG`` and ``ENV`` in every instruction but ``RUN``/``START``/``READY``/``CMD`` (whose shell does
its own)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import TemplateError

MAX_FILE_BYTES = 1 << 20
MAX_INSTRUCTIONS = 1000
SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL", "CMD", "ENTRYPOINT",
             "START", "READY", "EXPOSE")
_REFUSED = {
    "SHELL": "the shell is /bin/sh -c; use the exec form [\"bash\", \"-c\", \"...\"] for another",
    "VOLUME": "a sandbox's files are its own already; there are no volumes",
    "HEALTHCHECK": "use READY for the check a sandbox must pass before it is handed out",
    "ONBUILD": "templates built FROM this one run only their own instructions",
    "STOPSIGNAL": "sandboxes are ended by stockade, not by a signal to a main process",
    "MAINTAINER": "use LABEL maintainer=...",
}
_VAR = re.compile(r"\\\$|\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Instruction:
    line: int                        # where it starts in the file (1-based)
    keyword: str                     # upper case
    text: str                        # its arguments as written (continuations joined)
    flags: dict[str, str] = field(default_factory=dict)   # --chown=..., --chmod=...
    argv: list[str] = field(default_factory=list)          # RUN/START/READY/CMD/ENTRYPOINT: the command
    words: list[str] = field(default_factory=list)         # COPY/ADD/ENV/ARG/LABEL/...: the arguments

    @property
    def display(self) -> str:
        flags = "".join(f"--{k}={v} " for k, v in self.flags.items())
        return f"{self.keyword} {flags}{self.text}".rstrip()


def _error(line: int, message: str) -> TemplateError:
    return TemplateError(f"build file line {line}: {message}")


def parse(text: str) -> list[Instruction]:
    """The instructions of a build file; a TemplateError naming the line for anything refused."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise TemplateError(f"the build file is larger than {MAX_FILE_BYTES} bytes")
    out: list[Instruction] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.strip().partition(" ")
        if "\t" in keyword:
            keyword, _, more = keyword.partition("\t")
            rest = f"{more} {rest}"
        keyword = keyword.upper()
        out.append(_instruction(line, keyword, rest.strip()))
        if len(out) > MAX_INSTRUCTIONS:
            raise _error(line, f"more than {MAX_INSTRUCTIONS} instructions")
    froms = [i for i in out if i.keyword == "FROM"]
    if not froms:
        raise TemplateError("the build file has no FROM (start it with FROM TEMPLATE or FROM docker://...)")
    if len(froms) > 1:
        raise _error(froms[1].line, "a second FROM: multi-stage builds are not supported")
    for i in out:
        if i.keyword == "FROM":
            break
        if i.keyword != "ARG":
            raise _error(i.line, f"{i.keyword} before FROM (only ARG may come first)")
    return out


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Joined continuation lines, without comments and blank lines, each with its first line's number."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue        # comments, also inside a continued instruction (as Docker does)
        if not stripped:
            continue        # blank lines, also inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        out.append((start, " ".join(p.strip() for p in pending if p.strip())))
        pending = []
    if pending:
        out.append((start, " ".join(p.strip() for p in pending if p.strip())))
    return out


def _flags(line: int, keyword: str, rest: str, allowed: tuple[str, ...]) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, eq, value = word[2:].partition("=")
        if name not in allowed or not eq:
            known = ", ".join(f"--{a}=..." for a in allowed) or "none"
            raise _error(line, f"{keyword} {word}: not supported (flags here: {known})")
        flags[name] = value
    return flags, rest


def _command(line: int, keyword: str, rest: str) -> list[str]:
    if not rest:
        raise _error(line, f"{keyword} needs a command")
    if rest.startswith("["):
        try:
            argv = json.loads(rest)
        except ValueError:
            argv = None
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return argv
        if isinstance(argv, list):
            raise _error(line, f"{keyword} [...]: the exec form is a non-empty JSON array of strings")
    return ["/bin/sh", "-c", rest]


def _split(line: int, keyword: str, rest: str) -> list[str]:
    try:
        return shlex.split(rest, comments=False, posix=True)
    except ValueError as exc:
        raise _error(line, f"{keyword}: {exc}") from None


def _instruction(line: int, keyword: str, rest: str) -> Instruction:
    if keyword in _REFUSED:
        raise _error(line, f"{keyword} is not supported: {_REFUSED[keyword]}")
    if keyword not in SUPPORTED:
        raise _error(line, f"unknown instruction {keyword!r} (supported: {', '.join(SUPPORTED)})")
    if keyword in ("RUN", "START", "READY", "CMD", "ENTRYPOINT"):
        flags, rest = _flags(line, keyword, rest, ())
        return Instruction(line, keyword, rest, flags, argv=_command(line, keyword, rest))
    if keyword in ("COPY", "ADD"):
        flags, rest = _flags(line, keyword, rest, ("chown", "chmod"))
        if rest.startswith("["):
            try:
                words = json.loads(rest)
            except ValueError:
                raise _error(line, f"{keyword} [...]: not a JSON array of strings") from None
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise _error(line, f"{keyword} [...]: not a JSON array of strings")
        else:
            words = rest.split()
        if len(words) < 2:
            raise _error(line, f"{keyword} needs a source and a destination ({keyword} SRC... DEST)")
        if "chmod" in flags and not re.fullmatch(r"[0-7]{3,4}", flags["chmod"]):
            raise _error(line, f"{keyword} --chmod={flags['chmod']}: give an octal mode such as 0644")
        return Instruction(line, keyword, rest, flags, words=words)
    if keyword == "FROM":
        flags, rest = _flags(line, keyword, rest, ())
        words = rest.split()
        if len(words) == 3 and words[1].upper() == "AS":
            words = words[:1]
        if len(words) != 1:
            raise _error(line, "FROM takes one template or image source (FROM NAME, FROM docker://REPO:TAG)")
        return Instruction(line, keyword, rest, words=words)
    if keyword in ("ENV", "LABEL", "ARG"):
        words = _split(line, keyword, rest)
        if keyword == "ENV" and words and "=" not in words[0]:
            name, _, value = rest.partition(" ")   # the legacy form: ENV NAME VALUE...
            words = [f"{name}={value.strip()}"]
        if not words:
            raise _error(line, f"{keyword} needs NAME=VALUE")
        for word in words:
            name, eq, _ = word.partition("=")
            if keyword == "LABEL" and not (eq and name):
                raise _error(line, f"LABEL {word!r}: give KEY=VALUE")
            if keyword != "LABEL" and not _NAME.fullmatch(name):
                raise _error(line, f"{keyword} {word!r}: {name!r} is not a variable name")
            if keyword == "ENV" and not eq:
                raise _error(line, f"ENV {word!r}: give NAME=VALUE")
        return Instruction(line, keyword, rest, words=words)
    # WORKDIR, USER, EXPOSE
    if not rest:
        raise _error(line, f"{keyword} needs an argument")
    return Instruction(line, keyword, rest, words=[rest] if keyword != "EXPOSE" else rest.split())


def expand(word: str, variables: Mapping[str, str], line: int = 0) -> str:
    """``$NAME``, ``${NAME}``, ``${NAME:-default}`` and ``${NAME:+alternative}`` from ``variables`` (an
    unset name is empty, as in Docker); ``\\$`` is a literal dollar."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        name = m.group("braced") or m.group("bare")
        value = variables.get(name, "")
        op = m.group("op")
        if op == "-":
            return value or expand(m.group("word"), variables, line)
        if op == "+":
            return expand(m.group("word"), variables, line) if value else ""
        return value

    for m in re.finditer(r"(?<!\\)\$\{", word):
        if not _VAR.match(word, m.start()):
            raise _error(line, f"{word!r}: a ${{...}} that is not ${{NAME}}, ${{NAME:-word}} or ${{NAME:+word}}")
    return _VAR.sub(one, word)


__all__ = ["Instruction", "expand", "parse"]
