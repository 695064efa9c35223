"""MCP server benchmarks, each beside a baseline measured in the same run.

    python bench/bench_mcp.py [--runs 50] [--markdown]

- warm run_code("1+1") through `stockade mcp` over stdio (the official mcp client, the server a
  subprocess), against the SDK's own AsyncSandbox.run_code("1+1") in a sandbox of this process;
- the first run_code of a new MCP session (sandbox creation included; the session's handshake not),
  against a bare AsyncSandbox.create() + run_code("1+1").
Targets (issue 15): at most 5 ms over the SDK for the first, at most 100 ms over the bare pair for the second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import AsyncSandbox, Policy  # noqa: E402


def pct(samples: list[float], p: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(len(samples) * p))]


async def main_async(runs: int, policy: Policy, policy_file: Path) -> list[tuple[str, ...]]:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-m", "stockade.cli", "mcp", "--policy",
                                                                 str(policy_file)], env=dict(os.environ))
    rows = []
    # interleaved, so that machine noise (2 cores shared) falls on both alike
    mcp_warm, sdk_warm = [], []
    async with Client(params) as client, await AsyncSandbox.create(policy=policy) as sb:
        await client.call_tool("run_code", {"code": "1+1"})
        await sb.run_code("1+1")
        for _ in range(runs * 4):
            t = time.perf_counter()
            result = await client.call_tool("run_code", {"code": "1+1"})
            mcp_warm.append((time.perf_counter() - t) * 1000)
            assert not result.is_error
            t = time.perf_counter()
            await sb.run_code("1+1")
            sdk_warm.append((time.perf_counter() - t) * 1000)
    over = pct(mcp_warm, .5) - pct(sdk_warm, .5)
    rows.append(("warm run_code('1+1') over MCP stdio", f"{pct(mcp_warm, .5):.2f} ms", f"{pct(mcp_warm, .95):.2f} ms",
                 f"SDK run_code {pct(sdk_warm, .5):.2f} ms (+{over:.2f} ms; target <= 5)"))

    first_mcp, first_sdk = [], []
    for _ in range(max(8, runs // 4)):
        async with Client(params) as client:  # a new session: its sandbox starts on this first call
            t = time.perf_counter()
            result = await client.call_tool("run_code", {"code": "1+1"})
            first_mcp.append((time.perf_counter() - t) * 1000)
            assert not result.is_error
        t = time.perf_counter()
        sb = await AsyncSandbox.create(policy=policy)
        await sb.run_code("1+1")
        first_sdk.append((time.perf_counter() - t) * 1000)
        await sb.kill()
    over = pct(first_mcp, .5) - pct(first_sdk, .5)
    rows.append(("first run_code of a new MCP session (sandbox start)", f"{pct(first_mcp, .5):.0f} ms",
                 f"{pct(first_mcp, .95):.0f} ms",
                 f"AsyncSandbox.create + run_code {pct(first_sdk, .5):.0f} ms (+{over:.0f} ms; target <= 100)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    policy = bench_policy()
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-mcp-"))
    try:
        policy_file = tmp / "policy.json"
        policy_file.write_text(json.dumps(policy.model_dump(mode="json")))
        rows = asyncio.run(main_async(args.runs, policy, policy_file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(["measure", "p50", "p95", "baseline (same run)"], rows, args.markdown)


if __name__ == "__main__":
    main()
