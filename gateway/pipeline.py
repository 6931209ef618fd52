"""The per-request ``Exchange`` and the three-phase stage contract.

Every stage may take part in three phases; ``app.py`` declares the order of
each (the request order, the head order, the message order) in one place.

1. **request**: ``async def on_request(self, ex)``, in request order.  It
   reads and annotates the exchange, or raises a ``GatewayError`` to answer
   locally (the rest of the chain and the upstream are then skipped).
2. **response head**: ``def on_head(self, ex, status, headers, out)``,
   called once the upstream's status and headers are known and before
   anything is sent (``response.py``); it may raise, add headers to ``out``,
   or finish the exchange by setting ``ex.final``.  Returns None or an awaitable.
3. **per message**: every JSON-RPC message coming back (the JSON body, each
   SSE event's data, live or replayed) is decoded by the one codec, admitted
   by the stream stage, then passed to the ``ResponseHook``s the stages
   registered for this exchange in the request phase (``ex.response_hooks``),
   in the response order ``app.py`` declares (the reverse of registration).

A stage may also offer the same work without a coroutine, for the common case
where nothing needs awaiting (a coroutine per stage is a measurable share of a
request's CPU)::

    def check(self, ex: Exchange) -> Awaitable[None] | None

It does what ``on_request`` does and returns None, or returns an awaitable
that finishes the work (a store or upstream round trip); the gateway calls
``check`` when a stage has one and awaits what it returns.  ``on_request``
stays the complete contract (tests and other callers use it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from .config.model import ServerConfig
    from .store.sessions import SessionRecord


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by the authn stage.

    ``key`` identifies the principal for session binding: (issuer, subject,
    client).  ``claims`` are the verified token claims (never the token).
    """

    issuer: str
    subject: str
    client_id: str = ""
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    expires_at: float | None = None
    # Computed once (the session stage compares it on every request).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.issuer}\x1f{self.subject}\x1f{self.client_id}")


ANONYMOUS = Principal(issuer="", subject="anonymous", name="anonymous")

LEGACY = "legacy"   # 2025-11-25 and older: initialize, Mcp-Session-Id, GET streams
MODERN = "modern"   # 2026-07-28 and newer: stateless, Mcp-Method/Mcp-Name headers


class ResponseHook(Protocol):
    """Sees each JSON-RPC message coming back for one exchange.

    Called once per message: the whole JSON body, or each SSE event's data.
    Returns the message to forward (possibly modified), or ``None`` to drop it.
    Raising ``GatewayError`` replaces the message with an error for the
    request (in-band when the response already started).
    """

    def __call__(self, ex: "Exchange", message: dict[str, Any]) -> dict[str, Any] | None: ...


class Exchange:
    """Everything known about one client request as it moves through the stages."""

    __slots__ = (
        "request", "server", "started", "era", "protocol_version", "principal", "token",
        "body", "message", "rpc_id", "method", "name", "arguments", "is_request",
        "session", "upstream_session_id", "response_hooks", "audit", "audit_safe", "status",
        "outcome", "reason", "upstream_status", "extra_upstream_headers", "response_headers",
        "origin", "answered", "replay", "resumable", "upstream_last_event_id", "final", "finishers", "trace",
        "upstream_sent", "upstream_wait", "result_bytes", "result_body", "limit", "routed", "via",
        "client_session_id",
    )

    def __init__(self, request: "web.Request", server: "ServerConfig") -> None:
        self.request = request
        self.server = server
        self.started = time.perf_counter()
        self.era = LEGACY
        self.protocol_version: str | None = None
        self.principal: Principal = ANONYMOUS
        # The raw bearer token, kept only for RFC 8693 token exchange; never logged.
        self.token: str | None = None
        self.body: bytes | None = None
        self.message: dict[str, Any] | None = None
        self.rpc_id: Any = None
        self.method: str | None = None
        self.name: str | None = None
        self.arguments: Any = None
        self.is_request = False
        self.session: "SessionRecord | None" = None
        self.upstream_session_id: str | None = None
        self.response_hooks: list[ResponseHook] = []
        # Fields added to the request's audit record: ``audit`` is redacted like any log
        # field; ``audit_safe`` holds only closed-set values (the policy decision), is
        # written as it is, and may be shared between exchanges (read it, never modify it).
        self.audit: dict[str, Any] = {}
        self.audit_safe: Mapping[str, Any] | None = None
        self.status = 0
        self.outcome = "ok"
        self.reason = ""
        self.upstream_status = 0
        self.extra_upstream_headers: dict[str, str | None] | None = None   # None value: not sent
        # Headers the gateway adds to whatever it answers (CORS for allowed origins).
        self.response_headers: dict[str, str] | None = None
        # The stream stage: where this exchange's stream comes from (which answers it may
        # carry), whether its answer has been relayed, and the upstream's Last-Event-ID.
        self.origin: Any = None
        self.answered = False
        self.replay = False
        self.resumable = False            # an event id was relayed on this exchange's stream
        self.upstream_last_event_id: str | None = None
        # A head stage that answers by itself (DELETE of a session) sets this.
        self.final: "web.StreamResponse | None" = None
        # Called once when the exchange ends, however it ends (stream end, client gone, error).
        self.finishers: list[Callable[["Exchange"], None]] | None = None
        # W3C trace context (telemetry.tracing) when the request carries one or starts one.
        self.trace: Any = None
        # perf_counter when the request went to the upstream (0: it never did), and how long
        # the upstream took to answer with its status and headers.
        # The limit stage's outcome for the audit record, from a closed set ("allowed",
        # "refused:<limit id>", "store_error_open", "store_error_closed"); "" when no limit applied.
        self.limit = ""
        self.upstream_sent = 0.0
        self.upstream_wait = 0.0
        # tools/call: the size of the answer relayed, and the JSON answer itself (the audit
        # record hashes it, only when a record is written).
        self.result_bytes = -1
        self.result_body: bytes | None = None
        # A virtual server's exchange whose request went to one origin in a sub-exchange (a traced
        # request: gateway/virtual/router.py): the origin's sub-exchange is the request's one audit
        # record and its count in the request metrics (``via`` names the virtual server).
        self.routed = False
        # A sub-exchange's virtual server (its name, from the configuration): in the audit record.
        self.via: str | None = None
        # A virtual server's exchange with an origin (a 2025-11-25 session): the client's own
        # (virtual) session id, which names the origin's session in the answer (stages/session.py).
        self.client_session_id: str | None = None


class Stage(Protocol):
    name: str

    async def on_request(self, ex: Exchange) -> None: ...


def checker(stage: Any) -> Callable[[Exchange], Awaitable[None] | None]:
    """``stage.check`` when it has one, else ``stage.on_request`` (whose coroutine is the awaitable)."""
    check = getattr(stage, "check", None)
    return check if check is not None else stage.on_request


StageFactory = Callable[..., Stage]
