"""The `base` template (``stockade template base``): a Debian userland good enough for agents out of the box,
as E2B's base is: python3 with pip and venv, node with npm, bash, coreutils, git, curl, CA certificates.

It is made with mmdebstrap (Debian's maintained rootfs builder; what debootstrap does, reproducibly and
without root where subuids exist) for the host's own release, from the host's own apt sources: no mirror is
named here, the machine's apt configuration decides where packages come from. The result is one layer,
stored through the same checks as any image layer (layers.py). Its user is ``user`` (uid 1000, home
/home/user), and what an agent installs goes to that home: pip installs per user (the distribution's
EXTERNALLY-MANAGED marker is removed: a sandbox is disposable, and /usr is not its to write anyway), npm's
global prefix is ~/.npm-global. Build on it with ``stockade template build`` (``FROM base``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .errors import TemplateError
from .layers import remove_tree
from .store import Template, TemplateConfig, TemplateStore, check_name

PACKAGES = ("python3", "python3-pip", "python3-venv", "nodejs", "npm", "git", "curl", "ca-certificates", "bash",
            "coreutils", "procps", "less")
# --code-interpreter: what E2B's code-interpreter template adds, from the distribution: a sandbox's code
# contexts then run on the template's own python with IPython (runtime/jail/template_root.image_python)
CODE_INTERPRETER = ("python3-ipython", "python3-numpy", "python3-pandas", "python3-matplotlib")
HOME = "/home/user"
CONFIG = TemplateConfig(
    env={"PATH": f"{HOME}/.local/bin:{HOME}/.npm-global/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                 "/sbin:/bin",
         "NPM_CONFIG_PREFIX": f"{HOME}/.npm-global", "LANG": "C.UTF-8", "SHELL": "/bin/bash"},
    working_dir=HOME, user="user")
HOOKS = (
    'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user',
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
)


def host_release() -> str:
    """The host's Debian (or derivative) codename, from /etc/os-release."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    except OSError:
        pass
    codename = fields.get("VERSION_CODENAME", "")
    if not codename or "debian" not in (fields.get("ID", "") + " " + fields.get("ID_LIKE", "")):
        raise TemplateError("the base template is made from the host's Debian release, and this host is not "
                            f"Debian-based ({fields.get('PRETTY_NAME', 'no /etc/os-release')}): import an image "
                            "instead (stockade template import base docker://...)")
    return codename


def host_sources() -> list[str]:
    """The host's apt source files (one-line and deb822), as mmdebstrap takes them."""
    found = [p for p in (Path("/etc/apt/sources.list"),) if p.is_file() and p.read_text().strip()]
    found += sorted(p for pattern in ("*.list", "*.sources") for p in Path("/etc/apt/sources.list.d").glob(pattern))
    if not found:
        raise TemplateError("the host has no apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d): "
                            "the base template is made from them")
    return [str(p) for p in found]


def build_base(store: TemplateStore, name: str = "base", *, packages: tuple[str, ...] = PACKAGES,
               progress: Callable[[str], None] | None = None) -> Template:
    """Make the base template ``name`` (replacing it unless a sandbox uses it)."""
    check_name(name)
    say = progress or (lambda text: None)
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise TemplateError("mmdebstrap is not installed (apt-get install mmdebstrap): it makes the base "
                            "template")
    release, sources = host_release(), host_sources()
    started = time.monotonic()
    with store.importing():
        work = store.temp_dir("base")
        try:
            os.chmod(work, 0o755)   # (mmdebstrap's unshare mode writes as a subordinate uid)
            tar = work / "rootfs.tar"
            argv = [mmdebstrap, "--variant=minbase", f"--include={','.join(packages)}", "--skip=output/dev",
                    '--aptopt=APT::Install-Recommends "false"',
                    *[f"--customize-hook={hook}" for hook in HOOKS], release, str(tar), *sources]
            say(f"mmdebstrap {release}: {', '.join(packages)} (from the host's apt sources)\n")
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)  # noqa: S603
            if done.returncode != 0:
                raise TemplateError(f"mmdebstrap failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            say(f"storing the layer ({tar.stat().st_size >> 20} MiB)\n")
            info = store.add_layer_file(tar, "the base template's layer")
        finally:
            remove_tree(work)
        template = Template(name=name, layers=[info.diff_id], config=CONFIG, created=time.time(), size=info.file_bytes,
                            source=f"mmdebstrap {release} ({', '.join(packages)})")
        store.replace_template(template)
    say(f"made in {time.monotonic() - started:.1f} s\n")
    return template


__all__ = ["CODE_INTERPRETER", "CONFIG", "PACKAGES", "build_base", "host_release", "host_sources"]
