"""Save artifacts from inside a stockade sandbox: files handed to the host on purpose, kept after the
sandbox is gone.

    from stockade_artifacts import save
    save("report.csv", "a,b\\n1,2\\n")          # str, bytes, a file object, or a matplotlib figure
    save("data.bin", path="/home/user/out.bin")

or from a shell: ``save-artifact NAME [FILE|-]``. Standard library only.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys

ADDRESS = "\0stockade-agent"  # an abstract socket: private to this sandbox's network namespace
CHUNK = 64 * 1024


class ArtifactError(Exception):
    pass


def save(name: str, data: object = None, *, path: str | None = None) -> dict:
    """Send ``data`` (or the file at ``path``) to the host as artifact ``name``; returns its size and
    sha256. Raises ArtifactError when the host refuses it (bad name, quota)."""
    if (data is None) == (path is None):
        raise ValueError("give either data or path")
    if hasattr(data, "savefig"):  # a matplotlib figure: its image, in the format the name asks for
        buf = io.BytesIO()
        fmt = os.path.splitext(name)[1].lstrip(".").lower() or "png"
        data.savefig(buf, format=fmt)  # type: ignore[attr-defined]
        data = buf.getvalue()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(ADDRESS)
    except OSError as exc:
        raise ArtifactError(f"the stockade agent is not accepting artifacts here: {exc}") from None
    with sock:
        sock.sendall(json.dumps({"name": name}).encode() + b"\n")
        if path is not None:
            with open(path, "rb") as f:
                _stream(sock, f)
        elif isinstance(data, str):
            sock.sendall(data.encode())
        elif isinstance(data, (bytes, bytearray, memoryview)):
            sock.sendall(data)
        elif hasattr(data, "read"):
            _stream(sock, data)
        else:
            raise TypeError(f"cannot save {type(data).__name__}: give str, bytes, a file object or a figure")
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    try:
        answer = json.loads(reply or b"{}")
    except ValueError:
        answer = {}
    if not answer.get("ok"):
        raise ArtifactError(answer.get("message") or "the host did not confirm the artifact")
    return answer


def _stream(sock: socket.socket, f: object) -> None:
    while chunk := f.read(CHUNK):  # type: ignore[attr-defined]
        sock.sendall(chunk.encode() if isinstance(chunk, str) else chunk)


def main() -> None:
    args = sys.argv[1:]
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        print("usage: save-artifact NAME [FILE|-]   (no FILE or '-': read standard input)", file=sys.stderr)
        sys.exit(2)
    try:
        from_stdin = len(args) == 1 or args[1] == "-"
        answer = save(args[0], sys.stdin.buffer) if from_stdin else save(args[0], path=args[1])
    except (ArtifactError, OSError) as exc:
        print(f"save-artifact: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"saved artifact {args[0]} ({answer.get('size')} bytes, sha256 {answer.get('sha256')})")


if __name__ == "__main__":
    main()
