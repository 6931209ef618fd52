"""Rate and concurrency limits: the last stage before the upstream.

Runs after authz and pinning, so a refused or held call never consumes quota.
Every limit of the caller's policy set that applies to this request (its
``match`` over tools and methods, in the server's section or ``"*"``) is
checked and charged in one step (``ratelimit.limiter``); a refusal is HTTP 429
with ``Retry-After`` and the IETF ``RateLimit-Policy``/``RateLimit`` headers
and a JSON-RPC error whose ``data`` names the limit and the delay; the call
never reaches the upstream.  Concurrency leases are released when the exchange
ends (``ex.finishers``: stream end, client gone, upstream failure).  If the
store cannot answer, each limit applies its ``on_store_error``: ``closed``
(default: 503) or ``open`` (admitted, counted).  ``tools/list`` results are
never filtered by limits.
"""
from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any, Awaitable

import structlog
from prometheus_client import Counter

from ..errors import RateLimited, Unavailable
from ..ratelimit.limiter import LimitStoreError, Verdict, retry_seconds
from ..ratelimit.model import CLOSED, Limit
from ..telemetry.metrics import BOUND, Tally

if TYPE_CHECKING:
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.ratelimit")

LIMIT_DECISIONS = Counter(
    "mcpgw_limit_decisions_total",
    "Rate and concurrency limit decisions, by server, limit id and decision (allowed, refused, "
    "store_error_open: admitted because the store failed and the limit is on_store_error: open, "
    "store_error_closed: refused with 503 for the same reason).",
    ["server", "limit", "decision"],
)
_ALLOWED = Tally(LIMIT_DECISIONS).pending     # (server, limit id, "allowed"): every admitted call, tallied


class RateLimit:
    name = "ratelimit"

    def __init__(self, policies: Any, limiter: Any) -> None:
        self._policies = policies        # the PolicyHolder the authz stage reads: one snapshot per reload
        self._limiter = limiter
        self._memo: dict[tuple[int, str, str | None, str | None], tuple[Limit, ...]] = {}
        self._checks: dict[tuple[int, int], tuple[Any, Any, list[tuple[Limit, str]], list[tuple[str, str, str]]]] = {}

    async def start(self) -> None:
        await self._limiter.start()

    async def close(self) -> None:
        await self._limiter.close()

    def _applicable(self, ex: "Exchange") -> tuple[Limit, ...]:
        ps = self._policies.current
        method = ex.method
        tool = ex.name if method == "tools/call" else None
        key = (id(ps), ex.server.name, method, tool)
        found = self._memo.get(key)
        if found is None:
            sp = ps.servers.get(ex.server.name) or ps.servers.get("*")
            found = tuple(lim for lim in sp.limits if lim.applies(method, tool)) if sp is not None else ()
            if len(self._memo) >= 4096:
                self._memo.clear()        # names are client-chosen: bounded
            self._memo[key] = found
        return found

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        if ex.method is None:
            return None
        limits = self._applicable(ex)
        if not limits:
            return None
        # The checks depend on the limits (memoised per server, method and tool) and the
        # caller only: memoised per (limits, principal); holding both keeps their ids unique.
        p = ex.principal
        ck = (id(limits), id(p))
        memo = self._checks.get(ck)
        if memo is None or memo[0] is not limits or memo[1] is not p:
            if len(self._checks) >= 4096:
                self._checks.clear()
            memo = self._checks[ck] = (limits, p, [(lim, _key(lim, ex)) for lim in limits],
                                       [(ex.server.name, lim.id, "allowed") for lim in limits])
        result = self._limiter.check(memo[2])
        if isinstance(result, Verdict):
            self._apply(ex, limits, result, memo[3])
            return None
        return self._await(ex, limits, result, memo[3])

    async def on_request(self, ex: "Exchange") -> None:
        pending = self.check(ex)
        if pending is not None:
            await pending

    async def _await(self, ex: "Exchange", limits: tuple[Limit, ...], fut: "asyncio.Future[Verdict]",
                     allowed: list[tuple[str, str, str]]) -> None:
        try:
            verdict = await fut
        except LimitStoreError:
            closed = [lim for lim in limits if lim.on_store_error == CLOSED]
            for lim in limits:
                decision = "store_error_closed" if lim in closed else "store_error_open"
                BOUND.get(LIMIT_DECISIONS, ex.server.name, lim.id, decision).inc()
            ex.limit = "store_error_closed" if closed else "store_error_open"
            if closed:
                raise Unavailable("rate limits cannot be checked right now; retry later",
                                  reason="limit_store_unavailable", headers={"Retry-After": "1"},
                                  data={"limit": closed[0].id}) from None
            return
        self._apply(ex, limits, verdict, allowed)

    def _apply(self, ex: "Exchange", limits: tuple[Limit, ...], verdict: Verdict,
               allowed: list[tuple[str, str, str]]) -> None:
        server = ex.server.name
        if not verdict.allowed:
            lim = verdict.limit
            assert lim is not None
            BOUND.get(LIMIT_DECISIONS, server, lim.id, "refused").inc()
            ex.limit = f"refused:{lim.id}"
            retry = retry_seconds(verdict)
            headers = {"Retry-After": str(retry), "RateLimit-Policy": lim.policy_header() or f'"{lim.id}"',
                       "RateLimit": f'"{lim.policy_name(verdict.window)}";r=0;t={retry}'}
            raise RateLimited(f"rate limit {lim.id} exceeded; retry in {retry} s", headers=headers,
                              data={"limit": lim.id, "retry_after": retry})
        for labels in allowed:
            _ALLOWED[labels] = _ALLOWED.get(labels, 0) + 1
        ex.limit = "allowed"
        if verdict.leases:
            leases = verdict.leases
            release = self._limiter.release
            finishers = ex.finishers if ex.finishers is not None else []
            finishers.append(lambda _ex: release(leases))
            ex.finishers = finishers


def _key(limit: Limit, ex: "Exchange") -> str:
    parts = []
    p = ex.principal
    for part in limit.key:
        if part == "principal":
            parts.append(p.key)
        elif part == "client":
            parts.append(p.client_id)
        elif part == "server":
            parts.append(ex.server.name)
        elif part == "tool":
            parts.append(ex.name if ex.method == "tools/call" and ex.name is not None else ex.method or "")
        elif part == "global":
            parts.append("*")
        else:                                   # claim:<name>
            parts.append(str(p.claims.get(part[6:], "")))
    # Hashed: bounded length whatever a token or client put in a claim (memoised: callers repeat).
    raw = "\x1f".join(parts)
    digest = _HASHES.get(raw)
    if digest is None:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        if len(_HASHES) >= 65536:
            _HASHES.clear()
        _HASHES[raw] = digest
    return digest


_HASHES: dict[str, str] = {}
