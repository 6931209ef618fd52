"""Checking and charging limits: GCRA windows and concurrency leases, in memory or in Redis.

Both stores give the same answer for the same sequence of calls: every limit
that applies to a request is checked first and charged only if all admit it
(all or nothing), rates by GCRA (``model.Window``), concurrency by leases that
are released when the exchange ends.  A lease lives ``lease_ttl`` seconds and its
holder renews it every third of that while the exchange runs, so a call may hold
its slot as long as it lasts, while the slots of a replica that died come back
within ``lease_ttl``.

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
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from .model import Limit, Window
from ..telemetry.metrics import BOUND, STORE_ERRORS
from .resp import RespClient, RespError, RespReplyError

log = structlog.get_logger("gateway.ratelimit")
LEASE_TTL = 30.0           # default: a slot not renewed for this long is free again (a dead replica's)
_MAX_INFLIGHT = 1          # script calls out at once per replica; the rest batch behind them


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

    def __init__(self, clock: Callable[[], float] = time.monotonic, lease_ttl: float = LEASE_TTL) -> None:
        self._clock = clock
        self._ttl = lease_ttl
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._renewer = _Renewer(lease_ttl, self.renew)

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
                lease = _lease_id()
                held[lease] = now + self._ttl
                verdict.leases.append((k, lease))
                self._renewer.hold(k, lease)
        if len(self._tat) > 100_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}     # past TATs equal a fresh key
        return verdict

    def release(self, leases: list[tuple[str, str]]) -> None:
        for key, lease in leases:
            self._renewer.drop(key, lease)
            held = self._leases.get(key)
            if held is not None:
                held.pop(lease, None)
                if not held:
                    del self._leases[key]

    async def renew(self, leases: list[tuple[str, str]]) -> None:
        expiry = self._clock() + self._ttl
        for key, lease in leases:
            held = self._leases.get(key)
            if held is not None and lease in held:
                held[lease] = expiry

    async def start(self) -> None:
        self._renewer.start()

    async def close(self) -> None:
        self._renewer.stop()


class _Renewer:
    """Renews the leases this process holds, every third of their time to live."""

    def __init__(self, ttl: float, renew: Callable[[list[tuple[str, str]]], Any]) -> None:
        self._ttl = ttl
        self._renew = renew
        self._held: dict[tuple[str, str], None] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, key: str, lease: str) -> None:
        self._held[(key, lease)] = None

    def drop(self, key: str, lease: str) -> None:
        self._held.pop((key, lease), None)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            if self._held:
                try:
                    await self._renew(list(self._held))
                except Exception as exc:      # the next round tries again; a lapse frees the slot
                    log.warning("ratelimit.renew_failed", error=type(exc).__name__)


# -- Redis -------------------------------------------------------------------------------

def _new_lease_ids() -> Any:
    return map((os.urandom(6).hex() + "-").__add__, map(str, itertools.count(1)))


_LEASE_IDS = _new_lease_ids()


def _lease_id() -> str:
    """A lease id unique across processes (a random prefix per process, drawn again in a
    forked worker, and a counter): leases are never shown to clients, so they need
    uniqueness, not a CSPRNG call each."""
    return next(_LEASE_IDS)


def _after_fork() -> None:
    global _LEASE_IDS
    _LEASE_IDS = _new_lease_ids()


os.register_at_fork(after_in_child=_after_fork)


# KEYS: every key the batch uses.  ARGV[1]: one string of space-separated fields: now
# override in microseconds ("-" = Redis TIME), lease seconds, D, the number of rate windows the batch uses, then D
# descriptors "key# interval_us tolerance_us cost", then per request: n, then n checks, each
# either a descriptor # (a rate window) or "c key# cap lease_id" (a concurrency cap).
# Returns, flat, four numbers per request: allowed, failed_check#, retry_us, remaining.  A window repeated in a
# batch (the same caller, a global limit) is described once, read once and written once.
_SCRIPT = """
local A, nargs = {}, 0
for tok in string.gmatch(ARGV[1], '%S+') do nargs = nargs + 1; A[nargs] = tok end
local now
if A[1] ~= '-' then now = tonumber(A[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local lease_us = tonumber(A[2]) * 1000000
local d = tonumber(A[3])
local wk, wint, wtol, wcost, tats, dirty = {}, {}, {}, {}, {}, {}
for j = 1, d do
  local b = 4 * j
  wk[j] = tonumber(A[b]); wint[j] = tonumber(A[b + 1]); wtol[j] = tonumber(A[b + 2]); wcost[j] = tonumber(A[b + 3])
end
local out = {}
local pk, pt = {}, {}        -- this request's pending window writes (key#, new TAT), reused
local i = 4 * d + 4
while i <= nargs do
  local n = tonumber(A[i]); i = i + 1
  local ok, failed, retry, remaining, np = 1, 0, 0, -1, 0
  local leases = nil
  for c = 1, n do
    local a = A[i]
    if a ~= 'c' then
      local j = tonumber(a); local k = wk[j]; local interval = wint[j]
      local tat = tats[k]
      if tat == nil then tat = tonumber(redis.call('GET', KEYS[k]) or '0'); tats[k] = tat end
      if tat < now then tat = now end
      local new_tat = tat + wcost[j] * interval
      local ahead = new_tat - now
      local tol = wtol[j]
      if ahead > tol then
        if ok == 1 then ok = 0; failed = c; retry = ahead - tol; remaining = 0 end
      elseif ok == 1 then
        local left = math.floor((tol - ahead) / interval)
        if remaining < 0 or left < remaining then remaining = left end
        np = np + 1; pk[np] = k; pt[np] = new_tat
      end
      i = i + 1
    else
      local key = KEYS[tonumber(A[i + 1])]
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      if redis.call('ZCARD', key) >= tonumber(A[i + 2]) then
        if ok == 1 then ok = 0; failed = c; retry = 1000000; remaining = 0 end
      elseif ok == 1 then
        leases = leases or {}
        leases[#leases + 1] = key; leases[#leases + 1] = A[i + 3]
      end
      i = i + 4
    end
  end
  if ok == 1 then
    for p = 1, np do tats[pk[p]] = pt[p]; dirty[pk[p]] = true end
    if leases then
      for p = 1, #leases, 2 do
        redis.call('ZADD', leases[p], now + lease_us, leases[p + 1])
        redis.call('PEXPIRE', leases[p], math.ceil(lease_us / 1000))
      end
    end
  end
  local o = #out
  out[o + 1] = ok; out[o + 2] = failed; out[o + 3] = math.ceil(retry); out[o + 4] = remaining
end
for k in pairs(dirty) do
  local tat = tats[k]
  redis.call('SET', KEYS[k], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return out
"""

# Renewal: KEYS the lease keys; ARGV[1] now override ("" = TIME), ARGV[2] lease seconds, then
# pairs "key# lease_id".  XX: a lease already expired (and so maybe taken) is not revived.
_RENEW = """
local now
if ARGV[1] ~= '' then now = tonumber(ARGV[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local lease_us = tonumber(ARGV[2]) * 1000000
for i = 3, #ARGV, 2 do
  local key = KEYS[tonumber(ARGV[i])]
  local score = redis.call('ZSCORE', key, ARGV[i + 1])
  if score and tonumber(score) > now then
    redis.call('ZADD', key, 'XX', now + lease_us, ARGV[i + 1])
    redis.call('PEXPIRE', key, math.ceil(lease_us / 1000))
  end
end
return 0
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str, *, timeout: float = 0.25, breaker: float = 1.0,
                 lease_ttl: float = LEASE_TTL, sentinel: Any = None) -> None:
        self._url = url
        self._sentinel = sentinel
        self._ttl = lease_ttl
        self._renewer = _Renewer(lease_ttl, self.renew)
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
        self._client = RespClient(self._url, self._timeout, self._sentinel)
        self._renewer.start()

    async def close(self) -> None:
        self._renewer.stop()
        if self._probe is not None:
            self._probe.cancel()
        if self._client is not None:
            await self._client.close()

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
        if not batch:
            return
        self._inflight += 1
        prepared = self._prepare(batch)
        sha = self._sha
        reply = None if sha is None else self._client.submit("EVALSHA", sha, len(prepared[0]), *prepared[0],
                                                             *prepared[1])
        if reply is None:
            # No open connection or no script yet: the slow path opens and loads them.
            asyncio.get_running_loop().create_task(self._run(batch, prepared))
        else:
            # The fast path, once connected: no task, one callback when the reply arrives.
            reply.add_done_callback(lambda r: self._replied(r, batch, prepared))

    def _replied(self, reply: "asyncio.Future[Any]", batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]],
                 prepared: tuple[list[str], list[str], list[Any]]) -> None:
        exc = RespError("cancelled") if reply.cancelled() else reply.exception()
        if exc is not None and str(exc).startswith("NOSCRIPT"):
            # Redis restarted or flushed its scripts: the slow path loads it again.
            self._sha = None
            asyncio.get_running_loop().create_task(self._run(batch, prepared))
            return
        try:
            if exc is not None:
                self._fail(batch, exc)
            else:
                self._settle(batch, prepared[2], reply.result())
        finally:
            self._done()

    def _done(self) -> None:
        self._inflight -= 1
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _run(self, batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]],
                   prepared: tuple[list[str], list[str], list[Any]]) -> None:
        try:
            try:
                # The connection's reply timer (``timeout``) bounds the wait: no wait_for task per call.
                results = await self._eval(prepared[0], prepared[1])
            except Exception as exc:      # redis errors, timeouts, a closed connection: all the same here
                self._fail(batch, exc)
                return
            self._settle(batch, prepared[2], results)
        finally:
            self._done()

    def _prepare(self, batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]]
                 ) -> tuple[list[str], list[str], list[Any]]:
        """The script's KEYS and ARGV for a batch, and each request's plan to read the reply."""
        keys: dict[str, int] = {}
        windows: dict[tuple[str, tuple[int, ...]], int] = {}      # (key, params) -> window descriptor #
        described: list[Any] = []
        requests: list[Any] = []
        plans: list[tuple[list[tuple[Limit, Window | None, str, str | None]], bool]] = []
        # Requests of one caller share one checks list (memoised by the stage): without a
        # concurrency cap (a lease id per request) their items are the same, built once.
        same: dict[int, tuple[list[Any], list[Any]]] = {}
        for checks, _ in batch:
            shared = same.get(id(checks))
            if shared is not None:
                requests += shared[0]
                plans.append((shared[1], False))
                continue
            leased = False
            plan: list[tuple[Limit, Window | None, str, str | None]] = []
            items: list[Any] = []
            for limit, key in checks:
                for kind, k, params, w in self._template(limit, key):
                    if kind == "r":
                        d = windows.get((k, params))
                        if d is None:
                            d = windows[(k, params)] = len(windows) + 1
                            described += [keys.setdefault(k, len(keys) + 1), *params]
                        items.append(d)
                        plan.append((limit, w, k, None))
                    else:
                        leased = True
                        lease = _lease_id()
                        items += ["c", keys.setdefault(k, len(keys) + 1), params[0], lease]
                        plan.append((limit, None, k, lease))
            items.insert(0, len(plan))
            requests += items
            plans.append((plan, leased))
            if not leased:
                same[id(checks)] = (items, plan)
        now = "-" if self.now_override is None else int(self.now_override * 1_000_000)
        # One space-separated ARGV string, split by the script: encoding one argument per
        # number cost more client CPU than the rest of the batch (numbers, lease ids and
        # "c" never contain spaces).
        args = [" ".join(map(str, (now, self._ttl, len(windows), *described, *requests)))]
        return list(keys), args, plans

    def _fail(self, batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]], exc: BaseException) -> None:
        self._trip(exc)
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(LimitStoreError("limit store unavailable"))

    def _settle(self, batch: list[tuple[list[Check], "asyncio.Future[Verdict]"]],
                plans: list[Any], results: Any) -> None:
        quads = zip(results[0::4], results[1::4], results[2::4], results[3::4])
        for (checks, fut), (plan, leased), (ok, failed, retry_us, remaining) in zip(batch, plans, quads):
            if fut.done():
                continue
            if ok:
                verdict = Verdict(True, remaining=int(remaining) if remaining >= 0 else 0)
                if leased:
                    verdict.leases = [(k, lease) for _, _, k, lease in plan if lease is not None]
                    for k, lease in verdict.leases:
                        self._renewer.hold(k, lease)
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
        client = self._client
        if self._sha is None:
            self._sha = await client.call("SCRIPT", "LOAD", _SCRIPT)
        try:
            return await client.call("EVALSHA", self._sha, len(keys), *keys, *args)
        except RespReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Redis restarted or flushed its scripts.
            self._sha = await client.call("SCRIPT", "LOAD", _SCRIPT)
            return await client.call("EVALSHA", self._sha, len(keys), *keys, *args)

    def _trip(self, exc: BaseException) -> None:
        self.errors += 1
        BOUND.get(STORE_ERRORS, "limit").inc()
        self._down_until = time.monotonic() + self._breaker
        log.warning("ratelimit.store_error", error=type(exc).__name__, retry_in_seconds=self._breaker)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(self._breaker)
            try:
                await self._client.call("PING")
            except Exception:
                self._down_until = time.monotonic() + self._breaker
                continue
            self._down_until = 0.0
            log.info("ratelimit.store_recovered")
            return

    def release(self, leases: list[tuple[str, str]]) -> "asyncio.Task[None] | None":
        """Give leases back (a task: the exchange that ends does not wait for Redis)."""
        for key, lease in leases:
            self._renewer.drop(key, lease)
        if leases and self._client is not None:
            return asyncio.get_running_loop().create_task(self._release(leases))
        return None

    async def _release(self, leases: list[tuple[str, str]]) -> None:
        try:
            for key, lease in leases:
                await self._client.call("ZREM", key, lease)
        except Exception as exc:   # the lease expires by itself (lease_ttl)
            log.warning("ratelimit.release_failed", error=type(exc).__name__)

    async def renew(self, leases: list[tuple[str, str]]) -> None:
        """Push the expiry of held leases ``lease_ttl`` past Redis's clock (only leases still there)."""
        keys = list(dict.fromkeys(k for k, _ in leases))
        index = {k: i + 1 for i, k in enumerate(keys)}
        now = "" if self.now_override is None else str(int(self.now_override * 1_000_000))
        args: list[Any] = [now, self._ttl]
        for k, lease in leases:
            args += [index[k], lease]
        await self._client.call("EVAL", _RENEW, len(keys), *keys, *args)


def retry_seconds(verdict: Verdict) -> int:
    return max(1, math.ceil(verdict.retry_after))


def make_limiter(store: Any) -> "MemoryLimiter | RedisLimiter":
    """The limiter for the configured store: exact across replicas with Redis."""
    if store.kind == "redis":
        return RedisLimiter(store.url, store.prefix, timeout=store.limit_timeout, lease_ttl=store.lease_ttl,
                            sentinel=store.sentinel)
    return MemoryLimiter(lease_ttl=store.lease_ttl)
