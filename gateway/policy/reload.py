"""Hot reload: an atomic holder and a watcher that rebuilds the set aside.

The ``PolicyHolder`` holds one immutable ``PolicySet``; a request reads
``holder.current`` once and uses that object for its whole life (call decision
and list-filter hooks alike), so in-flight requests finish under the set they
started with.  Swapping is a single attribute assignment.

The ``PolicyWatcher`` polls the policy files' stat signature (no inotify in
the standard library; a stat of a small directory costs microseconds) and
wakes at once on SIGHUP.  A change is read, hashed and built in a worker
thread; a set with problems is refused: the old one stays, every problem is
logged, and ``mcpgw_config_reloads_total{what="policies",result="failed"}``
counts it.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Callable, Iterable

import structlog

from ..errors import Problem
from ..telemetry.metrics import CONFIG_RELOADS
from .load import Sources, build, policy_files, read_sources
from .model import PolicySet
from .metrics import POLICY_GENERATION, POLICY_LAST_RELOAD, POLICY_RULES

log = structlog.get_logger("gateway.policy")
DEFAULT_INTERVAL = 0.5   # seconds between stat polls: a change applies well within 2 s


class PolicyHolder:
    """The current policy set; swapped whole, never mutated."""

    __slots__ = ("_current", "generation")

    def __init__(self, initial: PolicySet) -> None:
        self._current = initial
        self.generation = 1
        POLICY_GENERATION.set(1)
        POLICY_RULES.set(initial.rule_count)
        POLICY_LAST_RELOAD.set(time.time())     # the initial load counts: 0 would read as "never"

    @property
    def current(self) -> PolicySet:
        return self._current

    def swap(self, new: PolicySet) -> int:
        self._current = new
        self.generation += 1
        POLICY_GENERATION.set(self.generation)
        POLICY_RULES.set(new.rule_count)
        POLICY_LAST_RELOAD.set(time.time())
        return self.generation


class PolicyWatcher:
    """Reloads ``root`` into ``holder`` on file change and on SIGHUP."""

    def __init__(self, holder: PolicyHolder, root: str, known_servers: Iterable[str] | None,
                 *, interval: float = DEFAULT_INTERVAL,
                 on_result: Callable[[bool, list[Problem]], None] | None = None) -> None:
        self.holder = holder
        self.root = root
        self.known_servers = tuple(known_servers) if known_servers is not None else None
        self.interval = interval
        self.on_result = on_result
        self.attempts = 0
        self.failures = 0
        self.last_problems: list[Problem] = []
        self._signature = self._stat()
        self._digest = holder.current.digest
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attempted = asyncio.Condition()
        self._sighup = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, sighup: bool = True) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="policy-watcher")
        if sighup:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_reload)
                self._sighup = True
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals on this platform: polling still works

    async def close(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def request_reload(self) -> None:
        """SIGHUP: rebuild now, even if no file looks changed."""
        self._digest = ""
        self._signature = None
        self._wake.set()

    async def wait_attempts(self, count: int, timeout: float) -> None:
        """Wait until ``attempts`` reaches ``count`` (tests and tooling: no sleeps)."""
        async with self._attempted:
            await asyncio.wait_for(self._attempted.wait_for(lambda: self.attempts >= count), timeout)

    # -- the loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:   # the watcher must survive anything; the old set stays in force
                log.exception("policy.reload_crashed")

    def _stat(self) -> tuple | None:
        try:
            paths = policy_files(self.root)
            sig = []
            for path in paths:
                st = os.stat(path)
                sig.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            return tuple(sig)
        except OSError:
            return None

    async def check_once(self) -> bool | None:
        """Reload if the files changed; returns True (swapped), False (refused) or None (no change)."""
        signature = await asyncio.to_thread(self._stat)
        if signature is not None and signature == self._signature:
            return None
        self._signature = signature
        sources, problems = await asyncio.to_thread(read_sources, self.root)
        if sources is not None and not problems and sources.digest == self._digest:
            return None   # touched but identical (e.g. `git checkout` of the same content)
        new, problems = (None, problems) if sources is None or problems else \
            await asyncio.to_thread(build, sources, self.known_servers)
        return await self._finish(sources, new, problems)

    async def _finish(self, sources: Sources | None, new: PolicySet | None, problems: list[Problem]) -> bool:
        ok = new is not None
        if sources is not None:
            self._digest = sources.digest   # don't retry the same broken content every poll
        if ok:
            generation = self.holder.swap(new)
            CONFIG_RELOADS.labels("policies", "ok").inc()
            log.info("policy.reloaded", generation=generation, rules=new.rule_count,
                     files=len(new.files), digest=new.digest[:12])
        else:
            self.failures += 1
            CONFIG_RELOADS.labels("policies", "failed").inc()
            log.error("policy.reload_failed", problems=[str(p) for p in problems[:50]],
                      count=len(problems), kept_generation=self.holder.generation,
                      detail="the previous policy set stays in force")
        self.last_problems = problems
        if self.on_result is not None:
            self.on_result(ok, problems)
        async with self._attempted:
            self.attempts += 1
            self._attempted.notify_all()
        return ok
