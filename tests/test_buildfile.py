"""The build file's parser and variable substitution (templates/buildfile.py): what Dockerfile syntax is
kept, and every refusal naming its line."""

from __future__ import annotations

import pytest

from stockade.templates import TemplateError
from stockade.templates.buildfile import MAX_FILE_BYTES, expand, parse


def one(text: str):  # type: ignore[no-untyped-def]
    return parse(f"FROM base\n{text}")[1]


def test_continuations_comments_and_blank_lines():
    ins = parse("# a comment\n\nFROM base\nRUN echo a \\\n  # a comment inside\n\n  && echo b\n  \nENV A=1\n")
    assert [i.keyword for i in ins] == ["FROM", "RUN", "ENV"]
    assert ins[1].argv == ["/bin/sh", "-c", "echo a && echo b"]
    assert ins[1].line == 4 and ins[2].line == 9


def test_keywords_are_case_insensitive_and_tabs_separate():
    ins = parse("from base\nrun\techo hi\n")
    assert ins[1].keyword == "RUN" and ins[1].argv == ["/bin/sh", "-c", "echo hi"]


@pytest.mark.parametrize("keyword", ["RUN", "START", "READY", "CMD", "ENTRYPOINT"])
def test_exec_and_shell_forms(keyword):
    assert one(f'{keyword} ["python3", "-m", "http.server", "8000"]').argv == ["python3", "-m", "http.server", "8000"]
    assert one(f"{keyword} echo $HOME && true").argv == ["/bin/sh", "-c", "echo $HOME && true"]
    # not JSON: the shell form, as Docker reads it
    assert one(f"{keyword} [ -f x ] && echo yes").argv == ["/bin/sh", "-c", "[ -f x ] && echo yes"]
    with pytest.raises(TemplateError, match="line 2: .*non-empty JSON array of strings"):
        one(f"{keyword} []")
    with pytest.raises(TemplateError, match="line 2: .*non-empty JSON array of strings"):
        one(f'{keyword} ["a", 1]')
    with pytest.raises(TemplateError, match="line 2: .*needs a command"):
        one(keyword)


def test_env_forms():
    assert one('ENV A=1 B="two words" C=\'$x\'').words == ["A=1", "B=two words", "C=$x"]
    assert one("ENV LEGACY some value").words == ["LEGACY=some value"]
    for bad, why in (("ENV 1A=x", "not a variable name"), ('ENV A="open', "No closing quotation"),
                     ("ENV", "needs NAME=VALUE")):
        with pytest.raises(TemplateError, match=f"line 2: .*{why}"):
            one(bad)


def test_arg_label_workdir_user():
    assert one("ARG V=1").words == ["V=1"]
    assert one("ARG ONLY").words == ["ONLY"]
    assert one('LABEL org.example.x="a b" y=2').words == ["org.example.x=a b", "y=2"]
    assert one("WORKDIR /srv/my app").words == ["/srv/my app"]
    assert one("USER node:staff").words == ["node:staff"]
    with pytest.raises(TemplateError, match="LABEL 'novalue': give KEY=VALUE"):
        one("LABEL novalue")
    with pytest.raises(TemplateError, match="WORKDIR needs an argument"):
        one("WORKDIR")


def test_copy_forms_and_flags():
    ins = one("COPY --chown=node:node --chmod=0640 a b /dst/")
    assert ins.flags == {"chown": "node:node", "chmod": "0640"} and ins.words == ["a", "b", "/dst/"]
    assert one('COPY ["with space", "/dst/"]').words == ["with space", "/dst/"]
    assert one("ADD x /y").keyword == "ADD"
    for bad, why in (("COPY --from=builder /a /b", "--from=builder: not supported"),
                     ("COPY --link a b", "--link: not supported"),
                     ("COPY --chmod=u+x a b", "give an octal mode"),
                     ("COPY onlyone", "needs a source and a destination"),
                     ('COPY ["a", 2]', "JSON array of strings"),
                     ("RUN --mount=type=cache,target=/x true", "not supported")):
        with pytest.raises(TemplateError, match=f"line 2: .*{why}"):
            one(bad)


def test_from_rules():
    assert parse("ARG TAG=1\nFROM docker://registry.example.test/app:${TAG} AS build\n")[1].words == [
        "docker://registry.example.test/app:${TAG}"]
    with pytest.raises(TemplateError, match="no FROM"):
        parse("# nothing\n")
    with pytest.raises(TemplateError, match="line 1: RUN before FROM"):
        parse("RUN true\nFROM base\n")
    with pytest.raises(TemplateError, match="line 3: a second FROM: multi-stage builds are not supported"):
        parse("FROM a\nRUN true\nFROM b\n")
    with pytest.raises(TemplateError, match="line 1: FROM takes one"):
        parse("FROM a b\n")
    with pytest.raises(TemplateError, match="--platform=linux/amd64: not supported"):
        parse("FROM --platform=linux/amd64 base\n")


