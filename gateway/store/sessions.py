"""Gateway-owned MCP sessions (2025-11-25 era).

The gateway mints its own ``Mcp-Session-Id`` for every upstream session,
keeps the mapping in the shared store so any replica can serve the next
request, and remembers the principal that created it.  Lookups are served
from a small in-process cache (a Redis round trip costs as much CPU as the
whole proxy hop); deletions are broadcast so other replicas drop their copy.
"""
from __future__ import annotations

import functools
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import orjson
import structlog

from ..errors import Unavailable
from .base import Store, StoreError

log = structlog.get_logger("gateway.sessions")

_CHANNEL = "session-deleted"
# How long a replica trusts its cached copy without asking the store again.
# Deletions normally arrive by pub/sub within milliseconds; this bounds the
# damage if one is lost.
_CACHE_SECONDS = 30.0
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    server: str
    upstream_id: str
    principal: str          # Principal.key of the creator
    protocol_version: str
    created: float

    @property
    def short(self) -> str:
        """A non-reversible tag for logs (the id itself is a capability)."""
        return _short(self.id)

    def dumps(self) -> bytes:
        return orjson.dumps({"s": self.server, "u": self.upstream_id, "p": self.principal,
                             "v": self.protocol_version, "c": self.created})

    @classmethod
    def loads(cls, sid: str, raw: bytes) -> "SessionRecord":
        d = orjson.loads(raw)
        return cls(sid, d["s"], d["u"], d["p"], d.get("v", ""), d.get("c", 0.0))


@functools.lru_cache(maxsize=4096)
def _short(sid: str) -> str:
    # Memoised: every audit record of a session carries it (a SHA-256 each time cost
    # ~4,000 instructions per request).
    return hashlib.sha256(sid.encode()).hexdigest()[:12]


def new_session_id() -> str:
    # 256 bits from the OS CSPRNG; URL-safe base64 is visible ASCII (0x21-0x7E).
    return secrets.token_urlsafe(32)


class SessionStore:
    def __init__(self, store: Store, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[SessionRecord, float]] = OrderedDict()
        store.subscribe(_CHANNEL, self._on_deleted)

    def _on_deleted(self, _channel: str, message: bytes) -> None:
        self._cache.pop(message.decode(errors="replace"), None)

    async def create(self, server: str, upstream_id: str, principal: str, version: str) -> SessionRecord:
        return await self._put(SessionRecord(new_session_id(), server, upstream_id, principal, version, time.time()))

    async def set_version(self, rec: SessionRecord, version: str) -> SessionRecord:
        """``rec`` with the protocol version its upstream negotiated (a virtual server's origin
        session: the client's own version may not be the origin's), stored."""
        return await self._put(SessionRecord(rec.id, rec.server, rec.upstream_id, rec.principal, version,
                                             rec.created))

    async def _put(self, rec: SessionRecord) -> SessionRecord:
        try:
            await self._store.set("session:" + rec.id, rec.dumps(), self._ttl)
        except StoreError as exc:
            raise Unavailable("session store unavailable", reason="store_unavailable") from exc
        self._remember(rec)
        return rec

    def _remember(self, rec: SessionRecord) -> None:
        self._cache[rec.id] = (rec, time.monotonic() + _CACHE_SECONDS)
        if len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)

    def cached(self, sid: str) -> SessionRecord | None:
        """The record when this replica's cache has a fresh copy (what ``get`` returns at once), else None."""
        hit = self._cache.get(sid)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    async def get(self, sid: str) -> SessionRecord | None:
        hit = self._cache.get(sid)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        if len(sid) > 256:
            return None
        try:
            raw = await self._store.get("session:" + sid)
        except StoreError as exc:
            raise Unavailable("session store unavailable", reason="store_unavailable") from exc
        if raw is None:
            self._cache.pop(sid, None)
            return None
        try:
            rec = SessionRecord.loads(sid, raw)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("session.corrupt_record")
            return None
        self._remember(rec)
        return rec

    async def delete(self, sid: str) -> None:
        self._cache.pop(sid, None)
        try:
            await self._store.delete("session:" + sid)
            await self._store.publish(_CHANNEL, sid.encode())
        except StoreError as exc:
            raise Unavailable("session store unavailable", reason="store_unavailable") from exc
