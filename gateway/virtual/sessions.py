"""A 2025-11-25 session on a virtual server: its record, the client's handshake, its origin sessions.

The virtual session is an ordinary ``SessionRecord`` (``server`` is the virtual
server, no upstream id), so the session stage binds it to its principal exactly
as on a mount.  Beside it, in the same store and with the same TTL:

- ``vsession:<id>``: the client's ``initialize`` params (capabilities,
  clientInfo, protocolVersion), so any replica can open an origin session
  later with the client's own capabilities;
- ``vsession:<id>:<origin>``: the id of the *mount* session (``session:<id>``,
  created by the session stage when the origin answered ``initialize``) that
  holds the origin's upstream session id.

A mapping is claimed with ``set_if_absent``: when two replicas open the same
origin at once, the first claim wins and the loser ends the upstream session it
opened (``claim`` returns the winner).

A replica keeps the mappings it read for ``_CACHE_SECONDS`` (every routed call
needs one): a mapping changes only when its session ends, and an ended mount
session is noticed through the session store (whose deletions are broadcast),
after which the mapping is dropped (``forget``).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import Unavailable
from ..store.base import Store, StoreError

if TYPE_CHECKING:
    from ..store.sessions import SessionRecord, SessionStore

_PREFIX = "vsession:"
SESSIONLESS = "-"           # the mapping of an origin that answered initialize without a session id
_MAX_INIT = 64 * 1024       # bytes of remembered initialize params (a client's capabilities are small)
_CACHE_SECONDS = 30.0
_CACHE_MAX = 100_000


class VirtualSessions:
    def __init__(self, store: Store, sessions: "SessionStore", ttl: float) -> None:
        self._store = store
        self.sessions = sessions
        self._ttl = ttl
        self._cache: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    async def create(self, virtual: str, principal: str, version: str, params: dict[str, Any]) -> "SessionRecord":
        raw = orjson.dumps(params)
        if len(raw) > _MAX_INIT:
            raw = orjson.dumps({k: params[k] for k in ("protocolVersion", "capabilities") if k in params})
        rec = await self.sessions.create(virtual, "", principal, version)
        await self._call(self._store.set(_PREFIX + rec.id, raw, self._ttl))
        return rec

    async def init_params(self, sid: str) -> dict[str, Any]:
        raw = await self._call(self._store.get(_PREFIX + sid))
        try:
            params = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            params = {}
        return params if isinstance(params, dict) else {}

    def cached_record(self, key: tuple[str, str]) -> "SessionRecord | str | None":
        """For ``key`` (virtual session, origin): the origin's mount session record when this
        replica's caches hold both it and the mapping to it (what ``origin`` then
        ``sessions.get`` return at once); ``SESSIONLESS`` when the cached mapping says the
        origin keeps no sessions; else None."""
        hit = self._cache.get(key)
        if hit is None:
            return None
        mount_sid, until = hit
        if until <= time.monotonic():
            return None
        return SESSIONLESS if mount_sid == SESSIONLESS else self.sessions.cached(mount_sid)

    async def origin(self, sid: str, origin: str) -> str | None:
        """The mount session id holding ``origin``'s upstream session, if one was opened."""
        hit = self._cache.get((sid, origin))
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        raw = await self._call(self._store.get(f"{_PREFIX}{sid}:{origin}"))
        if not raw:
            return None
        self._remember(sid, origin, raw.decode())
        return raw.decode()

    def _remember(self, sid: str, origin: str, mount_sid: str) -> None:
        self._cache[(sid, origin)] = (mount_sid, time.monotonic() + _CACHE_SECONDS)
        if len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)

    async def claim(self, sid: str, origin: str, mount_sid: str) -> str:
        """Map ``origin`` to ``mount_sid`` unless another replica did first: the mapping that holds."""
        key = f"{_PREFIX}{sid}:{origin}"
        if await self._call(self._store.set_if_absent(key, mount_sid.encode(), self._ttl)):
            self._remember(sid, origin, mount_sid)
            return mount_sid
        raw = await self._call(self._store.get(key))
        return raw.decode() if raw else mount_sid

    async def forget(self, sid: str, origin: str) -> None:
        self._cache.pop((sid, origin), None)
        await self._call(self._store.delete(f"{_PREFIX}{sid}:{origin}"))

    async def end(self, sid: str, origins: tuple[str, ...]) -> None:
        for origin in origins:
            self._cache.pop((sid, origin), None)
            await self._call(self._store.delete(f"{_PREFIX}{sid}:{origin}"))
        await self._call(self._store.delete(_PREFIX + sid))
        await self.sessions.delete(sid)

    @staticmethod
    async def _call(pending: Any) -> Any:
        try:
            return await pending
        except StoreError as exc:
            raise Unavailable("session store unavailable", reason="store_unavailable") from exc
