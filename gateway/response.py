"""The way back: what the gateway does with an upstream's answer, in the order ``app.py`` declares.

Two phases after the request phase (see ``pipeline.py``):

- **head** (``ResponsePath.head``): the upstream's status and headers are
  known, nothing has been sent.  Head stages run in order; each may raise a
  ``GatewayError`` (the client gets a local reply), add response headers, or
  finish the exchange (``ex.final``: DELETE).  Then the media type decides
  the framing: a JSON body, an SSE stream, or no body.  (A JSON body that is
  several messages, one a line, is a line stream: ``inspect/ndjson.py``.)  A 2xx body in any
  other media type, another charset than UTF-8, or a content coding is
  refused (502): the gateway could not read it, so it does not relay it.
- **per message** (``ResponsePath.message``): every JSON-RPC message of the
  answer, the JSON body, each NDJSON line or each SSE event's data, live or replayed, goes
  through the one strict codec (``codec.decode``).  The stream stage admits
  it to this stream (answers only to their own request), then the hooks the
  request-phase stages registered on the exchange run in the declared
  response order (pinning before the policy filter: pinning must see the
  whole list).  What is relayed is what the hooks returned, serialised by the
  codec.  A message that cannot be decoded is never relayed: before the
  response started that is a 502; on a stream, the request's own stream gets
  an in-band error and ends, a GET stream drops the event (logged, counted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import orjson
import structlog

from .codec import JSON, SSE, CodecError, Message, decode, media_type
from .errors import GatewayError, UpstreamInvalid
from .inspect.ndjson import is_line_stream
from .inspect.sse import SSEEvent, encode_event
from .telemetry.metrics import BOUND, UPSTREAM_ERRORS
from .telemetry.redact import redact_value, scrub_text

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from .pipeline import Exchange
    from .stages.stream import Stream

log = structlog.get_logger("gateway.response")

EMPTY = "empty"
HeadHook = Callable[["Exchange", int, Any, "CIMultiDict[str]"], "Awaitable[None] | None"]
_KEEPALIVE = b": keepalive\n\n"


class StreamAbort(Exception):
    """A streamed message that cannot be relayed on a request's stream: end it with ``error`` in band."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def _refuse(ex: "Exchange", reason: str, message: str) -> UpstreamInvalid:
    BOUND.get(UPSTREAM_ERRORS, ex.server.name, reason).inc()
    log.warning("upstream.refused_message", server=ex.server.name, reason=reason)
    return UpstreamInvalid(message, reason=reason)


class LineStream(Exception):
    """A complete JSON body that is several messages, one a line (NDJSON): relay it as a line stream."""


