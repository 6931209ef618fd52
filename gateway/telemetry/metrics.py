"""The metrics catalogue.  Metric objects are the only module-level singletons.

Every label value comes from a closed set (server names from config, methods
from the MCP method list or ``other``, reasons from the error hierarchy), so
no request data, token or tool text can reach a label.  Label children are
bound once and cached: a ``.labels()`` lookup costs ~3 µs, a cached child ~1 µs.

The per-request series (requests, duration, in-flight, policy decisions) are
*tallied*: the request path adds to plain numbers in a dict (no lock, no
bucket loop), and ``flush()`` moves the tallies into the prometheus_client
metrics, so the exported metrics are the same ones.  ``/metrics`` flushes
before it renders, so a single process is always exact; with ``--workers``
every worker also flushes once a second (``flush_every``) into the shared
multiprocess files, so another worker's counts may be up to that long behind.
"""
from __future__ import annotations

import asyncio
from bisect import bisect_right
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from .. import __version__

# No ``*_created`` series: they double every counter's series count, and dashboards use rate().
disable_created_metrics()

KNOWN_METHODS = frozenset({
    "initialize", "ping", "server/discover", "subscriptions/listen",
    "tools/list", "tools/call", "resources/list", "resources/read", "resources/templates/list",
    "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get",
    "completion/complete", "logging/setLevel", "tasks/get", "tasks/list", "tasks/cancel", "tasks/result",
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "sampling/createMessage", "elicitation/create", "roots/list",
})


def method_label(method: str | None) -> str:
    if method is None:
        return "none"
    return method if method in KNOWN_METHODS else "other"


BUILD_INFO = Gauge("mcpgw_build_info", "Always 1; the version label says which gateway is running.",
                   ["version"], multiprocess_mode="max")
BUILD_INFO.labels(__version__).set(1)

