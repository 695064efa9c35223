"""A code-interpreter context: one long-lived Python process inside the sandbox, started by the agent.

Requests arrive as JSON lines on stdin (``{"code": ..., "env": {...}}``); what the code prints goes to
fds 1 and 2 like any command's output; structured events go as JSON lines to fd 3:
``ready``, ``result`` (a MIME bundle; ``main`` for the value of the last expression), ``error`` (name,
value, traceback) and ``done`` (execution count). It runs user code in its own process, so whatever that
code does to it, the agent only ever reads lines from it and treats them as untrusted.

IPython's InteractiveShell (the execution core of ipykernel) runs the code when the sandbox's python has
it: display rules, rich reprs, matplotlib figures. Otherwise a standard-library fallback runs it with the
same last-expression rule and plain-text results.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import traceback

TYPE_CHECKING = False  # importing typing costs a context's start; mypy reads this name as true
if TYPE_CHECKING:
    from typing import Any

EVENTS_FD = 3


def emit(event: dict) -> None:
    data = (json.dumps(event, default=str) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(EVENTS_FD, view):]


def jsonable(bundle: dict) -> dict:
    out = {}
    for mime, value in bundle.items():
        if isinstance(value, bytes):  # images arrive as bytes from some formatters
            import base64

            value = base64.b64encode(value).decode()
        elif not isinstance(value, (str, dict, list, int, float, bool)) and value is not None:
            value = str(value)
        out[mime] = value
    return out


class StdlibBackend:
    name = "stdlib"

    def __init__(self) -> None:
        self.namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.count = 0

    def run(self, code: str) -> None:
        import linecache

        self.count += 1
        filename = f"<cell-{self.count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = ast.parse(code, filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)  # type: ignore[attr-defined]
            exec(compile(tree, filename, "exec"), self.namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.namespace)
                if value is not None:
                    self.namespace["_"] = value
                    emit({"type": "result", "main": True, "data": {"text/plain": repr(value)}})
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, KeyboardInterrupt included
            if isinstance(exc, SystemExit):
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            user = [f for f in frames if f.filename.startswith("<cell-")]
            lines = ["Traceback (most recent call last):\n", *traceback.format_list(user),
                     *traceback.format_exception_only(type(exc), exc)]
            emit({"type": "error", "name": type(exc).__name__, "value": str(exc), "traceback": "".join(lines)})


class BashBackend:
    """One bash process per context; each cell is sourced into it, so variables, functions and the
    working directory persist. An interrupt stops the cell (``return 130``) and keeps the shell."""

    name = "bash"

    def __init__(self) -> None:
        import subprocess

        self.status_r, status_w = os.pipe()
        self.status_fd = status_w
        self.shell = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, pass_fds=(status_w,),
                                      start_new_session=True)
        os.close(status_w)
        self.status = os.fdopen(self.status_r, "r")
        self.count = 0
        self.run("trap 'return 130' INT", quiet=True)
        self.count = 0

    def run(self, code: str, quiet: bool = False) -> None:
        import signal
        import tempfile

        self.count += 1
        with tempfile.NamedTemporaryFile("w", prefix=".stockade-cell-", suffix=".sh", delete=False) as f:
            f.write(code + "\n")
        try:
            assert self.shell.stdin is not None
            self.shell.stdin.write(f". {f.name}; printf '%s\\n' $? >&{self.status_fd}\n".encode())
            self.shell.stdin.flush()
            while True:
                try:
                    line = self.status.readline()
                    break
                except KeyboardInterrupt:
                    os.killpg(self.shell.pid, signal.SIGINT)
        finally:
            os.unlink(f.name)
        if not line:  # the shell exited (`exit` in a cell): so does this context
            raise SystemExit(0)
        status = int(line.strip() or 1)
        if status and not quiet:
            name = "KeyboardInterrupt" if status == 130 else "ExitCode"
            emit({"type": "error", "name": name, "value": f"exit status {status}", "traceback": ""})


class IPythonBackend:
    name = "ipython"

    def __init__(self) -> None:
        from IPython.core.displayhook import DisplayHook
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell

        class Publisher(DisplayPublisher):  # display(...) and figures
            def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):  # noqa
                emit({"type": "result", "main": False, "data": jsonable(data)})

            def clear_output(self, wait=False):  # noqa
                pass

        class Hook(DisplayHook):  # the value of the last expression
            def write_output_prompt(self):  # noqa
                pass

            def write_format_data(self, format_dict, md_dict=None):  # noqa
                emit({"type": "result", "main": True, "data": jsonable(format_dict)})

        self.shell = InteractiveShell.instance(colors="NoColor", display_pub_class=Publisher,
                                               displayhook_class=Hook)
        os.environ.setdefault("MPLBACKEND", "agg")  # headless; Figures publishes what is drawn
        self.figures = Figures(self.shell)
        self.shell.showtraceback = self._capture_traceback  # type: ignore[method-assign]
        self.shell.showsyntaxerror = lambda *a, **k: self._capture_traceback()  # type: ignore[method-assign]
        self.shell.showindentationerror = lambda *a, **k: self._capture_traceback()  # type: ignore[method-assign]
        self.error: dict | None = None

    def _capture_traceback(self, exc_tuple=None, *args, **kwargs):  # noqa
        etype, value, tb = exc_tuple or sys.exc_info()
        try:
            stb = self.shell.InteractiveTB.structured_traceback(etype, value, tb)
            text = "\n".join(stb)
        except Exception:  # noqa: BLE001 - fall back to the plain formatter
            text = "".join(traceback.format_exception(etype, value, tb))
        self.error = {"type": "error", "name": getattr(etype, "__name__", str(etype)), "value": str(value),
                      "traceback": text}

    def run(self, code: str) -> None:
        self.error = None
        self.figures.shown.clear()
        self.shell.run_cell(code, store_history=True)
        try:
            self.figures.flush()
        except Exception:  # noqa: BLE001 - a figure that cannot render is the cell's error, not the context's
            if not self.error:
                self._capture_traceback()
        if self.error:
            emit(self.error)

    @property
    def count(self) -> int:
        return int(self.shell.execution_count) - 1


INLINE_BACKENDS = {"inline", "module://matplotlib_inline.backend_inline", "module://ipykernel.pylab.backend_inline"}


class Figures:
    """matplotlib figures as PNG results, whatever backend the code selects, as Jupyter's inline backend would.

    The sandbox has no display and no notebook front end, so this does the inline backend's job itself
    instead of depending on that backend staying selected (``matplotlib.use('Agg')``, a GUI backend, or
    ``%matplotlib inline`` would each switch it off or add a second copy of every figure): when pyplot is
    first imported, ``plt.show`` is replaced by one that publishes the open figures, a backend that cannot
    load (or the inline one) becomes Agg, and at the end of every cell each figure still open is published
    and closed. A figure already published in the cell (as its value, by ``display`` or ``show``) and not
    changed since is not published again: one figure, one result.
    """

    def __init__(self, shell: Any) -> None:
        import weakref

        self.shell = shell
        self.shown: weakref.WeakSet = weakref.WeakSet()   # figures published during the current cell
        sys.meta_path.insert(0, self)  # type: ignore[arg-type]
        shell.enable_matplotlib = self.enable_matplotlib  # %matplotlib and %pylab: nothing to set up but pyplot

    # the import hook: patch matplotlib.pyplot right after it is first executed
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name != "matplotlib.pyplot":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def patch(self, pyplot: Any) -> None:
        import warnings

        from IPython.core.pylabtools import print_figure
        from matplotlib.figure import Figure

        def png(fig):  # noqa: ANN001, ANN202
            data = print_figure(fig, "png", base64=True)  # bbox_inches="tight", as the inline backend does
            fig.stale = False  # drawn just now (the tight crop's restore marks it stale): a change after this counts
            self.shown.add(fig)
            return data

        self.shell.display_formatter.formatters["image/png"].for_type(Figure, png)
        switch = pyplot.switch_backend

        def switch_backend(name):  # noqa: ANN001, ANN202
            if isinstance(name, str) and name.lower() in INLINE_BACKENDS:
                name = "agg"
            try:
                switch(name)
            except ImportError:  # a GUI backend without its toolkit or a display: draw headless instead
                switch("agg")

        def show(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - plt.show(block=...); a function, as
            self.flush()  # switch_backend sets its __signature__

        pyplot.switch_backend = switch_backend
        pyplot.show = show
        # Figure.show() under Agg: the figure is published at the end of the cell, the warning is noise
        warnings.filterwarnings("ignore", message=".*non-interactive, and thus cannot be shown")

    def flush(self) -> None:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None or not hasattr(pyplot, "get_fignums"):
            return
        from IPython.display import display

        try:
            for num in pyplot.get_fignums():
                fig = pyplot.figure(num)
                if fig not in self.shown or fig.stale:
                    display(fig)
        finally:
            pyplot.close("all")

    def enable_matplotlib(self, gui=None):  # noqa: ANN001, ANN201
        import matplotlib.pyplot  # noqa: F401 - the import hook does the rest

        return gui, "agg"


def _user_site_on_path() -> None:
    """The user's site-packages on sys.path even before it exists (site adds it only if it does), where site
    would put it: a `pip install` (to ~/.local) from a command or `!pip` then imports in the next cell."""
    import site

    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if not user or user in sys.path:
        return
    first = next((i for i, p in enumerate(sys.path) if p.endswith(("site-packages", "dist-packages"))), len(sys.path))
    sys.path.insert(first, user)


def main() -> None:
    _user_site_on_path()
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115 - user code must not read the request channel
    requests = os.fdopen(0, "r", encoding="utf-8")
    backend: StdlibBackend | IPythonBackend | BashBackend
    if sys.argv[1:] == ["--bash"]:
        backend = BashBackend()
    else:
        try:
            backend = IPythonBackend()
        except Exception:  # noqa: BLE001 - not installed, or broken: the fallback still runs code
            backend = StdlibBackend()
    try:  # save_artifact(name, data_or_figure) in every Python context (stockade_artifacts is on PYTHONPATH)
        from stockade_artifacts import save as save_artifact

        if isinstance(backend, IPythonBackend):
            backend.shell.push({"save_artifact": save_artifact}, interactive=False)
        elif isinstance(backend, StdlibBackend):
            backend.namespace["save_artifact"] = save_artifact
    except ImportError:
        pass
    emit({"type": "ready", "backend": backend.name, "pid": os.getpid()})
    import importlib

    for line in requests:
        request = json.loads(line)
        os.environ.update(request.get("env") or {})
        importlib.invalidate_caches()   # what a command installed since the last cell (a new ~/.local) imports
        try:
            backend.run(request["code"])
        except KeyboardInterrupt:  # arrived between cells
            emit({"type": "error", "name": "KeyboardInterrupt", "value": "", "traceback": "KeyboardInterrupt"})
        sys.stdout.flush()
        sys.stderr.flush()
        emit({"type": "done", "execution_count": backend.count})


if __name__ == "__main__":
    main()
