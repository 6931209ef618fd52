"""W3C trace context in, a new parent span out, and optional OTLP/HTTP export of spans.

Incoming ``traceparent`` is parsed strictly (version ``00`` layout, lower-case hex,
trace and parent ids not all zeros, flags two hex digits); anything else is dropped,
never forwarded, and the request goes on untraced (or starts a new trace with
``tracing.start_traces``).  What reaches the upstream is the gateway's own
``traceparent``: the same trace id, the gateway's upstream span as the parent,
the same flags; ``tracestate`` follows a valid ``traceparent`` when it is at most
512 characters of the allowed alphabet.

With ``tracing.otlp_endpoint`` set, sampled requests (flag ``01``) are recorded as
spans: ``mcp.request`` (server span), one child per stage on the request path
(``mcp.authn``, ``mcp.policy``, ``mcp.pinning``, ``mcp.limits`` ...) and
``mcp.upstream`` (client span, the parent the upstream sees).  They are sent as
OTLP/HTTP JSON in batches, once a second, by a background task; a collector that is
down costs one failed POST per batch, never a request's time.  No OpenTelemetry
package is needed.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import aiohttp
import orjson
import structlog
from prometheus_client import Counter

if TYPE_CHECKING:
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.tracing")

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE = re.compile(r"[a-z0-9_\-*/@=,\s]{0,512}+")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
# OTel names for the stages' spans (stage.name -> span name).
SPAN_NAMES = {"authz": "mcp.policy", "ratelimit": "mcp.limits"}
MAX_QUEUE = 8192          # spans waiting for export; past it the oldest are dropped (counted)
BATCH = 512

TRACE_EXPORTS = Counter(
    "mcpgw_trace_exports_total", "OTLP span exports, by outcome (ok, failed, dropped: spans lost to a full queue).",
    ["outcome"],
)


class TraceContext:
    """One request's trace: the ids it continues or starts, and its spans when recorded."""

    __slots__ = ("trace_id", "parent_id", "span_id", "upstream_span_id", "flags", "state", "spans", "start_ns")

    def __init__(self, trace_id: str, parent_id: str | None, flags: str, state: str | None, record: bool) -> None:
        ids = os.urandom(16).hex()
        self.trace_id = trace_id
        self.parent_id = parent_id              # the caller's span (None: the gateway started the trace)
        self.span_id = ids[:16]                 # the gateway's server span
        self.upstream_span_id = ids[16:]        # the upstream call: the parent the upstream sees
        self.flags = flags
        self.state = state
        self.spans: list[dict[str, Any]] | None = [] if record else None
        self.start_ns = time.time_ns()

    def child(self) -> "TraceContext":
        """A sub-exchange's context (a virtual server's call to an origin): the same trace and
        flags, this exchange's span its parent, recorded when this one is."""
        return TraceContext(self.trace_id, self.span_id, self.flags, self.state, self.spans is not None)

    def outgoing(self) -> dict[str, str]:
        headers = {"traceparent": f"00-{self.trace_id}-{self.upstream_span_id}-{self.flags}"}
        if self.state:
            headers["tracestate"] = self.state
        return headers

    def span(self, name: str, start_ns: int, end_ns: int, *, span_id: str | None = None,
             parent: str | None = None, kind: int = 1, error: bool = False) -> None:
        assert self.spans is not None
        self.spans.append({
            "traceId": self.trace_id, "spanId": span_id or os.urandom(8).hex(),
            "parentSpanId": parent or self.span_id, "name": name, "kind": kind,
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(end_ns),
            "status": {"code": 2 if error else 0},
        })