@pytest.mark.parametrize("keyword,why", [("SHELL", "exec form"), ("VOLUME", "no volumes"),
                                         ("HEALTHCHECK", "use READY"), ("ONBUILD", "only their own"),
                                         ("STOPSIGNAL", "ended by stockade"), ("MAINTAINER", "LABEL maintainer")])
def test_refused_instructions_say_why(keyword, why):
    with pytest.raises(TemplateError, match=f"line 3: {keyword} is not supported: .*{why}"):
        parse(f"FROM base\nRUN true\n{keyword} x\n")


def test_unknown_instruction_lists_the_supported():
    with pytest.raises(TemplateError, match="line 2: unknown instruction 'FROBNICATE' .*FROM, RUN, COPY"):
        parse("FROM base\nfrobnicate x\n")


def test_expose_is_accepted():
    assert one("EXPOSE 8000 9000/tcp").words == ["8000", "9000/tcp"]


def test_bounds():
    with pytest.raises(TemplateError, match="larger than"):
        parse("FROM base\n" + "#" * MAX_FILE_BYTES)
    with pytest.raises(TemplateError, match="more than 1000 instructions"):
        parse("FROM base\n" + "ENV A=1\n" * 1001)


@pytest.mark.parametrize("word,expected", [
    ("$A", "1"), ("${A}", "1"), ("x${A}y", "x1y"), ("$A$B", "12"), ("$UNSET", ""), ("${UNSET}", ""),
    ("${UNSET:-fallback}", "fallback"), ("${A:-fallback}", "1"), ("${EMPTY:-fallback}", "fallback"),
    ("${A:+alt}", "alt"), ("${UNSET:+alt}", ""), ("${UNSET:-$A}", "1"), ("\\$A", "$A"), ("$", "$"),
    ("$1", "$1"), ("cost: 5$", "cost: 5$"), ("${A}${B}/${UNSET:-d}", "12/d"),
])
def test_expand(word, expected):
    assert expand(word, {"A": "1", "B": "2", "EMPTY": ""}) == expected


@pytest.mark.parametrize("word", ["${A:?required}", "${A#prefix}", "${A", "${1}", "${A/x/y}"])
def test_expand_refuses_what_it_does_not_do(word):
    with pytest.raises(TemplateError, match="line 7: .*that is not"):
        expand(word, {"A": "1"}, 7)


def test_display_keeps_flags():
    assert one("COPY --chown=node a /b").display == "COPY --chown=node a /b"


# --- where a COPY lands: destinations resolved through the image's own symlinks (templates/layers.py) ------

def _stack(tmp_path, *entries):  # type: ignore[no-untyped-def]
    from stockade.templates import TemplateStore, import_image

    from . import template_images as ti

    store = TemplateStore(tmp_path / "store")
    ti.oci_layout(tmp_path / "img", [ti.layer(*entries)])
    import_image(store, "t", f"oci:{tmp_path / 'img'}")
    r = store.resolve("t")
    return [str(d) for d in r.layer_dirs], r.layer_infos


@pytest.mark.parametrize("path,expected", [
    ("/bin/tool", ["usr", "bin", "tool"]),              # merged /usr: bin -> usr/bin
    ("/abs/tool", ["usr", "bin", "tool"]),              # an absolute target stays in the image
    ("/up/tool", ["tool"]),                             # ../../.. clamps at the image's root
    ("/usr/bin/../lib/x", ["usr", "lib", "x"]),
    ("/bin", ["bin"]),                                  # the last component is not resolved
    ("/missing/dir/x", ["missing", "dir", "x"]),
])
def test_destinations_resolve_through_image_symlinks(tmp_path, path, expected):
    from stockade.templates.layers import resolve_in_stack

    from . import template_images as ti

    trees, infos = _stack(tmp_path, ti.entry("dir", "usr"), ti.entry("dir", "usr/bin"), ti.entry("dir", "usr/lib"),
                          ti.entry("symlink", "bin", target="usr/bin"),
                          ti.entry("symlink", "abs", target="/usr/bin"),
                          ti.entry("symlink", "up", target="../../../.."))
    assert resolve_in_stack(trees, infos, path) == expected


def test_a_symlink_loop_in_the_image_is_an_error(tmp_path):
    from stockade.templates.layers import resolve_in_stack

    from . import template_images as ti

    trees, infos = _stack(tmp_path, ti.entry("symlink", "a", target="b"), ti.entry("symlink", "b", target="/a"))
    with pytest.raises(TemplateError, match="more than 40 symlinks"):
        resolve_in_stack(trees, infos, "/a/x")
