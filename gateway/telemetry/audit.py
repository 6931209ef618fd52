"""The per-request audit record: written once, after the response completes.

One structured event ``mcp.request`` per client request with principal,
server, method, tool, outcome, status and whatever the stages added to
``ex.audit`` (decisions, deciding rule ids, reasons, pin findings).  The
bearer token is never a field; redaction runs on the whole record anyway.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from .metrics import BOUND, INFLIGHT, REQUEST_DURATION, REQUESTS, method_label

if TYPE_CHECKING:
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.audit")


def finish(ex: "Exchange", enabled: bool = True) -> None:
    elapsed = time.perf_counter() - ex.started
    server = ex.server.name
    BOUND.get(REQUESTS, server, method_label(ex.method), str(ex.status)).inc()
    BOUND.get(REQUEST_DURATION, server).observe(elapsed)
    BOUND.get(INFLIGHT, server).dec()
    if not enabled:
        return
    p = ex.principal
    fields = {
        "server": server,
        "http_method": ex.request.method,
        "status": ex.status,
        "outcome": ex.outcome,
        "era": ex.era,
        "principal": p.name or p.subject,
        "issuer": p.issuer,
        "client_id": p.client_id,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if ex.method is not None:
        fields["method"] = ex.method
    if ex.name is not None:
        fields["target"] = ex.name
    if ex.reason:
        fields["reason"] = ex.reason
    if ex.upstream_status:
        fields["upstream_status"] = ex.upstream_status
    if ex.session is not None:
        fields["session"] = ex.session.short
    if ex.audit:
        fields.update(ex.audit)
    if ex.outcome == "ok":
        log.info("mcp.request", **fields)
    else:
        log.warning("mcp.request", **fields)


def start(ex: "Exchange") -> None:
    BOUND.get(INFLIGHT, ex.server.name).inc()
