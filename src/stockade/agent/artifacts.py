"""The artifact socket: what processes inside save, streamed to the host."""

from __future__ import annotations

import os
import select
import sys

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    pass

try:
    from . import protocol
    from .common import ARTIFACT_ADDRESS, MAX_ARTIFACT_CONNS, POLL_IN, AgentBase, _read_some
except ImportError:  # run as a script inside the sandbox
    import protocol  # type: ignore[no-redef]
    from common import ARTIFACT_ADDRESS, MAX_ARTIFACT_CONNS, POLL_IN, AgentBase, _read_some  # type: ignore[no-redef]



class ArtifactSink(AgentBase):
    def op_artifacts(self, rid: int, h: dict, body: bytes) -> None:
        """The host opens the artifact stream: listen on the sandbox-private abstract socket."""
        import _socket

        if self.listener is not None:
            raise ValueError("artifacts are already open")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.bind(ARTIFACT_ADDRESS)
        sock.listen(16)
        sock.setblocking(False)
        self.listener, self.artifact_rid = sock, rid  # type: ignore[assignment]
        self.poll.register(sock.fileno(), select.POLLIN)

    def accept_artifact(self) -> None:
        import _socket

        try:
            fd, _ = self.listener._accept()  # type: ignore[union-attr]  # the raw fd: no socket object
        except OSError:  # nothing pending, or out of descriptors: the agent must go on serving
            return
        if len(self.art_conns) >= MAX_ARTIFACT_CONNS:
            os.close(fd)
            return
        conn = _socket.socket(fileno=fd)
        conn.setblocking(False)
        try:  # who is saving: the peer's command line, for the record
            creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            with open(f"/proc/{int.from_bytes(creds[:4], sys.byteorder)}/cmdline", "rb") as f:
                cmd = f.read(4096).replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            cmd = ""
        self.next_aid += 1
        self.art_conns[fd] = {"sock": conn, "aid": self.next_aid, "head": bytearray(), "name": None, "cmd": cmd}
        if not self.paused:
            self.poll.register(fd, POLL_IN)

    def read_artifact(self, fd: int) -> None:
        conn = self.art_conns[fd]
        data = _read_some(fd)
        if data is None:
            return
        eof = not data
        if conn["name"] is None:  # the header line: {"name": ...}
            conn["head"] += data
            if b"\n" not in conn["head"] and not eof and len(conn["head"]) < 8192:
                return
            line, _, data = bytes(conn["head"]).partition(b"\n")
            try:
                name = protocol.loads(line.decode("utf-8", "replace")).get("name")  # type: ignore[attr-defined]
            except (protocol.FrameError, AttributeError):
                name = None
            if not isinstance(name, str):
                self.finish_artifact(fd, {"ok": False, "message": "bad request: send {\"name\": ...} first"})
                return
            conn["name"] = name
            self.send({"id": self.artifact_rid, "ev": "artifact", "aid": conn["aid"], "more": True,
                       "name": name, "cmd": conn["cmd"]})
        if data:
            self.send({"id": self.artifact_rid, "ev": "artifact", "aid": conn["aid"], "more": True}, data)
        if not eof:
            return
        # end of the client's data: the host answers with an artifact_ack
        if not self.paused:
            self.poll.unregister(fd)
        conn["done"] = True
        self.send({"id": self.artifact_rid, "ev": "artifact", "aid": conn["aid"], "more": False})

    def op_artifact_ack(self, rid: int, h: dict, body: bytes) -> None:
        for fd, conn in list(self.art_conns.items()):
            if conn["aid"] == h["aid"]:
                self.finish_artifact(fd, {"ok": bool(h.get("ok")), "message": h.get("message"),
                                          "size": h.get("size"), "sha256": h.get("sha256")})

    def finish_artifact(self, fd: int, answer: dict) -> None:
        conn = self.art_conns.pop(fd)
        if not conn.get("done") and not self.paused:
            self.poll.unregister(fd)
        try:
            conn["sock"].setblocking(True)
            conn["sock"].settimeout(2)
            conn["sock"].sendall(protocol.dumps(answer).encode())
        except OSError:
            pass
        conn["sock"].close()
