"""run_code: stateful contexts, rich results, errors, timeouts, crashes, languages. The sandbox
environment (`stockade env build`) gives IPython, numpy, pandas and matplotlib; CI builds it."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading

import pytest

from stockade import AsyncSandbox, PolicyError, Sandbox, SandboxNotFoundError
from stockade.config import HostConfig
from stockade.environment import is_built

from .conftest import base_policy

needs_env = pytest.mark.skipif(not is_built(HostConfig.from_env().sandbox_env),
                               reason="the sandbox environment is not built (stockade env build)")


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_state_persists_within_a_context_and_not_across(sandbox: Sandbox):
    assert sandbox.run_code("x = 20").error is None
    e = sandbox.run_code("print('side'); x + 22")
    assert e.text == "42" and e.logs.stdout == ["side\n"] and e.execution_count == 2
    other = sandbox.create_code_context()
    assert sandbox.run_code("x", context=other).error.name == "NameError"
    sandbox.run_code("import os; os.chdir('/tmp')", context=other)
    assert sandbox.run_code("import os; os.getcwd()").text == "'/home/user'"
    assert sandbox.run_code("os.getcwd()", context=other).text == "'/tmp'"


def test_errors_carry_name_value_and_traceback(sandbox: Sandbox):
    e = sandbox.run_code("def f():\n    return 1 / 0\nf()")
    assert e.error.name == "ZeroDivisionError" and "division by zero" in e.error.value
    assert "f()" in e.error.traceback and "1 / 0" in e.error.traceback
    assert e.results == []
    assert sandbox.run_code("syntax error here").error.name == "SyntaxError"


def test_streaming_callbacks_and_envs(sandbox: Sandbox):
    out, results = [], []
    e = sandbox.run_code("import os, sys\nprint(os.environ['GREETING'])\nprint('e', file=sys.stderr)\n7",
                         envs={"GREETING": "hello"}, on_stdout=out.append, on_result=results.append)
    assert "".join(out) == "hello\n" and e.logs.stderr == ["e\n"]
    assert [r.text for r in results] == ["7"]


def test_timeout_interrupts_and_keeps_the_state(sandbox: Sandbox):
    sandbox.run_code("kept = 'yes'")
    e = sandbox.run_code("import time\nwhile True: time.sleep(0.1)", timeout=1)
    assert e.timed_out and e.error.name == "TimeoutError" and "limits.command_timeout" in e.error.value
    assert sandbox.run_code("kept").text == "'yes'"


def test_a_cell_that_ignores_the_interrupt_gets_a_fresh_context(sandbox: Sandbox):
    sandbox.run_code("lost = 1")
    code = "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass"
    e = sandbox.run_code(code, timeout=1)
    assert e.timed_out and e.error.name == "TimeoutError" and "restarts" in e.error.value
    assert sandbox.run_code("'lost' in globals()").text == "False"


def test_a_crashed_interpreter_is_reported_and_replaced(sandbox: Sandbox):
    sandbox.run_code("gone = 1")
    e = sandbox.run_code("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert e.error.name == "ContextDied"
    assert sandbox.run_code("1 + 1").text == "2"
    assert sandbox.run_code("'gone' in globals()").text == "False"


def test_contexts_list_restart_remove(sandbox: Sandbox):
    ctx = sandbox.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    assert ctx.id in [c.id for c in sandbox.list_code_contexts()]
    sandbox.run_code("v = 1", context=ctx)
    sandbox.restart_code_context(ctx)
    assert sandbox.run_code("'v' in globals()", context=ctx).text == "False"
    sandbox.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sandbox.list_code_contexts()]
    with pytest.raises(SandboxNotFoundError, match="code context"):
        sandbox.run_code("1", context=ctx)
    with pytest.raises(PolicyError, match="unsupported language 'cobol'"):
        sandbox.run_code("1", language="cobol")


def test_bash_context(sandbox: Sandbox):
    ctx = sandbox.create_code_context("bash")
    sandbox.run_code("X=5; cd /tmp; f() { echo func; }", context=ctx)
    e = sandbox.run_code("echo $X; pwd; f", context=ctx)
    # three writes: the chunks are as the agent read them (one, two or three); the text is what counts
    assert "".join(e.logs.stdout) == "5\n/tmp\nfunc\n" and e.error is None
    assert sandbox.run_code("false", context=ctx).error.name == "ExitCode"
    e = sandbox.run_code("sleep 30; echo never", context=ctx, timeout=1)
    assert e.timed_out and e.logs.stdout == []
    assert "".join(sandbox.run_code("echo $X", context=ctx).logs.stdout) == "5\n"


def test_javascript_context(sandbox: Sandbox):
    ctx = sandbox.create_code_context("javascript")
    assert ctx.backend == "node"
    e = sandbox.run_code("let a = 40; console.log('log'); a + 2", context=ctx)
    assert e.text == "42" and e.logs.stdout == ["log\n"]
    assert sandbox.run_code("a", context=ctx).text == "40"
    assert sandbox.run_code("null.x", context=ctx).error.name == "TypeError"
    e = sandbox.run_code("while (true) {}", context=ctx, timeout=1)
    assert e.timed_out and e.error.name == "TimeoutError"
    assert sandbox.run_code("a", context=ctx).text == "40"


def test_concurrent_cells_on_two_contexts(sandbox: Sandbox):
    a, b = sandbox.create_code_context(), sandbox.create_code_context()
    out: dict[str, str | None] = {}

    def run(name, ctx):
        out[name] = sandbox.run_code(f"import time\ntime.sleep(0.5)\n'{name}'", context=ctx).text

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {"a": "'a'", "b": "'b'"}


def test_output_cap_applies_per_cell(make_sandbox):
    sb = make_sandbox(limits={"output": "16KiB"})
    e = sb.run_code("print('x' * 100000)")
    assert e.truncated and sum(len(s) for s in e.logs.stdout) == 16 << 10
    e = sb.run_code("print('fresh budget')")
    assert not e.truncated and e.logs.stdout == ["fresh budget\n"]


@needs_env
def test_ipython_rich_results(sandbox: Sandbox):
    assert sandbox.info().runtime["code_interpreter"] == "ipython"
    e = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    main = e.results[0]
    assert main.is_main_result and "<table" in main.html and "a" in main.text
    assert set(main.formats()) >= {"text", "html"}
    e = sandbox.run_code("from IPython.display import display, Markdown\ndisplay(Markdown('**hi**'))\n5")
    assert [r.markdown for r in e.results if not r.is_main_result] == ["**hi**"]
    assert e.text == "5"
    assert sandbox.list_code_contexts()[0].backend == "ipython"


@needs_env
def test_matplotlib_figures_become_png_results(sandbox: Sandbox):
    e = sandbox.run_code("import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(4, 3), dpi=50)\n"
                         "plt.plot([1, 3, 2])\nplt.show()")
    assert e.error is None
    pngs = [r.png for r in e.results if r.png]
    assert len(pngs) == 1
    width, height = png_size(pngs[0])  # the inline backend crops to the drawing ("tight"): about 4:3
    assert 100 < width < 400 and 1.1 < width / height < 1.5
    # a figure left open (not shown) is still delivered at the end of the cell
    e = sandbox.run_code("plt.figure(figsize=(6, 2)); plt.plot([1, 2]); None")
    sizes = [png_size(r.png) for r in e.results if r.png]
    assert len(sizes) == 1 and sizes[0][0] > 2 * sizes[0][1]


@needs_env
@pytest.mark.parametrize("select", [
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt",   # before pyplot
    "import matplotlib.pyplot as plt, matplotlib\nplt.plot([0]); plt.close()\nmatplotlib.use('Agg')",  # after
    "import matplotlib.pyplot as plt\nplt.switch_backend('Agg')",
    "import matplotlib.pyplot as plt\nplt.switch_backend('TkAgg')",   # a GUI backend that cannot load here
    "import matplotlib\nmatplotlib.use('module://no_such_backend')\nimport matplotlib.pyplot as plt",
    "%matplotlib inline\nimport matplotlib.pyplot as plt",
])
def test_figures_come_back_whatever_backend_the_code_selects(sandbox: Sandbox, select: str):
    e = sandbox.run_code(select + "\nplt.figure(figsize=(4, 3), dpi=50); plt.plot([1, 3, 2]); plt.show()")
    assert e.error is None, e.error
    assert len([r for r in e.results if r.png]) == 1
    assert "".join(e.logs.stderr) == ""  # no "FigureCanvasAgg is non-interactive" warning
    e = sandbox.run_code("fig = plt.figure(figsize=(6, 2)); fig.gca().plot([1, 2]); fig.show()")  # left open
    sizes = [png_size(r.png) for r in e.results if r.png]
    assert len(sizes) == 1 and sizes[0][0] > 2 * sizes[0][1] and "".join(e.logs.stderr) == ""
    assert len([r for r in sandbox.run_code("plt.plot([4, 5])").results if r.png]) == 1  # and in later cells


@needs_env
def test_one_figure_is_one_result(sandbox: Sandbox):
    # the README's example: the figure is the cell's value, and is not published again as a display
    sandbox.run_code("import pandas as pd\ndf = pd.DataFrame({'day': range(7), 'sales': [3, 5, 4, 8, 7, 9, 12]})")
    e = sandbox.run_code("ax = df.plot(x='day', y='sales'); fig = ax.get_figure(); fig")
    assert [(r.is_main_result, bool(r.png)) for r in e.results] == [(True, True)]
    # displayed and left open: once; displayed, then changed: the changed figure comes back too
    e = sandbox.run_code("import matplotlib.pyplot as plt\nfrom IPython.display import display\n"
                         "f, a = plt.subplots(); a.plot([1]); display(f)")
    assert [(r.is_main_result, bool(r.png)) for r in e.results] == [(False, True)]
    e = sandbox.run_code("f, a = plt.subplots(); a.plot([1]); display(f); a.plot([2])")
    assert len([r for r in e.results if r.png]) == 2


def test_async_run_code():
    async def main() -> None:
        async with await AsyncSandbox.create(policy=base_policy()) as sb:
            chunks: list[str] = []
            e = await sb.run_code("print('a'); 1 + 1", on_stdout=chunks.append)
            assert e.text == "2" and chunks == ["a\n"]
            ctx = await sb.create_code_context("bash")
            assert (await sb.run_code("echo hi", context=ctx)).logs.stdout == ["hi\n"]
            results = await asyncio.gather(*(sb.run_code(f"{i} * 2", context=c)
                                             for i, c in enumerate([await sb.create_code_context() for _ in range(3)])))
            assert [r.text for r in results] == ["0", "2", "4"]
            assert len(await sb.list_code_contexts()) >= 4
            await sb.restart_code_context(ctx)
            await sb.remove_code_context(ctx)

    asyncio.run(main())
