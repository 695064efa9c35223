"""A tiny wheel built by hand (a zip with the metadata pip needs), so tests install packages with no index
on the internet and no build backend."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def make_wheel(directory: Path, name: str, version: str, module: str, script: str | None = None) -> Path:
    """``name``-``version`` with one module ``name``.py holding ``module``; ``script`` adds a console script
    ``name``-hello that runs ``name:main``."""
    dist = f"{name}-{version}"
    files = {f"{name}.py": module,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: stockade-tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    if script is not None:
        files[f"{dist}.dist-info/entry_points.txt"] = f"[console_scripts]\n{name}-hello = {name}:main\n"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name_, text in files.items():
            zf.writestr(name_, text)
    return path
