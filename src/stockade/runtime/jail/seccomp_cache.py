"""The compiled seccomp program, cached on disk so a one-shot `stockade run` does not compile it again.

Compiling the filter with libseccomp (and loading the binding, which runs ``ldconfig -p``) costs ~10 ms
per process; the program only changes with the rules, the library or the machine. The cache file is named
by a hash of everything the program depends on: the rule table and the code that compiles it (the bytes
of seccomp.py), libseccomp's version, the binding's file, the architecture and the kernel release. It lives
in the state directory (a tmpfs under /run for root: gone at reboot).

A cached program is used only when it cannot have been written by anyone else or damaged: the directory
and the file are ours (owner = our euid), neither is writable by group or others, neither is a symlink
(the file is opened O_NOFOLLOW and checked on its descriptor), and the file carries the SHA-256 of the
program, which must match. Anything else (missing, foreign, loose mode, truncated, bad checksum) is ignored
and the program compiled; a valid file is then written atomically (a 0600 temporary renamed into place).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import stat
from collections.abc import Callable
from functools import cache
from pathlib import Path

from ...owned_files import read_own

MAGIC = b"stockade-seccomp-1\n"
BPF_MAXINSNS = 4096  # the kernel refuses longer programs; each instruction is 8 bytes


def libseccomp_version() -> str:
    """libseccomp's version, from the library itself (dlopen through the loader's cache: no ldconfig run)."""
    import ctypes

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "missing"
    lib.seccomp_version.restype = ctypes.POINTER(Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def cache_key(rules_source: Path) -> str:
    h = hashlib.sha256()
    for part in (rules_source.read_bytes(), *_toolchain()):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


@cache  # once per process: both programs (the filter and the sysinfo notifier) are keyed by it
def _toolchain() -> tuple[bytes, ...]:
    """What a compiled program depends on besides its rules: libseccomp, the binding, the machine."""
    import importlib.util

    spec = importlib.util.find_spec("pyseccomp")
    binding = "missing"
    if spec is not None and spec.origin:
        st = os.stat(spec.origin)
        binding = f"{spec.origin}:{st.st_size}:{st.st_mtime_ns}"
    return (libseccomp_version().encode(), binding.encode(), platform.machine().encode(),
            platform.release().encode())


def _private_dir(path: Path) -> bool:
    """``path`` is a real directory of ours that nobody else can write into."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022)


def load(directory: Path, key: str) -> bytes | None:
    """The cached program, or None when there is none we can trust."""
    if not (_private_dir(directory.parent) and _private_dir(directory)):
        return None
    data = read_own(directory / f"{key}.bpf", forbid=0o077, limit=len(MAGIC) + 32 + BPF_MAXINSNS * 8 + 1)
    if data is None:
        return None
    head, digest, program = data[:len(MAGIC)], data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if (head != MAGIC or not program or len(program) % 8 or len(program) > BPF_MAXINSNS * 8
            or hashlib.sha256(program).digest() != digest):
        return None
    return program


def store(directory: Path, key: str, program: bytes) -> None:
    """Write the program for ``key``; a directory we cannot trust or write is left alone (no cache)."""
    if not _private_dir(directory.parent):  # the state directory is the runtime's to make, with its mode
        return
    with contextlib.suppress(OSError):
        directory.mkdir(mode=0o700, exist_ok=True)
    if not _private_dir(directory):
        return
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(program).digest() + program)
        os.rename(tmp, directory / f"{key}.bpf")
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def cached(compile_program: Callable[[], bytes], rules_source: Path, directory: Path | None,
           name: str = "") -> bytes:
    """The program from the cache when a trusted entry exists, else compiled (and cached). ``name`` tells
    apart programs compiled from the same rules source."""
    if directory is None:
        return compile_program()
    try:
        key = cache_key(rules_source) + (f"-{name}" if name else "")
    except OSError:
        return compile_program()
    program = load(directory, key)
    if program is None:
        program = compile_program()
        store(directory, key, program)
    return program


def default_directory() -> Path | None:
    from ...config import HostConfig
    from ...errors import StockadeError

    try:
        return HostConfig.from_env().state_dir / "seccomp"
    except (OSError, ValueError, StockadeError):  # a bad environment is reported by the runtime, not here
        return None
