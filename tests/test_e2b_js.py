"""The official E2B JavaScript SDKs (npm ``e2b`` and ``@e2b/code-interpreter``, pinned in
tests/e2b_js/package.json; .ci/run installs them) against a live ``stockade serve``: the cookbook's basic
code-interpreter flow, configured only by E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .server_support import RunningServer

JS = Path(__file__).parent / "e2b_js"


def _node() -> str | None:
    node = os.environ.get("STOCKADE_TEST_NODE") or shutil.which("node")
    if node is None:
        return None
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True,
                                 timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # not runnable by this user: treated as absent
        return None
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    return node if (major, minor) >= (20, 18) else None


NODE = _node()
pytestmark = pytest.mark.skipif(
    NODE is None or not (JS / "node_modules" / "@e2b" / "code-interpreter").is_dir(),
    reason="needs node >= 20.18 and `npm ci` in tests/e2b_js (.ci/run does both)")


def test_js_sdk_basic_flow() -> None:
    from .conftest import base_policy

    server = RunningServer(e2b_policy=base_policy(network={"expose": [8000]}).model_dump(mode="json"))
    try:
        env = {**os.environ, "E2B_API_URL": server.url + "/e2b", "E2B_SANDBOX_URL": server.url + "/e2b/sandbox",
               "E2B_API_KEY": server.key("js")}
        run = subprocess.run([str(NODE), "flow.mjs"], cwd=JS, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        manager = server.server.manager
        server.stop()
    assert manager is not None and not manager.sandboxes
    assert out["running"] is True and out["runningAfterKill"] is False
    assert out["command"] == {"stdout": "one\n", "stderr": "two\n", "exitCode": 0, "streamed": "one\n"}
    assert out["failed"] == {"isCommandExit": True, "exitCode": 3}
    assert out["killed"] is True
    assert out["read"] == "from js" and "js.txt" in out["list"] and out["exists"] == [True, False]
    assert out["code"] == {"text": "42", "stdout": ["hi\n"]} and out["error"] == "ZeroDivisionError"
    assert out["bash"] == ["5\n"] and out["listed"] == [out["id"]]
    assert out["unknown"] == "SandboxNotFoundError"
    assert out["ptyBefore"] == [True, True] and out["ptyResized"] is True
    assert out["ptyKilled"] is True and out["ptyKilledAgain"] is False
    assert out["ptyEnd"] == {"isCommandExit": True, "exitCode": -1}
    assert out["timeout"] == "TimeoutError" and out["watched"] == [["w.txt", "create"]]
    assert out["multi"] == ["m1", "m2"] and out["signed"] == "m1"
    assert out["getHost"] == {"host": f"8000-{out['id']}.{server.url.removeprefix('http://')}", "status": 200,
                              "listing": True, "withoutToken": 502}
