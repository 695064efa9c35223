"""Which runsc runs, on which platform, and what this host lets it do: found and probed once per process.

The platform is how the Sentry intercepts system calls: systrap (the default of current runsc; seccomp
traps, no KVM), ptrace (the oldest, slower; the only one in Debian 12's 2022 runsc that works on a VM), kvm
(needs a usable /dev/kvm). Probing one is a real `runsc do true` (~100-150 ms), so its answer is kept in the
state directory, keyed by the runsc binary and the kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ... import environment
from ...errors import SandboxUnavailableError

PLATFORMS = ("systrap", "ptrace", "kvm")
PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Runsc:
    path: str
    version: str        # its `--version` line, e.g. "release-20260905.0" or "0.0~20221219.0"
    platform: str
    platforms: dict[str, str]   # platform -> "ok" or why it does not run here

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "version": self.version, "platform": self.platform}



def locate(override: str | None) -> str:
    """STOCKADE_RUNSC, else runsc on PATH (then /usr/local/bin, /usr/bin, /usr/sbin)."""
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise SandboxUnavailableError(f"STOCKADE_RUNSC={override} is not an executable file",
                                          "fix: point it at a runsc binary, or unset it")
        return os.path.realpath(override)
    found = shutil.which("runsc") or next(
        (p for p in ("/usr/local/bin/runsc", "/usr/bin/runsc", "/usr/sbin/runsc") if os.access(p, os.X_OK)), None)
    if found is None:
        raise SandboxUnavailableError(
            "gVisor is not installed: no runsc on PATH",
            "fix: apt-get install runsc (Debian 12's 2022 build, ptrace only), or build a current one: "
            "GOBIN=/usr/local/bin go install gvisor.dev/gvisor/runsc@<version of its go branch>; or set "
            "STOCKADE_RUNSC")
    return os.path.realpath(found)


def version_of(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                             env=environment.isolated_env(), cwd="/").stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailableError(f"cannot run {path}: {exc}") from None
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("runsc version ").strip() or "unknown"


def _run_flags(path: str) -> str:
    """What `runsc run --help` lists (the flags of its run command)."""
    try:
        done = subprocess.run([path, "run", "--help"], capture_output=True, text=True, timeout=10,
                              env=environment.isolated_env(), cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def probe(path: str, state_dir: Path, wanted: str | None) -> Runsc:
    """The platform to use: ``wanted`` (STOCKADE_GVISOR_PLATFORM) if it runs, else the first of
    PLATFORMS that does. Each answer is cached on disk by binary and kernel."""
    version = version_of(path)
    # The channel is a descriptor donated to the container (run --pass-fd, in runsc since 2023); Debian 12's
    # 2022 build has only stdio for that, and a socket given as the container's stdio did not carry the
    # agent's writes (EPIPE, measured with a current runsc).
    # Given the channel through a host socket instead, that build ran and failed 41 of the conformance suite's
    # in-process tests (measured): it does not hold the policy, so it is refused with what it misses.
    if "-pass-fd" not in _run_flags(path):
        raise SandboxUnavailableError(
            f"{path} ({version}) is too old for stockade: its `runsc run` has no --pass-fd, the way the agent's "
            "channel enters the sandbox; and it does not hold the policy (measured with Debian 12's 2022 build: "
            "a command's background processes outlive its kill, commands can read the agent's /proc/1/environ "
            "and memory, personality(2) and int 0x80 are not refused)",
            "fix: install a current runsc (GOBIN=/usr/local/bin go install gvisor.dev/gvisor/runsc@<a version "
            "of its go branch>), or point STOCKADE_RUNSC at one")
    st = os.stat(path)
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}:{os.uname().release}:{os.geteuid()}".encode())
    cache = state_dir / "gvisor" / f"platforms-{key.hexdigest()[:16]}.json"
    try:
        platforms: dict[str, str] = json.loads(cache.read_text())
    except (OSError, ValueError):
        platforms = {}
    order = [wanted] if wanted else list(PLATFORMS)
    if wanted and wanted not in PLATFORMS:
        raise SandboxUnavailableError(f"STOCKADE_GVISOR_PLATFORM={wanted!r} is not one of {', '.join(PLATFORMS)}")
    chosen = None
    for name in order:
        if name not in platforms:
            platforms[name] = _try_platform(path, name)
            cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(platforms))
            os.replace(tmp, cache)
        if platforms[name] == "ok":
            chosen = name
            break
    if chosen is None:
        reasons = "; ".join(f"{n}: {platforms.get(n, 'not tried')}" for n in order)
        raise SandboxUnavailableError(f"gVisor ({path}, {version}) cannot run on this host ({reasons})",
                                      "fix: run `stockade doctor`; as an ordinary user runsc needs --rootless "
                                      "support, and the kvm platform a usable /dev/kvm")
    return Runsc(path, version, chosen, platforms)


def _try_platform(path: str, platform: str) -> str:
    """'ok' when `runsc do true` exits 0 on this platform, else the last line runsc said."""
    with tempfile.TemporaryDirectory(prefix="stockade-runsc-probe-") as root:
        argv = [path, "--root", root, "--network=none", f"--platform={platform}", "--ignore-cgroups"]
        if os.geteuid() != 0:
            argv.append("--rootless")
        try:
            done = subprocess.run([*argv, "do", "true"], capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                                  env=environment.isolated_env(), cwd="/")
        except subprocess.TimeoutExpired:
            return f"`runsc do true` did not finish in {PROBE_TIMEOUT:.0f} s"
        except OSError as exc:
            return f"cannot run runsc: {exc.strerror}"
    if done.returncode == 0:
        return "ok"
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return (lines[-1] if lines else f"exited with {done.returncode}")[:300]


def unmount_null_netns(root: Path) -> None:
    """runsc pins one empty network namespace for its gofers at ``<root>/null-netns``, a bind mount kept
    across containers (its start-up optimisation, nothing of any sandbox in it); a --root directory that is
    to be removed must lose it first, as runsc's own UnmountNullNetNS does (concurrent starts may stack
    several)."""
    path = root / "null-netns"
    while os.path.ismount(path):
        if subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30).returncode != 0:
            break
