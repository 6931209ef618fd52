"""One server's approved tool set on this replica: from its lock file, or pinned in the store (tofu).

A lock file, when present, is authoritative in every mode.  Without one,
``tofu`` and ``warn`` pin the first complete tool set seen in the shared
store (``pins:<server>``, written with set-if-absent so concurrent replicas
agree on one first state); ``enforce`` without a lock file approves nothing.

The lock file is re-read when its mtime or size changes (checked at most every
``LOCK_CHECK_INTERVAL`` seconds on calls, on every list); an invalid new
version is refused and the previous one stays in force.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable

import orjson
import structlog

from ..errors import Problem
from .lockfile import Approved, load_lock, lock_path
from .pin_signals import Signals
from .pinning import Inspector
from .pinning_config import PinningConfig

log = structlog.get_logger("gateway.pinning")
LOCK_CHECK_INTERVAL = 1.0
TOFU_VERSION = 1

Fetch = Callable[[Any], Awaitable[list[dict[str, Any]]]]


def tofu_key(server: str) -> str:
    return f"pins:{server}"


def tofu_document(tools: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"version": TOFU_VERSION, "pinned_at": int(time.time()), "tools": tools})


def parse_tofu(server: str, raw: bytes, ignore: frozenset[str]) -> Approved:
    doc = orjson.loads(raw)
    tools = doc.get("tools") if isinstance(doc, dict) else None
    if not isinstance(tools, list):
        raise ValueError("tofu pin without a tools list")
    return Approved.from_definitions(server, "tofu", [t for t in tools if isinstance(t, dict)], ignore)


class ServerPins:
    def __init__(self, name: str, cfg: PinningConfig, pins_dir: str, signals: Signals) -> None:
        self.name = name
        self.cfg = cfg
        self.signals = signals
        self.inspector = Inspector(cfg.rules, cfg.ignore_fields)
        self.lock_path = lock_path(pins_dir, name, cfg.lock_file)
        self.lock: Approved | None = None
        self.tofu: Approved | None = None
        self.version = 0                      # bumped whenever the approved set changes
        self.era: str | None = None           # which protocol era the side fetch found to work
        self._lock_stat: tuple[int, int] | None = None
        self._lock_checked = 0.0
        self._pinning: asyncio.Future[None] | None = None
        self.pages: dict[bytes, Any] = {}     # page memo of the pinning stage (exact page -> judgement)

    @property
    def approved(self) -> Approved | None:
        return self.lock if self.lock is not None else self.tofu

    @property
    def settled(self) -> bool:
        """Whether ``ensure`` has nothing to do (an approved set, or enforce mode)."""
        return self.lock is not None or self.tofu is not None or self.cfg.mode == "enforce"

    @property
    def holding(self) -> bool:
        return self.cfg.mode in ("enforce", "tofu")

    # -- lock file --------------------------------------------------------------

    def check_lock(self, *, force: bool = False, now: float | None = None) -> list[Problem]:
        """Reload the lock file if it changed; returns the problems of a refused new version."""
        now = time.monotonic() if now is None else now
        if not force and now - self._lock_checked < LOCK_CHECK_INTERVAL:
            return []
        self._lock_checked = now
        try:
            st = os.stat(self.lock_path)
            stat: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stat = None
        if stat == self._lock_stat:
            return []
        if stat is None:
            if self.lock is not None:
                log.warning("pins.lock_removed", server=self.name, path=self.lock_path)
            self.lock, self._lock_stat = None, None
            self.version += 1
            return []
        approved, problems = load_lock(self.lock_path, self.name, self.cfg.ignore_fields)
        if problems:
            # Keep what was in force: a broken edit must not open (or close) the gate.
            for p in problems:
                log.error("pins.lock_invalid", server=self.name, problem=str(p))
            self._lock_stat = stat
            return problems
        self.lock, self._lock_stat = approved, stat
        self.version += 1
        assert approved is not None
        log.info("pins.lock_loaded", server=self.name, path=self.lock_path, tools=len(approved.tools),
                 tool_set=approved.tool_set)
        return []

    # -- tofu ---------------------------------------------------------------------

    async def ensure(self, store: Any, fetch: Fetch, ex: Any) -> None:
        """Make sure an approved set exists when the mode pins on first sight.

        Raises what ``store`` or ``fetch`` raise; concurrent callers share one attempt.
        """
        if self.settled:
            return
        if self._pinning is None:
            self._pinning = asyncio.ensure_future(self._establish(store, fetch, ex))
        pinning = self._pinning
        try:
            await asyncio.shield(pinning)
        finally:
            if pinning.done() and self._pinning is pinning:
                self._pinning = None

    async def _establish(self, store: Any, fetch: Fetch, ex: Any) -> None:
        key = tofu_key(self.name)
        raw = await store.get(key)
        if raw is None:
            tools = await fetch(ex)
            doc = tofu_document(tools)
            if await store.set_if_absent(key, doc):
                raw = doc
                approved = parse_tofu(self.name, raw, self.cfg.ignore_fields)
                self.signals.pinned(self.name, len(approved.tools), approved.tool_set)
            else:
                raw = await store.get(key)   # another replica pinned first: theirs is the first state
        if raw is None:
            raise RuntimeError("the tofu pin vanished while it was being read")
        self.tofu = parse_tofu(self.name, raw, self.cfg.ignore_fields)
        self.version += 1

    def forget_tofu(self) -> None:
        """The store's pin was reset (``mcp-gateway pins reset``): read it again next time."""
        self.tofu = None
        self.version += 1
