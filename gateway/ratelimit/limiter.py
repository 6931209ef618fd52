"""Checking and charging limits: GCRA windows and concurrency leases, in memory or in Redis.

Both stores give the same answer for the same sequence of calls: every limit
that applies to a request is checked first and charged only if all admit it
(all or nothing), rates by GCRA (``model.Window``), concurrency by leases that
are released when the exchange ends and expire by themselves if a replica dies
holding them.

``RedisLimiter`` is exact across replicas: one Lua script, loaded once and
called by SHA, checks and charges atomically with Redis's clock (``TIME``), and
every request arriving in the same event-loop turn goes in the same call (one
round trip for a whole burst).  All keys share one hash tag, so the script's
keys are in one Cluster slot.  A failing Redis opens a circuit: for
``breaker`` seconds checks fail at once (each limit then applies its
``on_store_error``), a background probe closes it again.
"""
from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from .model import Limit, Window

log = structlog.get_logger("gateway.ratelimit")
LEASE_SECONDS = 600.0
_MAX_INFLIGHT = 1          # script calls out at once per replica; the rest batch behind them      # a concurrency slot held longer than this is freed (a dead replica's)


class LimitStoreError(Exception):
    """The limit store could not answer (down, slow, circuit open)."""


@dataclass(slots=True)
class Verdict:
    allowed: bool
    limit: Limit | None = None           # the limit that refused
    retry_after: float = 0.0             # seconds until the refused call would be admitted
    remaining: int = 0                   # of the refusing (or tightest) window
    window: Window | None = None
    leases: list[tuple[str, str]] = field(default_factory=list)   # (key, lease id) to release


Check = tuple[Limit, str]                # a limit and its resolved key value


def gcra(tat: float, now: float, w: Window, cost: int) -> tuple[bool, float, float, int]:
    """(allowed, new theoretical arrival time, retry after, remaining) for one window."""
    tat = max(tat, now)
    new_tat = tat + cost * w.interval
    ahead = new_tat - now
    if ahead > w.tolerance + 1e-9:
        return False, tat, ahead - w.tolerance, 0
    return True, new_tat, 0.0, int((w.tolerance - ahead) / w.interval + 1e-9)


