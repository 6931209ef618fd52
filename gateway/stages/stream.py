"""Stream binding: which messages may come back on which stream, and resumable event ids.

Request phase (after session: the binding needs the session and principal).
A ``GET`` with ``Last-Event-ID`` must present an id this gateway minted for
this session and principal (an HMAC over both, the server, the upstream's id
and the stream's origin); anything else is refused (400, ``event_id_invalid``).
The upstream sees its own id.  A replay of a list request's stream is marked
(``ex.replay``) with the original method, so authz and pinning install the same
response hooks as for the live request: a replay is inspected like the original.

Per message (first in the response order, before pinning and the policy
filter): an answer (result or error) is accepted only on the stream of the
request it answers: on a POST's stream, or a replay of it, only the answer
with that request's id, once; on a session's GET stream, or a listen stream,
none.  A misrouted answer is dropped, logged and counted.

Per SSE event: the upstream's event id is replaced by a minted one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ..codec import ERROR, NOTIFICATION, REQUEST, RESULT, Message
from ..errors import BadRequest
from ..store.base import StoreError
from ..telemetry.metrics import MCP_ERRORS_TALLY, method_label, security_event

if TYPE_CHECKING:
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.security")

_KEY_NAME = "event-id-key"
_MAX_ID = 1024            # a Last-Event-ID longer than this was not minted here
# Methods whose replayed result the response hooks must see again (list filters, pinning).
REPLAYED_HOOKS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Origin:
    """Where a stream came from: ``("p", method, rpc id)`` for a request's, ``("g", None, None)`` else."""

    __slots__ = ("kind", "method", "rpc_id", "packed")

    def __init__(self, kind: str, method: str | None, rpc_id: Any) -> None:
        self.kind = kind
        self.method = method
        self.rpc_id = rpc_id
        self.packed = _b64(orjson.dumps([kind, method, rpc_id]))


class EventIds:
    """Mints and verifies event ids.  The key is shared through the store, so any replica verifies."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._key = secrets.token_bytes(32)

    async def start(self) -> None:
        try:
            await self._store.set_if_absent(_KEY_NAME, _b64(self._key).encode())
            shared = await self._store.get(_KEY_NAME)
            if shared:
                self._key = _unb64(shared.decode())
        except (StoreError, binascii.Error, UnicodeDecodeError, ValueError):
            # Ids minted here then resume only on this replica; foreign ids are still refused.
            log.warning("stream.event_key_local", detail="store unavailable: event ids are replica-local")

    def _mac(self, ex: "Exchange", upstream_id: str, packed: str) -> str:
        sid = ex.session.id if ex.session is not None else ""
        msg = "\x1f".join((ex.server.name, sid, ex.principal.key, upstream_id, packed)).encode()
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest()[:18])

    def sign(self, domain: str, *parts: str) -> str:
        """A MAC with the shared key over ``parts``, for ids other modules mint (``virtual/ids.py``);
        ``domain`` starts with NUL, which no server name does, so it never verifies as an event id."""
        msg = "\x1f".join((domain, *parts)).encode()
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest()[:18])

    def mint(self, ex: "Exchange", upstream_id: str, origin: Origin) -> str:
        return f"{_b64(upstream_id.encode())}.{origin.packed}.{self._mac(ex, upstream_id, origin.packed)}"

    def verify(self, ex: "Exchange", presented: str) -> tuple[str, Origin] | None:
        if len(presented) > _MAX_ID or presented.count(".") != 2:
            return None
        enc_id, packed, mac = presented.split(".")
        try:
            upstream_id = _unb64(enc_id).decode()
            kind, method, rpc_id = orjson.loads(_unb64(packed))
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
            return None
        if not hmac.compare_digest(mac, self._mac(ex, upstream_id, packed)):
            return None
        return upstream_id, Origin(kind, method, rpc_id)


class Stream:
    name = "stream"

    def __init__(self, ids: EventIds) -> None:
        self.ids = ids

    async def start(self) -> None:
        await self.ids.start()

    def check(self, ex: "Exchange") -> None:
        """Request phase: resolve ``Last-Event-ID`` (GET) and fix the stream's origin."""
        req = ex.request
        if req.method == "GET":
            presented = req.headers.get("Last-Event-ID")
            if presented is None:
                ex.origin = STANDALONE
                return
            found = self.ids.verify(ex, presented)
            if found is None:
                security_event("event_id_invalid")
                log.warning("security.event_id_refused", server=ex.server.name,
                            principal=ex.principal.name or ex.principal.subject)
                raise BadRequest("Last-Event-ID was not issued for this session", reason="event_id_invalid")
            ex.upstream_last_event_id, ex.origin = found
            if ex.origin.kind == "p" and ex.origin.method in REPLAYED_HOOKS:
                ex.method = ex.origin.method       # authz and pinning hook the replay as the original
                ex.replay = True
        elif ex.is_request:
            ex.origin = Origin("p", ex.method, ex.rpc_id)
        else:
            ex.origin = _NO_ANSWERS

    async def on_request(self, ex: "Exchange") -> None:
        self.check(ex)

    # -- per message ---------------------------------------------------------------

    def admit(self, ex: "Exchange", msg: Message) -> bool:
        """May ``msg`` be relayed on this exchange's stream?  Answers only to its own request, once."""
        kind = msg.kind
        if kind is REQUEST or kind is NOTIFICATION:
            return True
        origin = ex.origin
        if origin is not None and origin.kind == "p" and not ex.answered and (
                msg.id == origin.rpc_id or (kind is ERROR and msg.id is None)):
            ex.answered = True
            if kind is ERROR:
                self._failed(ex, "rpc_error")
            elif kind is RESULT and msg.value["result"].get("isError") is True:
                self._failed(ex, "tool_error")
            return True
        security_event("misrouted_response")
        log.warning("security.response_misrouted", server=ex.server.name, kind=kind)
        return False

    @staticmethod
    def _failed(ex: "Exchange", kind: str) -> None:
        """The answer is an MCP-level failure inside a successful exchange: audit and count it."""
        ex.outcome = kind
        key = (ex.server.name, method_label(ex.origin.method), kind)
        _MCP_ERRORS[key] = _MCP_ERRORS.get(key, 0) + 1

    def event_id(self, ex: "Exchange", upstream_id: str | None) -> str | None:
        if upstream_id is None or ex.origin is None:
            return None
        ex.resumable = True               # the client now holds a point to resume from
        return self.ids.mint(ex, upstream_id, ex.origin)


_MCP_ERRORS = MCP_ERRORS_TALLY.pending
STANDALONE = Origin("g", None, None)
_NO_ANSWERS = Origin("n", None, None)