REQUESTS = Counter(
    "mcpgw_requests_total", "Client requests handled, by server, MCP method and HTTP status.",
    ["server", "method", "status"],
)
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
REQUEST_DURATION = Histogram(
    "mcpgw_request_duration_seconds",
    "Time from request arrival to the end of the response (streams included), by server.",
    ["server"],
    buckets=DURATION_BUCKETS,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
OVERHEAD = Histogram(
    "mcpgw_gateway_overhead_seconds",
    "Time the gateway spent on a request before sending it upstream (every stage: auth, policy, "
    "pinning, limits), by server.",
    ["server"],
    buckets=OVERHEAD_BUCKETS,
)
UPSTREAM_WAIT = Histogram(
    "mcpgw_upstream_response_seconds",
    "Time from sending a request upstream to the upstream's status and headers, by server.",
    ["server"],
    buckets=DURATION_BUCKETS,
)
REJECTIONS = Counter(
    "mcpgw_rejections_total", "Requests answered by the gateway itself, by server and reason.",
    ["server", "reason"],
)
UPSTREAM_ERRORS = Counter(
    "mcpgw_upstream_errors_total", "Upstream failures (unreachable, timeout, invalid reply), by server and reason.",
    ["server", "reason"],
)
VIRTUAL_ORIGIN_OMITTED = Counter(
    "mcpgw_virtual_origin_omitted_total",
    "Origins left out of a virtual server's merged list (failed or past origin_timeout), by virtual server, "
    "origin server and reason.",
    ["virtual", "server", "reason"],
)
INFLIGHT = Gauge(
    "mcpgw_inflight_requests", "Requests in progress, by server.", ["server"], multiprocess_mode="livesum",
)
UPSTREAM_CONNECTIONS = Gauge(
    "mcpgw_upstream_connections", "Connections of the forwarding pool, by server and state "
    "(open: all, idle included; idle: kept alive, waiting for a request).",
    ["server", "state"], multiprocess_mode="livesum",
)
SSE_EVENTS = Counter("mcpgw_sse_events_total", "SSE events relayed to clients, by server.", ["server"])
ACTIVE_STREAMS = Gauge(
    "mcpgw_active_streams", "SSE streams being relayed to clients right now, by server.", ["server"],
    multiprocess_mode="livesum",
)
STORE_LATENCY = Histogram(
    "mcpgw_store_latency_seconds", "Redis store call latency (sessions, pins, event-id key), by operation.",
    ["operation"], buckets=OVERHEAD_BUCKETS,
)
STORE_ERRORS = Counter(
    "mcpgw_store_errors_total", "Failed calls to the Redis store (sessions, pins, event-id key), by operation.",
    ["operation"],
)
SESSIONS = Counter(
    "mcpgw_sessions_total", "Gateway sessions created and terminated, by server and action.", ["server", "action"],
)
SECURITY_EVENTS = Counter(
    "mcpgw_security_events_total", "Security-relevant events (session hijack attempts, ...), by kind.", ["kind"],
)
LIMIT_HITS = Counter(
    "mcpgw_client_limit_hits_total", "Client connections or streams cut by a flood limit, by limit "
    "(client_connections, stream_write_timeout, streams_per_principal, stream_idle_timeout).", ["limit"],
)
CONFIG_RELOADS = Counter(
    "mcpgw_config_reloads_total", "Policy/config reloads, by result (ok, failed).", ["what", "result"],
)


class Bound:
    """Cache of bound label children for the hot path."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Any] = {}

    def get(self, metric: Any, *labels: str) -> Any:
        # The metric itself, not id(metric): the key keeps it alive, so a metric created
        # later can never inherit a dead one's id and get its children (seen in tests).
        key = (metric, *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*labels)
        return child


BOUND = Bound()


class Tally:
    """Counter increments kept as plain numbers per label tuple until ``flush``.

    The hot path does ``t.pending[labels] = t.pending.get(labels, 0) + n`` (or
    ``t.inc(labels)``); every label value must already be from a closed set.
    """

    __slots__ = ("metric", "pending")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.pending: dict[tuple[str, ...], float] = {}
        _TALLIES.append(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        pending = self.pending
        pending[labels] = pending.get(labels, 0) + amount

    def flush(self) -> None:
        items = list(self.pending.items())
        self.pending.clear()     # in place: the hot path may hold a reference to the dict
        for labels, amount in items:
            BOUND.get(self.metric, *map(str, labels)).inc(amount)   # e.g. an int status


class LevelTally:
    """A gauge's level per label tuple (``+1``/``-1`` on the hot path), ``set`` on flush."""

    __slots__ = ("metric", "levels")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.levels: dict[tuple[str, ...], float] = {}
        _TALLIES.append(self)

    def flush(self) -> None:
        for labels, level in list(self.levels.items()):
            BOUND.get(self.metric, *map(str, labels)).set(level)


class HistogramTally:
    """Observations per label tuple, kept raw and bucketed in bulk; added to the histogram on flush.

    The hot path appends the value to ``pending[labels]`` (a plain list) while it holds
    fewer than ``RAW_MAX`` values, else calls ``observe``.  Bucketing happens at flush (or
    when a list fills): the values are sorted once and each bucket's count is read off with
    one ``bisect`` per bound, a few hundred instructions per value instead of a
    ``bisect`` and two increments on the request path.  A value goes to the first bucket
    whose upper bound is >= it, as ``Histogram.observe`` does; the last bound is +Inf.
    """

    __slots__ = ("metric", "bounds", "pending", "folded")

    RAW_MAX = 4096

    def __init__(self, metric: Any, buckets: tuple[float, ...]) -> None:
        self.metric = metric
        self.bounds = (*(float(b) for b in buckets), float("inf"))
        self.pending: dict[tuple[str, ...], list[float]] = {}
        self.folded: dict[tuple[str, ...], list[float]] = {}      # [sum, count per bucket...]
        _TALLIES.append(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        values = self.pending.get(labels)
        if values is None:
            self.pending[labels] = [value]
            return
        if len(values) >= self.RAW_MAX:
            self._fold(labels, values)
        values.append(value)

    def _fold(self, labels: tuple[str, ...], values: list[float]) -> None:
        """Bucket ``values`` into ``folded[labels]`` and empty the list (in place: the hot
        path reads it from ``pending`` each time)."""
        rec = self.folded.get(labels)
        if rec is None:
            rec = self.folded[labels] = [0.0] * (len(self.bounds) + 1)
        values.sort()
        rec[0] += sum(values)
        below = 0
        for i, bound in enumerate(self.bounds, 1):
            upto = bisect_right(values, bound)
            rec[i] += upto - below
            below = upto
        values.clear()

    def flush(self) -> None:
        for labels, values in list(self.pending.items()):
            if values:
                self._fold(labels, values)
        items = list(self.folded.items())
        self.folded.clear()
        for labels, rec in items:
            child = BOUND.get(self.metric, *map(str, labels))
            # prometheus_client keeps one non-cumulative value per bucket plus the sum
            # (Histogram.observe does _sum.inc and one _buckets[i].inc(1)).
            child._sum.inc(rec[0])
            for i, n in enumerate(rec[1:]):
                if n:
                    child._buckets[i].inc(n)


class Sampler:
    """A function run at every flush: gauges read off live objects (connection pools)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        _TALLIES.append(self)

    def flush(self) -> None:
        self.fn()

    def close(self) -> None:
        if self in _TALLIES:
            _TALLIES.remove(self)


_TALLIES: list[Any] = []


def flush() -> None:
    """Move every tally into its prometheus_client metric (before rendering /metrics)."""
    for tally in _TALLIES:
        tally.flush()


async def flush_every(seconds: float) -> None:
    """For ``--workers``: keep the shared multiprocess files at most ``seconds`` behind."""
    try:
        while True:
            await asyncio.sleep(seconds)
            flush()
    finally:
        flush()


# The per-request series, tallied (see the module docstring).
REQUESTS_TALLY = Tally(REQUESTS)                    # (server, method label, status as int)
DURATION_TALLY = HistogramTally(REQUEST_DURATION, DURATION_BUCKETS)   # (server,)
OVERHEAD_TALLY = HistogramTally(OVERHEAD, OVERHEAD_BUCKETS)          # (server,)
UPSTREAM_WAIT_TALLY = HistogramTally(UPSTREAM_WAIT, DURATION_BUCKETS)  # (server,)
INFLIGHT_LEVEL = LevelTally(INFLIGHT)               # (server,)
SSE_EVENTS_TALLY = Tally(SSE_EVENTS)                # (server,)
STREAMS_LEVEL = LevelTally(ACTIVE_STREAMS)          # (server,)
STORE_LATENCY_TALLY = HistogramTally(STORE_LATENCY, OVERHEAD_BUCKETS)   # (operation,)


def count_rejection(server: str, reason: str) -> None:
    BOUND.get(REJECTIONS, server, reason).inc()


def security_event(kind: str) -> None:
    BOUND.get(SECURITY_EVENTS, kind).inc()


# --- token termination (gateway/auth/) ------------------------------------------------
# Refusals are already counted by REJECTIONS (server, reason).  These count the work the
# resource server does off the hot path: a verified-token cache hit counts nothing.
AUTH_VERIFICATIONS = Counter(
    "mcpgw_auth_verifications_total",
    "Tokens verified from scratch (cache misses), by issuer and outcome (ok or the refusal reason).",
    ["issuer", "outcome"],
)
AUTH_JWKS_FETCHES = Counter(
    "mcpgw_auth_jwks_fetches_total", "Issuer metadata/JWKS fetches, by issuer and outcome.", ["issuer", "outcome"],
)
AUTH_INTROSPECTIONS = Counter(
    "mcpgw_auth_introspections_total", "RFC 7662 introspection calls, by issuer and outcome.", ["issuer", "outcome"],
)
UPSTREAM_CREDENTIALS = Counter(
    "mcpgw_upstream_credential_fetches_total",
    "Tokens obtained for upstreams (client credentials, token exchange), by server, kind and outcome.",
    ["server", "kind", "outcome"],
)


# --- tool pinning and poisoning (gateway/inspect/pin_signals.py) -----------------------------------
# Labels: server (config), kind (a closed set: the pinning kinds in gateway/inspect/pinning.py, or a
# poisoning rule id from the loaded rule files), severity and action (blocked, warned, pinned).
# Never tool text: names and excerpts go to the audit log only.
TOOL_PIN_EVENTS = Counter(
    "mcpgw_tool_pin_events_total",
    "Tool-definition pinning events (a change against the approved state, or a tofu pin), by server, kind "
    "and action.",
    ["server", "kind", "action"],
)
TOOL_POISONING_FINDINGS = Counter(
    "mcpgw_tool_poisoning_findings_total",
    "Poisoning findings in relayed tool definitions, by server, kind (rule id), severity and action.",
    ["server", "kind", "severity", "action"],
)
TOOL_CALLS_HELD = Counter(
    "mcpgw_tool_calls_held_total",
    "tools/call refused because the tool's current definition is not approved, by server and kind.",
    ["server", "kind"],
)
# Prompt injection in results (gateway/stages/results.py): kind is a results-profile rule id or
# "unscanned" (text past the scanning cap), action is annotated, masked or blocked.
RESULT_INJECTION_FINDINGS = Counter(
    "mcpgw_result_injection_findings_total",
    "Prompt-injection findings in tool results and resource reads (scan_results), by server, kind "
    "(rule id, or unscanned), severity and action.",
    ["server", "kind", "severity", "action"],
)
# --- end tool pinning and poisoning ----------------------------------------------------------------


# --- MCP-level outcomes (an HTTP 200 can carry a JSON-RPC error or a failed tool call) ---------
MCP_ERRORS = Counter(
    "mcpgw_mcp_errors_total",
    "Answers relayed with an MCP-level failure inside a successful HTTP exchange: kind=rpc_error "
    "(a JSON-RPC error) or tool_error (a tools/call result with isError: true), by server and method.",
    ["server", "method", "kind"],
)
MCP_ERRORS_TALLY = Tally(MCP_ERRORS)                # (server, method label, kind)
