"""The build context's .dockerignore, by Docker's rules (patternmatcher): pure matching here; a build that
honours it is in test_template_build.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.templates.dockerignore import IgnoreRules
from stockade.templates.errors import TemplateError


def rules(*lines: str) -> IgnoreRules:
    return IgnoreRules.parse("\n".join(lines))


@pytest.mark.parametrize("pattern,path,excluded", [
    ("node_modules", "node_modules", True),
    ("node_modules", "node_modules/a/b.js", True),     # a directory above matches
    ("node_modules", "src/node_modules", False),       # at the root only (gitignore would match it)
    ("**/node_modules", "src/node_modules/x", True),
    ("**/node_modules", "node_modules", True),         # ** is zero directories too
    ("*.pyc", "a.pyc", True),
    ("*.pyc", "pkg/a.pyc", False),                     # * never crosses a /
    ("**/*.pyc", "pkg/sub/a.pyc", True),
    ("pkg/**", "pkg/sub/a", True),
    ("pkg/**", "pkgx/a", False),
    ("/build", "build/out", True),                     # a leading / is the root
    ("./build", "build", True),
    ("a/../secret", "secret", True),                   # cleaned like a path
    ("?.txt", "a.txt", True),
    ("?.txt", "ab.txt", False),
    ("[ab].txt", "b.txt", True),
    ("[!ab].txt", "b.txt", False),
    ("[!ab].txt", "c.txt", True),
    ("\\*.txt", "*.txt", True),
    ("\\*.txt", "a.txt", False),
    (".git", ".git/config", True),
    ("*", "anything/at/all", True),
    ("# a comment", "# a comment", False),
    ("  .env  ", ".env", True),                        # surrounding blanks go
    (".", "x", False),
])
def test_patterns_match_as_docker_s(pattern, path, excluded):
    assert rules(pattern).excluded(path) is excluded


def test_the_last_line_that_applies_wins_and_exceptions_include_again():
    r = rules("*.md", "!README.md", "docs", "!docs/keep.md")
    assert r.excluded("CHANGES.md") and not r.excluded("README.md")
    assert r.excluded("docs/a.md") and not r.excluded("docs/keep.md")
    assert r.walk_into("docs") and not r.walk_into("other")
    again = rules("!README.md", "*.md")   # an exception before the exclusion changes nothing
    assert again.excluded("README.md")
    assert not rules("logs", "!logs").excluded("logs/x")


def test_an_excluded_directory_is_walked_into_only_for_an_exception_below_it():
    r = rules("node_modules", "!node_modules/keep")
    assert r.walk_into("node_modules") and r.walk_into("node_modules/keep")
    assert not r.walk_into("node_modules/other") and not r.walk_into("node_modules_x")


def test_a_bad_pattern_names_its_line():
    with pytest.raises(TemplateError, match=r"\.dockerignore, line 2: '\[abc' is not a pattern"):
        rules("ok", "[abc")


def test_the_file_is_read_by_descriptor_and_must_be_a_small_regular_file(tmp_path: Path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert IgnoreRules.read(fd).patterns == []
        (tmp_path / "elsewhere").write_text("*\n")
        os.symlink(tmp_path / "elsewhere", tmp_path / ".dockerignore")
        with pytest.raises(TemplateError, match="not a symlink"):
            IgnoreRules.read(fd)
        os.unlink(tmp_path / ".dockerignore")
        (tmp_path / ".dockerignore").mkdir()
        with pytest.raises(TemplateError, match="not a regular file"):
            IgnoreRules.read(fd)
        (tmp_path / ".dockerignore").rmdir()
        os.mkfifo(tmp_path / ".dockerignore")
        with pytest.raises(TemplateError, match="not a regular file"):
            IgnoreRules.read(fd)
        os.unlink(tmp_path / ".dockerignore")
        (tmp_path / ".dockerignore").write_bytes(b"x" * ((1 << 20) + 1))
        with pytest.raises(TemplateError, match="over 1048576 bytes"):
            IgnoreRules.read(fd)
        (tmp_path / ".dockerignore").write_text("# build output\nbuild\n\n!build/keep\n")
        assert [(p.text, p.include) for p in IgnoreRules.read(fd).patterns] == [("build", False),
                                                                               ("build/keep", True)]
    finally:
        os.close(fd)
