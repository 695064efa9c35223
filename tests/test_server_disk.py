"""A full disk under the server's data directory (a small tmpfs the test mounts): the audit log refuses
new work with a clear 503 rather than dropping records, and an artifact save fails without killing the
sandbox. Root only: mounting needs it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, base_policy
from .server_support import RunningServer
from .waiting import wait_until

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")]


@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (remove it to free the space)."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with contextlib.suppress(OSError), open(directory / "filler2", "wb") as f:  # the last small blocks
        while True:
            f.write(b"\0" * 512)
            f.flush()
    return filler


@pytest.fixture
def mounted() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="stockade-test-disk-"))
    try:
        with small_fs(root / "data", "16m") as data:
            yield data
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _http(srv: RunningServer) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.key()}"}, timeout=60)


def _all_events(http: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = http.get("/events", params={**params, "after_id": after, "limit": 500}).json()
        if not page:
            return out
        out += page
        after = page[-1]["id"]


def test_a_full_disk_refuses_new_work_with_503_and_loses_no_record(mounted: Path) -> None:
    srv = RunningServer(data_dir=mounted)
    try:
        with _http(srv) as http:
            body = {"policy": base_policy().model_dump(mode="json")}
            sid = http.post("/sandboxes", json=body).json()["sandbox_id"]
            spare = http.post("/sandboxes", json=body).json()["sandbox_id"]
            filler = fill(mounted)
            answered: list[int] = []
            refused: list[httpx.Response] = []
            for i in range(300):
                r = http.post(f"/sandboxes/{sid}/commands", json={"cmd": f"echo {i}"})
                assert r.status_code in (200, 503), r.text
                if r.status_code == 200:
                    answered.append(r.json()["pid"])
                else:
                    refused.append(r)
                    if len(refused) >= 3:
                        break
            assert refused, "the audit log never failed: the filesystem did not fill"
            assert refused[0].json()["code"] == "audit_unavailable"
            assert "audit log cannot be written" in refused[0].json()["message"]
            health = http.get("/health").json()
            assert health["status"] == "degraded" and health["audit"]["state"] == "failing"
            assert "full" in (health["audit"]["error"] or "")
            metrics = http.get("/metrics").text
            assert "stockade_audit_refused_requests_total 3.0" in metrics
            assert "stockade_audit_store_failing 1.0" in metrics
            # ending a sandbox still works while the store fails: it frees resources and is recorded later
            assert http.delete(f"/sandboxes/{spare}").status_code == 204
            filler.unlink()
            (mounted / "filler2").unlink(missing_ok=True)
            wait_until(lambda: http.get("/health").json()["audit"]["state"] == "ok", 30,
                       "the audit store to recover once the disk has room")
            assert http.post(f"/sandboxes/{sid}/commands", json={"cmd": "true"}).status_code == 200
            ended = {e["data"]["pid"] for e in _all_events(http, sandbox_id=sid, type="command.end")}
            missing = [pid for pid in answered if pid not in ended]
            assert answered and missing == [], f"{len(missing)} of {len(answered)} answered commands unrecorded"
            assert _all_events(http, sandbox_id=spare, type="sandbox.end")
            http.delete(f"/sandboxes/{sid}")
    finally:
        srv.stop()


def test_saving_an_artifact_on_a_full_disk_fails_clearly_and_the_sandbox_lives(mounted: Path) -> None:
    with small_fs(mounted / "artifacts", "1m") as artifacts:
        srv = RunningServer(data_dir=mounted)  # the audit log is on the roomy filesystem, artifacts on the small
        try:
            with _http(srv) as http:
                body = {"policy": base_policy().model_dump(mode="json")}
                sid = http.post("/sandboxes", json=body).json()["sandbox_id"]
                filler = fill(artifacts)
                try:
                    r = http.post(f"/sandboxes/{sid}/commands",
                                  json={"cmd": "head -c 200000 /dev/zero | save-artifact big.bin"}).json()
                    assert r["exit_code"] != 0 and "could not store artifact 'big.bin'" in r["stderr"], r
                    small = http.post(f"/sandboxes/{sid}/commands",
                                      json={"cmd": "echo x | save-artifact small.txt"}).json()
                    assert small["exit_code"] != 0 and "could not store artifact" in small["stderr"], small
                    alive = http.post(f"/sandboxes/{sid}/commands", json={"cmd": "echo alive"}).json()
                    assert alive["stdout"] == "alive\n"
                    assert http.get(f"/sandboxes/{sid}").json()["state"] == "running"
                    left = os.listdir(artifacts / sid) if (artifacts / sid).exists() else []
                    assert not [n for n in left if n.startswith(".incoming")], left
                finally:
                    filler.unlink()
                    (artifacts / "filler2").unlink(missing_ok=True)
                ok = http.post(f"/sandboxes/{sid}/commands", json={"cmd": "echo y | save-artifact after.txt"}).json()
                assert ok["exit_code"] == 0, ok
                http.delete(f"/sandboxes/{sid}")
        finally:
            srv.stop()