class Tracer:
    """Reads trace context from requests; owns the exporter when one is configured."""

    def __init__(self, cfg: Any) -> None:
        self._start = cfg.start_traces
        self.exporter = OtlpExporter(cfg.otlp_endpoint, cfg.service_name) if cfg.otlp_endpoint else None

    def begin(self, ex: "Exchange") -> TraceContext | None:
        """The request's trace context (None: untraced); sets the upstream headers."""
        header = ex.request.headers.get("traceparent")
        ctx = None
        if header is not None:
            m = _TRACEPARENT.fullmatch(header) if len(header) == 55 else None
            if m is not None and m[1] != _ZERO_TRACE and m[2] != _ZERO_SPAN:
                state = ex.request.headers.get("tracestate")
                if state is not None and not _TRACESTATE.fullmatch(state[:513]):
                    state = None
                flags = m[3]
                ctx = TraceContext(m[1], m[2], flags, state,
                                   self.exporter is not None and int(flags, 16) & 1 == 1)
        if ctx is None and self._start:
            ctx = TraceContext(os.urandom(16).hex(), None, "01", None, self.exporter is not None)
        if ctx is not None:
            extra = ex.extra_upstream_headers
            if extra is None:
                ex.extra_upstream_headers = ctx.outgoing()
            else:
                extra.update(ctx.outgoing())
        return ctx

    def end(self, ex: "Exchange", ctx: TraceContext) -> None:
        """Close the server span and queue the request's spans."""
        if ctx.spans is None or self.exporter is None:
            return
        root = {
            "traceId": ctx.trace_id, "spanId": ctx.span_id, "name": "mcp.request", "kind": 2,
            "startTimeUnixNano": str(ctx.start_ns), "endTimeUnixNano": str(time.time_ns()),
            "status": {"code": 2 if ex.outcome == "error" else 0},
            "attributes": [_attr("mcp.server", ex.server.name), _attr("mcp.method", ex.method or ""),
                           _attr("http.response.status_code", ex.status), _attr("mcp.outcome", ex.outcome)],
        }
        if ctx.parent_id:
            root["parentSpanId"] = ctx.parent_id
        self.exporter.add([root, *ctx.spans])


async def run_recorded(ex: "Exchange", trace: TraceContext,
                       named: "tuple[tuple[str, Callable[[Exchange], Awaitable[None] | None]], ...]") -> None:
    """The stages ``named`` (span name, check) in order on ``ex``, each a span of ``trace``
    (the path of a recorded request: a mount's, a virtual server's and each origin's)."""
    for name, check in named:
        start = time.time_ns()
        try:
            pending = check(ex)
            if pending is not None:
                await pending
        except BaseException:
            trace.span(name, start, time.time_ns(), error=True)
            raise
        trace.span(name, start, time.time_ns())


async def forward_recorded(ex: "Exchange", trace: TraceContext,
                           forward: "Callable[[Exchange], Awaitable[Any]]") -> Any:
    """``forward(ex)`` as the ``mcp.upstream`` span: the parent the upstream was sent."""
    start = time.time_ns()
    failed = True
    try:
        response = await forward(ex)
        failed = ex.outcome == "error"
        return response
    finally:
        trace.span("mcp.upstream", start, time.time_ns(), span_id=trace.upstream_span_id, kind=3, error=failed)


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": str(value)[:256]}}


class OtlpExporter:
    """Batches spans and POSTs them as OTLP/HTTP JSON (``/v1/traces``) once a second."""

    def __init__(self, endpoint: str, service: str, interval: float = 1.0) -> None:
        self._endpoint = endpoint
        self._headers = {"Content-Type": "application/json"}
        self._resource = {"attributes": [_attr("service.name", service)]}
        self._interval = interval
        self._queue: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._failing = False

    def add(self, spans: list[dict[str, Any]]) -> None:
        self._queue.extend(spans)
        over = len(self._queue) - MAX_QUEUE
        if over > 0:
            for _ in range(over):
                self._queue.popleft()
            TRACE_EXPORTS.labels("dropped").inc(over)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
        if self._http is not None:
            await self._http.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        while self._queue and self._http is not None:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            body = orjson.dumps({"resourceSpans": [{"resource": self._resource, "scopeSpans": [
                {"scope": {"name": "mcp-gateway"}, "spans": batch}]}]})
            try:
                async with self._http.post(self._endpoint, data=body, headers=self._headers) as resp:
                    await resp.read()
                    ok = resp.status < 300
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            TRACE_EXPORTS.labels("ok" if ok else "failed").inc()
            if ok != (not self._failing):
                self._failing = not ok
                (log.info if ok else log.warning)("tracing.export_" + ("recovered" if ok else "failed"),
                                                  endpoint=self._endpoint, spans=len(batch))
            if not ok:
                return        # the batch is lost; try the next one at the next tick
