"""Code contexts: long-lived interpreters inside a sandbox, and cells run in them."""

from __future__ import annotations

import asyncio
import builtins
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import FilesystemError, PolicyError, SandboxNotFoundError, SandboxUnavailableError
from ..runtime.channel import CellPending
from .commands import Commands
from .sandboxes import CodeContext, ManagedSandbox, check_envs

LANGUAGES = ("python", "bash", "javascript")
CONTEXT_START_TIMEOUT = 60.0


class Contexts(Commands):
    """Code contexts: stateful interpreters and the cells run in them."""

    def _context(self, sb: ManagedSandbox, context_id: str) -> CodeContext:
        ctx = sb.contexts.get(context_id)
        if ctx is None:
            raise SandboxNotFoundError(f"code context {context_id!r} does not exist in sandbox {sb.id}")
        return ctx

    async def create_context(self, sandbox_id: str, language: str = "python", cwd: str | None = None,
                             context_id: str | None = None) -> CodeContext:
        sb = self.get(sandbox_id)
        if language not in LANGUAGES:
            raise PolicyError("language", f"unsupported language {language!r}; supported: {', '.join(LANGUAGES)}")
        ctx = CodeContext(context_id or "ctx-" + secrets.token_hex(6), language, cwd or sb.layout.home)
        sb.contexts[ctx.id] = ctx
        async with ctx.lock:
            await self._start_context(sb, ctx)
        return ctx

    async def _start_context(self, sb: ManagedSandbox, ctx: CodeContext) -> None:
        pending = CellPending(sb.policy.limits.output)
        sb.runtime.agent.ctx_start(pending, ctx.id, language=ctx.language, cwd=ctx.cwd, python=sb.runtime.python,
                                   script=sb.runtime.python_script, limit=sb.policy.limits.output,
                                   timeout=CONTEXT_START_TIMEOUT)
        try:
            ready = await asyncio.wait_for(asyncio.shield(pending.done), CONTEXT_START_TIMEOUT + 5)
        except FilesystemError as exc:
            hint = " (javascript contexts need node under /usr on the host)" if ctx.language == "javascript" else ""
            raise SandboxUnavailableError(f"cannot start a {ctx.language} context: {exc}{hint}") from None
        if ready.get("ev") == "cell_done":  # it died while starting
            err = pending.output["stderr"].decode("utf-8", "replace")[-2000:]
            raise SandboxUnavailableError(f"the {ctx.language} interpreter did not start: {err.strip()}")
        ctx.backend = str(ready.get("backend", ""))[:40]
        ctx.alive = True

    async def run_code(self, sandbox_id: str, code: str, *, language: str = "python", context_id: str | None = None,
                       envs: Mapping[str, str] | None = None, timeout: float | None = None,
                       on_output: Callable[[str, bytes], None] | None = None,
                       on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], CellPending]:
        self.check_cell(sandbox_id, code, language=language, context_id=context_id, timeout=timeout)
        sb = self.get(sandbox_id)
        if context_id is None:
            context_id = f"default-{language}"
            if context_id not in sb.contexts:
                await self.create_context(sandbox_id, language, context_id=context_id)
        ctx = self._context(sb, context_id)
        limit = self._command_timeout(sb, timeout, background=False)
        async with ctx.lock:
            if not ctx.alive:
                await self._start_context(sb, ctx)
            pending = CellPending(sb.policy.limits.output, on_output, on_event)
            oom_before = sb.runtime.oom_kills()
            env = check_envs(envs)
            self._record(sb, "code.run", {"context": ctx.id, "language": ctx.language, "code": code,
                                          "env_names": sorted(env)})
            started = time.monotonic()
            sb.busy += 1
            try:
                sb.runtime.agent.ctx_run(pending, ctx.id, code, env=env, timeout=limit, limit=sb.policy.limits.output)
                done = await asyncio.wait_for(asyncio.shield(pending.done), (limit or 0) + 10 if limit else None)
            finally:
                sb.busy -= 1
                sb.last_active = self.loop.time()
            hit = self._cell_limit_hit(sb, done, limit, oom_before)
            if hit is not None:  # said last, so it is the Execution's error
                pending.events.append(hit)
                if on_event is not None:
                    on_event(hit)
            errors = [e for e in pending.events if e.get("type") == "error"][-1:]
            self._record(sb, "code.end", {"context": ctx.id, "execution_count": done.get("execution_count"),
                                          "timed_out": bool(done.get("timed_out")),
                                          "duration": round(time.monotonic() - started, 6),
                                          "error": errors[0] if errors else None,
                                          **self._recorded_output(sb, pending)})
            if done.get("restarted"):
                ctx.alive = False
            return done, pending

    def check_cell(self, sandbox_id: str, code: str, *, language: str = "python", context_id: str | None = None,
                   timeout: float | None = None) -> None:
        """Refuse, before anything runs, what run_code would refuse at once: an unknown sandbox or context,
        code that is not a string, an unknown language, a timeout the policy does not allow. (A front end
        answers these as errors, and streams only a cell that starts.)"""
        sb = self.get(sandbox_id)
        if not isinstance(code, str):
            raise PolicyError("code", "must be a string")
        if context_id is None:
            if language not in LANGUAGES:
                raise PolicyError("language", f"unsupported language {language!r}; supported: {', '.join(LANGUAGES)}")
        else:
            self._context(sb, context_id)
        self._command_timeout(sb, timeout, background=False)

    async def restart_context(self, sandbox_id: str, context_id: str) -> CodeContext:
        sb = self.get(sandbox_id)
        ctx = self._context(sb, context_id)
        await self._stop_context(sb, ctx)
        async with ctx.lock:
            await self._start_context(sb, ctx)
        return ctx

    async def remove_context(self, sandbox_id: str, context_id: str) -> None:
        sb = self.get(sandbox_id)
        ctx = self._context(sb, context_id)
        await self._stop_context(sb, ctx)
        del sb.contexts[context_id]

    async def _stop_context(self, sb: ManagedSandbox, ctx: CodeContext) -> None:
        await sb.runtime.agent.ctx_stop(ctx.id)
        async with ctx.lock:  # a running cell ends (killed) before the context is reused
            ctx.alive = False
        # the agent forgets the context when it reaps the process; wait for that before a restart
        for _ in range(200):
            procs = await sb.runtime.agent.ctx_list()
            if ctx.id not in procs.get("contexts", []):
                return
            await asyncio.sleep(0.01)

    def list_contexts(self, sandbox_id: str) -> builtins.list[CodeContext]:
        return builtins.list(self.get(sandbox_id).contexts.values())

