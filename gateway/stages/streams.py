"""Streams per principal: how many GET streams one caller may hold open at once.

Request phase, just before the policy's rate limits (a request refused earlier
never takes a slot).  A ``GET`` (a session's notification stream, or a
resumption with ``Last-Event-ID``) takes one of ``limits.max_streams_per_principal``
slots of the principal the authn stage set (with auth mode ``none`` every
caller is the one anonymous principal); the slot is released when the exchange
ends, however it ends (``ex.finishers``: the client leaves, the upstream ends
the stream, an error).  Over the limit: ``429`` with ``Retry-After`` and a
JSON-RPC error (``too_many_streams``), logged and counted in
``mcpgw_client_limit_hits_total{limit="streams_per_principal"}``.

Slots are the rate limiter's concurrency leases (``ratelimit.limiter``): exact
across replicas with Redis, and the slots of a replica that died come back
within ``store.lease_ttl``.  A store that cannot answer fails closed (``503``).

Streamed ``POST`` answers do not count: such a stream ends with its answer
(bounded by ``read_timeout`` and the policy's concurrency limits), and refusing
it at its head would drop the answer of a call the upstream already ran.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Awaitable

import structlog

from ..errors import RateLimited, Unavailable
from ..ratelimit.limiter import LimitStoreError, Verdict
from ..ratelimit.model import Limit
from ..telemetry.metrics import LIMIT_HITS

if TYPE_CHECKING:
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.limits")

# Not a valid policy limit id (RULE_ID starts alphanumeric): never shares a counter with one.
LIMIT_ID = "@streams_per_principal"
_RETRY_AFTER = "5"      # seconds: a stream frees its slot when it ends, which the gateway cannot foresee


class StreamQuota:
    name = "streams"

    def __init__(self, config: Any, limiter: Any) -> None:
        limits = config.limits
        self.max = limits.max_streams_per_principal
        self.idle = self.max == 0          # 0: unlimited, the stage is left out of the request path
        self._limit = Limit(LIMIT_ID, "*", limits.loc, concurrency=self.max or None)
        self._limiter = limiter            # shared with the rate-limit stage, which starts and closes it
        self._checks: dict[str, list[tuple[Limit, str]]] = {}

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        if ex.request.method != "GET":
            return None
        key = ex.principal.key
        checks = self._checks.get(key)
        if checks is None:
            if len(self._checks) >= 4096:      # principals come and go: bounded
                self._checks.clear()
            # Hashed: bounded length whatever the token put in its claims.
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
            checks = self._checks[key] = [(self._limit, digest)]
        result = self._limiter.check(checks)
        if isinstance(result, Verdict):
            self._apply(ex, result)
            return None
        return self._await(ex, result)

    async def on_request(self, ex: "Exchange") -> None:
        pending = self.check(ex)
        if pending is not None:
            await pending

    async def _await(self, ex: "Exchange", fut: Any) -> None:
        try:
            verdict = await fut
        except LimitStoreError:
            log.warning("stream.principal_limit_unavailable", server=ex.server.name)
            raise Unavailable("stream limits cannot be checked right now; retry later",
                              reason="limit_store_unavailable", headers={"Retry-After": "1"},
                              data={"limit": "max_streams_per_principal"}) from None
        self._apply(ex, verdict)

    def _apply(self, ex: "Exchange", verdict: Verdict) -> None:
        if not verdict.allowed:
            LIMIT_HITS.labels("streams_per_principal").inc()
            log.warning("stream.principal_limit", server=ex.server.name, limit=self.max,
                        principal=ex.principal.name or ex.principal.subject)
            raise RateLimited(f"this caller already holds {self.max} open streams; close one or retry later",
                              reason="too_many_streams", headers={"Retry-After": _RETRY_AFTER},
                              data={"limit": "max_streams_per_principal", "max": self.max,
                                    "retry_after": int(_RETRY_AFTER)})
        leases = verdict.leases
        release = self._limiter.release
        finishers = ex.finishers if ex.finishers is not None else []
        finishers.append(lambda _ex: release(leases))
        ex.finishers = finishers