class ResponsePath:
    """Head stages, then the per-message order; built once by ``app.py``."""

    def __init__(self, head: Sequence[HeadHook], stream: "Stream", line_limit: int = 16 * 1024 * 1024) -> None:
        self._head = tuple(head)
        self._stream = stream
        self.line_limit = line_limit      # limits.max_sse_event_bytes: one streamed message

    async def head(self, ex: "Exchange", status: int, headers: Any, out: "CIMultiDict[str]") -> str:
        """Run the head stages; the framing of the body (``JSON``, ``SSE`` or ``EMPTY``)."""
        for hook in self._head:
            pending = hook(ex, status, headers, out)
            if pending is not None:
                await pending
            if ex.final is not None:
                return EMPTY
        if status in (202, 204):
            return EMPTY
        coding = headers.get("Content-Encoding")
        if coding is not None and coding.strip().lower() not in ("", "identity"):
            raise _refuse(ex, "upstream_content_encoding", "the upstream MCP server sent an encoded body")
        kind, problem = media_type(headers.get("Content-Type"))
        if kind is None:
            if status >= 400:
                BOUND.get(UPSTREAM_ERRORS, ex.server.name, f"http_{status // 100}xx").inc()
                raise UpstreamInvalid(f"the upstream MCP server answered HTTP {status}")
            if problem == "missing" and headers.get("Content-Length") == "0":
                return EMPTY
            raise _refuse(ex, "upstream_media_type",
                          "the upstream MCP server answered in a media type the gateway cannot inspect")
        if kind == SSE and status >= 300:
            raise UpstreamInvalid(f"the upstream MCP server answered HTTP {status}")
        return kind

    # -- per message -------------------------------------------------------------------

    def message(self, ex: "Exchange", data: bytes | str) -> Message | None:
        """Decode, admit, run the hooks; the message to relay or None.  Raises ``CodecError``."""
        msg = decode(data)
        if not self._stream.admit(ex, msg):
            return None
        hooks = ex.response_hooks
        if not hooks:
            return msg
        value = msg.value
        changed = False
        # Declared order: hooks are registered in request order, so reversed is the
        # response order of app.py (pinning sees the whole list before the policy filter).
        for hook in reversed(hooks):
            value = hook(ex, value)
            if value is None:
                return None
            # A hook may change the message in place: unless it declares itself read-only,
            # what it returns is serialised again, so the bytes relayed are what it checked.
            changed = changed or not getattr(hook, "readonly", False)
        return msg.replace(value) if changed or value is not msg.value else msg

    def json_body(self, ex: "Exchange", body: bytes) -> bytes:
        """The JSON body to relay (before the response starts).  Raises ``GatewayError``."""
        if not body:
            if ex.is_request:       # an empty body answers nothing: the client would wait forever
                raise _refuse(ex, "upstream_empty_answer", "the upstream MCP server answered a request with "
                                                           "an empty body")
            return body
        try:
            msg = self.message(ex, body)
        except CodecError as exc:
            if exc.reason == "invalid_json" and is_line_stream(body, self.line_limit):
                raise LineStream() from None     # several messages, one a line: relayed one by one
            raise _refuse(ex, "upstream_" + exc.reason,
                          "the upstream MCP server sent a message the gateway could not parse") from None
        if msg is None:
            raise _refuse(ex, "upstream_misrouted", "the upstream MCP server's reply does not answer the request")
        return msg.raw

    def line(self, ex: "Exchange", line: bytes) -> bytes | None:
        """One NDJSON line to relay, newline included, or None to drop it.  Raises ``StreamAbort``.

        Checked exactly as an SSE event's data.  A line that cannot be decoded ends
        the stream whether or not the request was answered: unlike an SSE event,
        a line carries no framing of its own that a client could skip it by.
        """
        if not line.strip():
            return b"\n"                  # a keep-alive: relayed as an empty line
        try:
            msg = self.message(ex, line)
        except CodecError as exc:
            raise StreamAbort(_refuse(ex, "upstream_" + exc.reason,
                                      "the upstream MCP server sent a message the gateway could not parse")) from None
        except GatewayError as err:       # a hook refused the message: the request's answer is an error
            ex.outcome, ex.reason = "error", err.reason
            return error_body(err, ex.rpc_id) + b"\n"
        if msg is None:
            return None
        return msg.raw + b"\n"

    def event(self, ex: "Exchange", ev: SSEEvent) -> bytes | None:
        """One SSE event to relay, or None to drop it.  Raises ``StreamAbort``."""
        if ev.invalid:
            return self._unreadable(ex, "upstream_invalid_utf8")
        if ev.comment_only:
            return _KEEPALIVE          # a keep-alive; the upstream's comment text is not relayed
        if not ev.data:
            # No message: a resumption point (servers prime a stream with an id and empty data).
            if ev.id is None and ev.retry is None:
                return None
            return encode_event("", event=None, id=self._stream.event_id(ex, ev.id), retry=ev.retry)
        if ev.event is not None and ev.event != "message":
            return self._unreadable(ex, "upstream_sse_event")
        try:
            msg = self.message(ex, ev.data)
        except CodecError as exc:
            return self._unreadable(ex, "upstream_" + exc.reason)
        except GatewayError as err:       # a hook refused the message: the request's answer is an error
            ex.outcome, ex.reason = "error", err.reason
            rid = ex.origin.rpc_id if ex.origin is not None and ex.origin.kind == "p" else ex.rpc_id
            return encode_event(error_body(err, rid).decode(), id=self._stream.event_id(ex, ev.id))
        if msg is None:
            return None
        return encode_event(msg.raw.decode(), id=self._stream.event_id(ex, ev.id), retry=ev.retry)

    def _unreadable(self, ex: "Exchange", reason: str) -> None:
        err = _refuse(ex, reason, "the upstream MCP server sent a message the gateway could not parse")
        if ex.origin is not None and ex.origin.kind == "p" and not ex.answered:
            raise StreamAbort(err)
        return None


def error_event(err: GatewayError, rpc_id: Any) -> bytes:
    return encode_event(error_body(err, rpc_id).decode())


def error_body(err: GatewayError, rpc_id: Any) -> bytes:
    # Messages and data can quote client or upstream text: redacted like a log line.
    error: dict[str, Any] = {"code": err.code, "message": scrub_text(err.message)}
    data: dict[str, Any] = {"reason": err.reason}
    if err.data:
        data.update(redact_value("data", err.data))
    error["data"] = data
    # JSON-RPC: id is required on errors; null when the request id is unknown.
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "error": error})
