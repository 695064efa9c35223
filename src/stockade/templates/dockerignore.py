"""A build context's ``.dockerignore``: the context paths COPY and ADD never see.

Docker's rules (moby/patternmatcher and the CLI's context walk, read, not copied): one pattern per line;
``#`` lines and blank lines are skipped; each pattern is cleaned like a path (a leading ``/`` or ``./``
dropped, ``..`` resolved); ``*`` is any run of characters but ``/``, ``?`` one such character, ``[...]`` a
class, ``\\`` escapes the next character, and ``**`` any number of directories (``**/x`` matches ``x`` at
any depth, the root too). A path is excluded when it or a directory above it matches; ``!pattern``
includes again, and the last line that applies wins. An excluded directory is walked into only when an
exception's text starts with it (``node_modules`` then ``!node_modules/keep``).

By hand: no maintained Python library has Docker's variant (pathspec implements gitignore's, where a
pattern without a slash matches at any depth; here it matches at the context's root only).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass

from .errors import TemplateError

FILE = ".dockerignore"
MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class _Pattern:
    text: str           # cleaned, without the "!"
    include: bool       # an exception ("!")
    regex: re.Pattern[str]


class IgnoreRules:
    def __init__(self, patterns: list[_Pattern]) -> None:
        self.patterns = patterns

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        patterns = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            line = line[1:].strip() if include else line
            cleaned = posixpath.normpath(line).lstrip("/")
            if cleaned in ("", "."):
                continue
            try:
                regex = re.compile(_translate(cleaned))
            except re.error as exc:
                raise TemplateError(f"{FILE}, line {number}: {raw.strip()!r} is not a pattern ({exc})") from None
            patterns.append(_Pattern(cleaned, include, regex))
        return cls(patterns)

    @classmethod
    def read(cls, context_fd: int) -> IgnoreRules:
        """The rules of the context (a directory's descriptor); none when it has no .dockerignore."""
        try:
            fd = os.open(FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=context_fd)
        except FileNotFoundError:
            return cls([])
        except OSError as exc:
            raise TemplateError(f"the build context's {FILE} cannot be read ({exc.strerror}): it must be a "
                                "regular file, not a symlink") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TemplateError(f"the build context's {FILE} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise TemplateError(f"the build context's {FILE} is over {MAX_BYTES} bytes")
        return cls.parse(data.decode("utf-8", "replace"))

    def excluded(self, rel: str) -> bool:
        """Whether the context path ``rel`` (relative, "/"-separated) is left out."""
        if not self.patterns:
            return False
        parents = _parents(rel)
        matched = False
        for p in self.patterns:
            if p.include != matched:   # only an exception can change an exclusion, and only a match a miss
                continue
            if any(p.regex.match(path) for path in parents):
                matched = not p.include
        return matched

    def walk_into(self, rel: str) -> bool:
        """Whether an excluded directory still holds what an exception includes."""
        prefix = rel.rstrip("/") + "/"
        return any(p.include and (p.text + "/").startswith(prefix) for p in self.patterns)


def _parents(rel: str) -> list[str]:
    parts = rel.strip("/").split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _translate(pattern: str) -> str:
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise re.error("an unclosed [")
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return "".join(out)


__all__ = ["FILE", "IgnoreRules"]