class MemoryLimiter:
    """One process.  ``clock`` is injectable (tests control time)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}

    def check(self, checks: list[Check]) -> Verdict:
        now = self._clock()
        updates: list[tuple[str, float]] = []
        best: Verdict | None = None
        for limit, key in checks:
            for i, w in enumerate(limit.windows):
                k = f"{limit.id}|{i}|{key}"
                ok, new_tat, retry, remaining = gcra(self._tat.get(k, now), now, w, limit.cost)
                if not ok:
                    return Verdict(False, limit, retry, 0, w)
                updates.append((k, new_tat))
                if best is None or remaining < best.remaining:
                    best = Verdict(True, limit, 0.0, remaining, w)
            if limit.concurrency is not None:
                held = self._leases.get(f"{limit.id}|c|{key}", {})
                live = sum(1 for expiry in held.values() if expiry > now)
                if live >= limit.concurrency:
                    return Verdict(False, limit, 1.0, 0, None)
        verdict = best or Verdict(True)
        for k, new_tat in updates:
            self._tat[k] = new_tat
        for limit, key in checks:
            if limit.concurrency is not None:
                k = f"{limit.id}|c|{key}"
                held = self._leases.setdefault(k, {})
                for lid in [lid for lid, expiry in held.items() if expiry <= now]:
                    del held[lid]
                lease = secrets.token_hex(8)
                held[lease] = now + LEASE_SECONDS
                verdict.leases.append((k, lease))
        if len(self._tat) > 100_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}     # past TATs equal a fresh key
        return verdict

    def release(self, leases: list[tuple[str, str]]) -> None:
        for key, lease in leases:
            held = self._leases.get(key)
            if held is not None:
                held.pop(lease, None)
                if not held:
                    del self._leases[key]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# -- Redis -------------------------------------------------------------------------------

# KEYS: every key the batch uses.  ARGV[1]: now override in microseconds ("" = Redis TIME),
# ARGV[2]: lease seconds, then per request: n, then n checks of
#   "r" key# interval_us tolerance_us cost   |   "c" key# cap lease_id
# Returns per request {allowed, failed_check#, retry_us, remaining}.
_SCRIPT = """
local now
if ARGV[1] ~= '' then now = tonumber(ARGV[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local lease_us = tonumber(ARGV[2]) * 1000000
local out = {}
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i]); i = i + 1
  local first = i
  local ok, failed, retry, remaining = 1, 0, 0, -1
  local writes = {}
  for c = 1, n do
    local kind = ARGV[i]; local key = KEYS[tonumber(ARGV[i + 1])]
    if kind == 'r' then
      local interval = tonumber(ARGV[i + 2]); local tol = tonumber(ARGV[i + 3]); local cost = tonumber(ARGV[i + 4])
      local tat = tonumber(redis.call('GET', key) or '0')
      if tat < now then tat = now end
      local new_tat = tat + cost * interval
      local ahead = new_tat - now
      if ahead > tol then
        if ok == 1 then ok = 0; failed = c; retry = ahead - tol; remaining = 0 end
      else
        local left = math.floor((tol - ahead) / interval)
        if remaining < 0 or left < remaining then remaining = left end
        writes[#writes + 1] = {'r', key, new_tat, math.ceil((new_tat - now) / 1000) + 1000}
      end
      i = i + 5
    else
      local cap = tonumber(ARGV[i + 2]); local lease = ARGV[i + 3]
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      if redis.call('ZCARD', key) >= cap then
        if ok == 1 then ok = 0; failed = c; retry = 1000000; remaining = 0 end
      else
        writes[#writes + 1] = {'c', key, lease}
      end
      i = i + 4
    end
  end
  if ok == 1 then
    for _, w in ipairs(writes) do
      if w[1] == 'r' then redis.call('SET', w[2], w[3], 'PX', w[4])
      else redis.call('ZADD', w[2], now + lease_us, w[3]); redis.call('PEXPIRE', w[2], math.ceil(lease_us / 1000)) end
    end
  end
  out[#out + 1] = {ok, failed, math.ceil(retry), remaining}
end
return out
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str, *, timeout: float = 0.25, breaker: float = 1.0) -> None:
        self._url = url
        self._tag = "{" + prefix + "rl}"      # one hash tag: every key of a call in one Cluster slot
        self._timeout = timeout
        self._breaker = breaker
        self._client: Any = None
        self._sha: str | None = None
        self._pending: list[tuple[list[Check], asyncio.Future[Verdict]]] = []
        self._scheduled = False
        self._inflight = 0
        self._templates: dict[tuple[Limit, str], list[tuple[str, str, tuple[int, ...], Window | None]]] = {}
        self._down_until = 0.0
        self._probe: asyncio.Task[None] | None = None
        self.now_override: float | None = None    # tests: a controlled clock (seconds)
        self.errors = 0

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(self._url, socket_connect_timeout=self._timeout,
                                         socket_timeout=self._timeout, decode_responses=False)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._client is not None:
            await self._client.aclose()

    # -- checks -----------------------------------------------------------------------

    def check(self, checks: list[Check]) -> "asyncio.Future[Verdict]":
        """A future verdict; every check of this event-loop turn goes in one script call."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Verdict] = loop.create_future()
        if time.monotonic() < self._down_until:
            fut.set_exception(LimitStoreError("limit store unavailable (circuit open)"))
            return fut
        self._pending.append((checks, fut))
        if not self._scheduled and self._inflight < _MAX_INFLIGHT:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """Send what is pending as one script call.  While ``_MAX_INFLIGHT`` calls are out,
        requests accumulate and go together when one returns: under load a call carries
        many requests (one round trip for all), when idle each goes at once."""
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            self._inflight += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    def _done(self) -> None:
        self._inflight -= 1
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _run(self, batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]]) -> None:
        try:
            await self._run_batch(batch)
        finally:
            self._done()

    async def _run_batch(self, batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]]) -> None:
        keys: dict[str, int] = {}
        now = "" if self.now_override is None else str(int(self.now_override * 1_000_000))
        args: list[Any] = [now, LEASE_SECONDS]
        plans: list[list[tuple[Limit, Window | None, str, str | None]]] = []
        for checks, _ in batch:
            plan: list[tuple[Limit, Window | None, str, str | None]] = []
            items: list[Any] = []
            for limit, key in checks:
                for kind, k, params, w in self._template(limit, key):
                    if kind == "r":
                        items += ["r", keys.setdefault(k, len(keys) + 1), *params]
                        plan.append((limit, w, k, None))
                    else:
                        lease = secrets.token_hex(8)
                        items += ["c", keys.setdefault(k, len(keys) + 1), params[0], lease]
                        plan.append((limit, None, k, lease))
            args.append(len(plan))
            args += items
            plans.append(plan)
        try:
            # The client's socket timeout (``timeout``) bounds the wait: no wait_for task per call.
            results = await self._eval(list(keys), args)
        except Exception as exc:      # redis errors, timeouts, a closed connection: all the same here
            self._trip(exc)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(LimitStoreError("limit store unavailable"))
            return
        for (checks, fut), plan, (ok, failed, retry_us, remaining) in zip(batch, plans, results):
            if fut.done():
                continue
            if ok:
                verdict = Verdict(True, remaining=int(remaining) if remaining >= 0 else 0)
                verdict.leases = [(k, lease) for _, _, k, lease in plan if lease is not None]
            else:
                limit, w, _, _ = plan[int(failed) - 1]
                verdict = Verdict(False, limit, int(retry_us) / 1e6, 0, w)
            fut.set_result(verdict)

    def _template(self, limit: Limit, key: str) -> list[tuple[str, str, tuple[int, ...], Window | None]]:
        """The Redis keys and script arguments of one limit for one key value (memoised: the
        same callers and limits repeat)."""
        memo_key = (limit, key)
        found = self._templates.get(memo_key)
        if found is None:
            found = [("r", f"{self._tag}:{limit.id}:{i}:{key}",
                      (int(w.interval * 1e6), int(w.tolerance * 1e6), limit.cost), w)
                     for i, w in enumerate(limit.windows)]
            if limit.concurrency is not None:
                found.append(("c", f"{self._tag}:{limit.id}:c:{key}", (limit.concurrency,), None))
            if len(self._templates) >= 65536:
                self._templates.clear()
            self._templates[memo_key] = found
        return found

    async def _eval(self, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        if self._sha is None:
            self._sha = await self._client.script_load(_SCRIPT)
        try:
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:          # Redis restarted or flushed its scripts
            self._sha = await self._client.script_load(_SCRIPT)
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)

    def _trip(self, exc: BaseException) -> None:
        self.errors += 1
        self._down_until = time.monotonic() + self._breaker
        log.warning("ratelimit.store_error", error=type(exc).__name__, retry_in_seconds=self._breaker)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(self._breaker)
            try:
                await asyncio.wait_for(self._client.ping(), self._timeout)
            except Exception:
                self._down_until = time.monotonic() + self._breaker
                continue
            self._down_until = 0.0
            log.info("ratelimit.store_recovered")
            return

    def release(self, leases: list[tuple[str, str]]) -> "asyncio.Task[None] | None":
        """Give leases back (a task: the exchange that ends does not wait for Redis)."""
        if leases and self._client is not None:
            return asyncio.get_running_loop().create_task(self._release(leases))
        return None

    async def _release(self, leases: list[tuple[str, str]]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, lease in leases:
                pipe.zrem(key, lease)
            await asyncio.wait_for(pipe.execute(), self._timeout)
        except Exception as exc:   # the lease expires by itself (LEASE_SECONDS)
            log.warning("ratelimit.release_failed", error=type(exc).__name__)


def retry_seconds(verdict: Verdict) -> int:
    return max(1, math.ceil(verdict.retry_after))


def make_limiter(store: Any) -> "MemoryLimiter | RedisLimiter":
    """The limiter for the configured store: exact across replicas with Redis."""
    if store.kind == "redis":
        return RedisLimiter(store.url, store.prefix, timeout=store.limit_timeout)
    return MemoryLimiter()
