"""The agent as it is placed in every sandbox, whatever the runtime: its modules compiled to one archive,
the code interpreter, the scripts. Built once per interpreter and cached on disk by content."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import zipfile
from functools import cache
from pathlib import Path

from .. import environment
from ..agent import protocol
from ..errors import SandboxUnavailableError

AGENT_SOURCES = ("server.py", "common.py", "processes.py", "contexts.py", "files.py", "artifacts.py", "bridge.py",
                 "sysinfo.py", "usage.py", "ports.py", "protocol.py", "interpreter.py")
# shipped as they are (interpreter.py: for a template's own python, runtime/jail/template_root.image_python)
AGENT_FILES = ("interpreter.js", "node_proxy.js", "interpreter.py")
AGENT_MAIN, AGENT_ZIP, INTERPRETER_PYC = "__main__.py", "agent.zip", "interpreter.pyc"
SAVE_ARTIFACT = b"#!/usr/bin/python3 -I\nimport sys\nsys.path.insert(0, '/opt/stockade/lib')\n" \
    b"from stockade_artifacts import main\nmain()\n"
@cache
def compiled_agent(python_host: str, state_dir: Path) -> dict[str, bytes]:
    """The files of /opt/stockade/agent in every sandbox: ``agent.zip`` (the agent's modules compiled to
    bytecode by the sandbox's own interpreter, run by zipimport, with a ``__main__``), the interpreter's
    bytecode and the scripts, cached on disk by their content and the interpreter. One archive rather
    than a file per module: each file placed costs bwrap a bind, and a directory bound from the host would
    show the host's path in the sandbox's mountinfo."""
    agent_dir = Path(protocol.__file__).parent
    sources = {name: (agent_dir / name).read_bytes() for name in AGENT_SOURCES}
    sources[AGENT_MAIN] = b"from server import main\nmain()\n"
    st = os.stat(python_host)
    key = hashlib.sha256(b"".join(sources.values()) + f"{python_host}:{st.st_mtime_ns}".encode()).hexdigest()
    cache_dir = state_dir / "agent" / key[:20]
    if not all((cache_dir / name).exists() for name in (AGENT_ZIP, INTERPRETER_PYC)):
        tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, data in sources.items():
            (tmp / name).write_bytes(data)
        script = ("import py_compile,sys\n"
                  "for src in sys.argv[1:]:\n"
                  "    py_compile.compile(src, cfile=src + 'c', doraise=True,"
                  " invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n")
        result = subprocess.run([python_host, "-I", "-c", script, *(str(tmp / n) for n in sources)],  # isolated
                                capture_output=True, text=True, timeout=60, cwd="/",
                                env=environment.isolated_env())
        if result.returncode != 0:
            raise SandboxUnavailableError(f"the sandbox's python ({python_host}) cannot compile the agent: "
                                          f"{result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(tmp / AGENT_ZIP, "w", zipfile.ZIP_STORED) as archive:
            for name in sources:
                if name != "interpreter.py":  # a program of its own, started by path
                    archive.write(tmp / (name + "c"), name + "c")
        for name in sources:
            (tmp / name).unlink()
            if name != "interpreter.py":
                (tmp / (name + "c")).unlink()
        with contextlib.suppress(OSError):
            os.rename(tmp, cache_dir)
        if tmp.exists():  # another process won the race
            for path in tmp.iterdir():
                path.unlink()
            tmp.rmdir()
    files = {name: (cache_dir / name).read_bytes() for name in (AGENT_ZIP, INTERPRETER_PYC)}
    files.update({name: (agent_dir / name).read_bytes() for name in AGENT_FILES})
    return files
