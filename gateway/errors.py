"""The one error hierarchy.

Every refusal the gateway makes is a ``GatewayError``: it knows its HTTP
status, its JSON-RPC error code, and a ``reason`` from a closed set.  The
reason is the structured-log field and the metric label, so it must never
carry request data.  Foreign exceptions (aiohttp, PyJWT, redis) are translated
into these once, where the dependency is used, with ``raise ... from exc``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .config.yamlloc import Loc


# JSON-RPC codes.  -32700..-32600 are JSON-RPC's own; MCP 2026-07-28 defines
# -32020..-32022 and forbids undefined codes in -32020..-32099, so the
# gateway's own codes live in -32000..-32019.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
GATEWAY_ERROR = -32000          # upstream unreachable / timed out / invalid
SESSION_NOT_FOUND = -32001      # same code the TypeScript SDK uses
ACCESS_DENIED = -32003          # authentication or authorization refused
RATE_LIMITED = -32004
TOOL_HELD = -32005              # tool definition not approved (pinning)
RESULT_BLOCKED = -32006         # the upstream's answer looked like a prompt injection (scan_results)
HEADER_MISMATCH = -32020        # MCP 2026-07-28
UNSUPPORTED_PROTOCOL_VERSION = -32022


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem, printed as ``file:line:col: message``."""

    loc: "Loc"
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}"


class ConfigError(Exception):
    """A configuration (or policy, or lock) file is invalid; carries every problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class GatewayError(Exception):
    """A local reply: the gateway answers the client itself."""

    status: ClassVar[int] = 500
    code: ClassVar[int] = INTERNAL_ERROR
    reason: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if status is not None:
            self.status = status  # type: ignore[misc]
        self.headers = headers or {}
        self.data = data


class BadRequest(GatewayError):
    status = 400
    code = INVALID_REQUEST
    reason = "bad_request"


class ParseError(BadRequest):
    code = PARSE_ERROR
    reason = "parse_error"


class CodecError(ParseError):
    """The bytes are not one strict JSON-RPC message (``codec.py``); ``reason`` is from a closed
    set (invalid_json, invalid_utf8, invalid_envelope, batch, ...).  The codec does not know whose
    bytes they were: each caller turns it into the refusal for its direction (a client's body:
    400; an upstream's message: 502 or an in-band error), so the status here is only a default."""

    reason = "invalid_json"

    def __init__(self, message: str, reason: str = "invalid_json") -> None:
        super().__init__(message, reason=reason)


class HeaderMismatch(BadRequest):
    code = HEADER_MISMATCH
    reason = "header_mismatch"


class UnsupportedVersion(BadRequest):
    code = UNSUPPORTED_PROTOCOL_VERSION
    reason = "unsupported_version"


class BodyTooLarge(GatewayError):
    status = 413
    code = INVALID_REQUEST
    reason = "body_too_large"


class RequestTimeout(GatewayError):
    """The client did not send its request (body) in time; the connection is closed after."""

    status = 408
    code = INVALID_REQUEST
    reason = "request_timeout"


class MethodNotAllowed(GatewayError):
    status = 405
    code = INVALID_REQUEST
    reason = "method_not_allowed"


class NotAcceptable(GatewayError):
    status = 406
    code = INVALID_REQUEST
    reason = "not_acceptable"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = INVALID_REQUEST
    reason = "unsupported_media_type"


class UnknownMount(GatewayError):
    status = 404
    code = METHOD_NOT_FOUND
    reason = "unknown_server"


class SessionNotFound(GatewayError):
    """404, never 400: clients re-initialize only on 404."""

    status = 404
    code = SESSION_NOT_FOUND
    reason = "session_not_found"


class Forbidden(GatewayError):
    status = 403
    code = ACCESS_DENIED
    reason = "forbidden"


class OriginRejected(Forbidden):
    reason = "origin_rejected"


class HostRejected(GatewayError):
    status = 421
    code = INVALID_REQUEST
    reason = "host_rejected"


class Unauthorized(GatewayError):
    """401 with a ``WWW-Authenticate`` challenge built by the authn stage."""

    status = 401
    code = ACCESS_DENIED
    reason = "unauthorized"


class InsufficientScope(Forbidden):
    """403 with ``error="insufficient_scope"`` and every scope the operation needs."""

    reason = "insufficient_scope"

    def __init__(self, message: str, *, scopes: tuple[str, ...], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.scopes = scopes


class PolicyDenied(GatewayError):
    """A JSON-RPC error that does not reveal whether the tool exists (HTTP 200)."""

    status = 200
    code = INVALID_PARAMS
    reason = "policy_denied"


class ToolHeld(GatewayError):
    """The tool's current definition is not approved (rug-pull protection)."""

    status = 200
    code = TOOL_HELD
    reason = "tool_held"


class ResultBlocked(GatewayError):
    """The upstream's resources/read answer was withheld: it looked like a prompt injection."""

    status = 200
    code = RESULT_BLOCKED
    reason = "result_injection"


class RateLimited(GatewayError):
    status = 429
    code = RATE_LIMITED
    reason = "rate_limited"


class UpstreamError(GatewayError):
    status = 502
    code = GATEWAY_ERROR
    reason = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    reason = "upstream_unavailable"


class UpstreamInvalid(UpstreamError):
    reason = "upstream_invalid"


class UpstreamAuthRefused(UpstreamError):
    """The upstream challenged the gateway's credentials; never relayed to the client."""

    reason = "upstream_auth_refused"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "upstream_timeout"


class Unavailable(GatewayError):
    """A dependency the gateway needs (the store) failed; fail closed."""

    status = 503
    code = GATEWAY_ERROR
    reason = "unavailable"
