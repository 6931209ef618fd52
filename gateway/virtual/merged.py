"""A 2025-11-25 virtual session's ``GET``: one origin's call stream resumed, or every origin's stream merged.

- ``Last-Event-ID`` of a call's stream (the stream stage's id: one origin,
  named by its MAC, which covers the origin's server name) resumes that stream on
  its origin, through the origin's stages, as on its mount.
- Otherwise every origin's own ``GET`` stream (each opened within
  ``origin_timeout``; an origin that offers none is not part of it) is merged
  into one.  Each event's id records every origin's last event id
  (``ids.py``), so a reconnect with it reopens each origin where it left off.
  When one origin's stream ends, the merged stream ends (after what was already
  received): the client reconnects with its last id and every origin resumes.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from ..errors import BadRequest, GatewayError
from ..inspect.sse import SSEFramer, SSETooLarge, encode_event
from ..stages.stream import REPLAYED_HOOKS, STANDALONE
from ..telemetry.metrics import BOUND, VIRTUAL_ORIGIN_OMITTED, security_event
from .ids import is_merged

if TYPE_CHECKING:
    from ..config.virtual import VirtualServerConfig
    from ..pipeline import Exchange
    from ..stages.stream import EventIds
    from ..store.sessions import SessionRecord
    from .ids import VirtualIds
    from .legacy import LegacyVirtual
    from .router import VirtualRouter

log = structlog.get_logger("gateway.virtual")
security = structlog.get_logger("gateway.security")

_QUEUE = 64               # merged-stream events waiting for a slow client before the origins wait too
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Streams:
    def __init__(self, sessions: "LegacyVirtual", router: "VirtualRouter", ids: "VirtualIds",
                 event_ids: "EventIds", open_stream: Any, path: Any, event_limit: int) -> None:
        self._sessions = sessions
        self._router = router
        self._ids = ids
        self._event_ids = event_ids          # the stream stage's: ids of a call's stream
        self._open_stream = open_stream      # Forwarder.open_stream
        self._path = path                    # ResponsePath: an origin's messages, checked as on its mount
        self._event_limit = event_limit


    async def get(self, ex: "Exchange", vs: "VirtualServerConfig") -> web.StreamResponse:
        assert ex.session is not None
        presented = ex.request.headers.get("Last-Event-ID")
        if presented is not None and not is_merged(presented):
            return await self._resume(ex, vs, presented)
        positions: dict[str, str] = {}
        if presented is not None:
            found = self._ids.positions(ex.session.id, ex.principal.key, presented)
            if found is None:
                raise _event_id_refused(vs.name, ex)
            positions = found
        return await self._merged(ex, vs, positions)

    async def _resume(self, ex: "Exchange", vs: "VirtualServerConfig", presented: str) -> web.StreamResponse:
        """A POST's stream (one origin) resumed: the stream stage's id names the origin by its MAC."""
        for inc in vs.includes:
            rec = await self._sessions.existing(ex, inc.server)
            if rec is None:
                continue
            sub = self._router.sub(ex, vs, inc.server, None)
            self._sessions.attach(ex, sub, rec)
            found = self._event_ids.verify(sub, presented)
            if found is None:
                continue
            sub.upstream_last_event_id, sub.origin = found
            if sub.origin.kind == "p" and sub.origin.method in REPLAYED_HOOKS:
                sub.method, sub.replay = sub.origin.method, True    # inspected like the original
            sub.extra_upstream_headers["Mcp-Method"] = None
            sub.response_hooks.append(self._sessions.hook(ex, inc.server))
            return await self._router.call_origin(sub, self._router.forward)
        raise _event_id_refused(vs.name, ex)

    async def _merged(self, ex: "Exchange", vs: "VirtualServerConfig", positions: dict[str, str]
                      ) -> web.StreamResponse:
        assert ex.session is not None
        # Each origin within origin_timeout, as in a list: a silent origin does not hold the stream back.
        opening = (self._sessions.origin_session(ex, vs, inc.server) for inc in vs.includes)
        found = await asyncio.gather(*(asyncio.wait_for(o, vs.origin_timeout) for o in opening),
                                     return_exceptions=True)
        recs = []
        for inc, rec in zip(vs.includes, found):
            if isinstance(rec, BaseException):
                reason = "timeout" if isinstance(rec, asyncio.TimeoutError) else getattr(rec, "reason", "internal")
                log.warning("virtual.origin_omitted", virtual=vs.name, server=inc.server, method="GET", reason=reason)
                BOUND.get(VIRTUAL_ORIGIN_OMITTED, vs.name, inc.server, reason).inc()
                continue
            recs.append(rec)
        queue: asyncio.Queue[tuple[str, str | None, str]] = asyncio.Queue(_QUEUE)
        # An origin's stream that ends ends the merged one (as a mount's GET ends with its upstream's):
        # the client reconnects with the last merged id and every origin resumes, none waits unseen.
        ended = asyncio.Event()
        opened = [asyncio.Event() for _ in recs]
        readers = [asyncio.ensure_future(self._read(ex, vs, rec, positions.get(rec.server), queue, ended, up))
                   for rec, up in zip(recs, opened)]
        finished = asyncio.ensure_future(asyncio.gather(*readers, return_exceptions=True))
        stop = asyncio.ensure_future(ended.wait())
        sid, principal = ex.session.id, ex.principal.key
        positions = dict(positions)
        out = web.StreamResponse(status=200, headers=_SSE)
        ex.status = 200

        async def write(item: tuple[str, str | None, str]) -> None:
            origin, upstream_id, data = item
            event_id = None
            if upstream_id is not None:
                positions[origin] = upstream_id
                event_id = self._ids.merged(sid, principal, positions)
            await out.write(encode_event(data, id=event_id))

        try:
            # The 200 says the stream is live, as an upstream's does: each origin's stream is open at its
            # upstream first (within origin_timeout), so what it sends from then on reaches this client.
            try:
                await asyncio.wait_for(asyncio.gather(*(up.wait() for up in opened)), vs.origin_timeout)
            except asyncio.TimeoutError:
                pass                                   # a slow origin joins the stream when it opens
            await out.prepare(ex.request)
            while not (finished.done() or ended.is_set()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait((getter, finished, stop), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                await write(getter.result())
            while not queue.empty():                   # what the origins sent before the end
                await write(queue.get_nowait())
            await out.write_eof()
        except (ConnectionResetError, OSError):      # the client left (maybe while the origins opened)
            ex.outcome = "client_gone"
        finally:
            stop.cancel()
            for reader in readers:
                reader.cancel()
            await finished
        return out

    async def _read(self, ex: "Exchange", vs: "VirtualServerConfig", rec: "SessionRecord", last: str | None,
                    queue: "asyncio.Queue[tuple[str, str | None, str]]", ended: asyncio.Event,
                    opened: asyncio.Event) -> None:
        """One origin's GET stream into the merged queue, each message checked as on its mount.

        ``opened`` is set once the origin's answer has started (or it offers none, or failed)."""
        origin = rec.server
        sub = self._router.sub(ex, vs, origin, None)
        self._sessions.attach(ex, sub, rec)
        sub.origin, sub.upstream_last_event_id = STANDALONE, last
        sub.extra_upstream_headers.update({"Mcp-Method": None, "Accept": "text/event-stream"})
        sub.response_hooks.append(self._sessions.hook(ex, origin))

        async def relay(sub: "Exchange") -> web.StreamResponse:
            resp = await self._open_stream(sub)
            opened.set()
            if resp is None:
                return web.Response(status=204)       # this origin offers no stream
            try:
                framer = SSEFramer(self._event_limit)
                while chunk := await resp.content.readany():
                    for ev in framer.feed(chunk):
                        if ev.invalid or ev.comment_only:
                            continue
                        if not ev.data:
                            if ev.id is not None:      # a resumption point with no message
                                await queue.put((origin, ev.id, ""))
                            continue
                        try:
                            msg = self._path.message(sub, ev.data)
                        except GatewayError:            # unreadable (CodecError) or refused by a hook
                            continue                   # dropped, as on a mount's GET stream
                        if msg is not None:
                            await queue.put((origin, ev.id, msg.raw.decode()))
            except (asyncio.TimeoutError, SSETooLarge, OSError) as exc:
                log.info("virtual.origin_stream_ended", virtual=vs.name, server=origin, error=type(exc).__name__)
            except Exception as exc:   # aiohttp.ClientError and the like: this origin's stream ends
                log.info("virtual.origin_stream_ended", virtual=vs.name, server=origin, error=type(exc).__name__)
            finally:
                resp.release()
                ended.set()
            sub.status = 200
            return web.Response(status=200)

        try:
            await self._router.call_origin(sub, relay)
        finally:
            opened.set()


def _event_id_refused(virtual: str, ex: "Exchange") -> BadRequest:
    security_event("event_id_invalid")
    security.warning("security.event_id_refused", server=virtual,
                     principal=ex.principal.name or ex.principal.subject)
    return BadRequest("Last-Event-ID was not issued for this session", reason="event_id_invalid")
