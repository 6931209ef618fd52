"""A virtual server's merged lists, and which origin serves a resource URI.

Lists fan out to every origin at once, each within ``origin_timeout``; an
origin that fails or is late (or, in 2025-11-25, whose session cannot be opened)
is left out (log, metric, ``_meta``) and the rest is still answered.  Tool and
prompt names get the include's prefix; every item records its origin.  The
merged ``nextCursor`` is ``cursor.py``'s.  Resource URIs are published unchanged
and remembered per virtual server, so a read goes to the origin that listed it.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web

from ..errors import PolicyDenied
from ..pipeline import MODERN, Exchange
from ..policy.decide import ANY, UNKNOWN, decide
from ..policy.model import PROMPTS, RESOURCES, TOOLS
from ..telemetry.metrics import BOUND, VIRTUAL_ORIGIN_OMITTED
from . import cursor

if TYPE_CHECKING:
    from ..config.virtual import Include, VirtualServerConfig
    from .router import VirtualRouter

log = structlog.get_logger("gateway.virtual")

META_ORIGIN = "io.mcpgw/origin"            # on each published item: the origin server's name
META_OMITTED = "io.mcpgw/omittedOrigins"   # on a merged list: [{server, reason}] left out
_MAX_URIS = 10_000          # routing entries kept per virtual server (oldest dropped first)
_MAX_PAGES = 20             # pages read per origin when a miss refreshes the URI map
_REFRESH_EVERY = 10.0       # seconds between two such refreshes of one virtual server
# method -> (result field, item key, kind, whether the key is namespaced)
LISTS = {
    "tools/list": ("tools", "name", TOOLS, True),
    "prompts/list": ("prompts", "name", PROMPTS, True),
    "resources/list": ("resources", "uri", RESOURCES, False),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", RESOURCES, False),
}


class _Omitted(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Lists:
    def __init__(self, router: "VirtualRouter", virtual: dict[str, "VirtualServerConfig"], policies: Any) -> None:
        self._router = router
        self._policies = policies
        self._uris: dict[str, OrderedDict[str, str]] = {n: OrderedDict() for n in virtual}
        self._templates: dict[str, dict[str, str]] = {n: {} for n in virtual}
        self._refreshed: dict[str, float] = {}

    async def route_uri(self, ex: Exchange, vs: "VirtualServerConfig", uri: str) -> "Include":
        """The origin that listed ``uri`` (or a template it starts); a miss re-lists once.  With one
        origin there is nothing to choose: every URI is its (it may serve URIs it does not list)."""
        if len(vs.includes) == 1:
            return vs.includes[0]
        for attempt in (0, 1):
            server = self._uris[vs.name].get(uri)
            if server is None:
                server = next((s for t, s in self._templates[vs.name].items()
                               if (stem := t.split("{", 1)[0]) and uri.startswith(stem)), None)
            if server is not None:
                inc = vs.include_for(server)
                if inc is not None:
                    return inc
            if attempt == 0 and time.monotonic() - self._refreshed.get(vs.name, -_REFRESH_EVERY) >= _REFRESH_EVERY:
                # At most one re-listing per _REFRESH_EVERY: unknown URIs must not make a
                # client's every read a fan-out to every origin.
                self._refreshed[vs.name] = time.monotonic()
                for method in ("resources/list", "resources/templates/list"):
                    pending: dict[str, str | None] = {i.server: None for i in vs.includes}
                    for _ in range(_MAX_PAGES):
                        pending = dict((await self._fan(ex, vs, method, pending))[1])
                        if not pending:
                            break
        raise PolicyDenied(f"Resource not found: {uri}")

    async def merged(self, ex: Exchange, vs: "VirtualServerConfig", method: str) -> dict[str, Any]:
        field, key, kind, _ = LISTS[method]
        given = params_of(ex).get("cursor")
        pending = (cursor.decode(vs.cursor_key, vs.name, method, given) if given is not None
                   else {inc.server: None for inc in vs.includes})
        items, nxt, omitted, cache = await self._fan(ex, vs, method, pending)
        policies = self._policies.current
        if vs.name in policies.servers:
            items = [i for i in items if self._visible(policies, vs, ex, kind, field, key, i)]
        result: dict[str, Any] = {field: items}
        if ex.era == MODERN:
            # 2026-07-28 list results carry their cacheability: the merge is as cacheable as its
            # least cacheable part, and not at all when an origin is missing from it.
            result.update({"resultType": "complete",
                           "cacheScope": "public" if cache["public"] and not omitted else "private",
                           "ttlMs": 0 if omitted else cache["ttl"]})
        if nxt:
            result["nextCursor"] = cursor.encode(vs.cursor_key, vs.name, method, nxt)
        if omitted:
            result["_meta"] = {META_OMITTED: omitted}
        return result

    def _visible(self, policies: Any, vs: "VirtualServerConfig", ex: Exchange, kind: str, field: str,
                 key: str, item: dict[str, Any]) -> bool:
        if field == "resourceTemplates":
            from ..policy.decide import decide_template
            return decide_template(policies, vs.name, item[key], ex.principal).allowed
        annotations = (item.get("annotations") or {}) if kind == TOOLS else UNKNOWN
        return decide(policies, vs.name, kind, item[key], ex.principal, ANY, annotations).allowed

    async def _fan(self, ex: Exchange, vs: "VirtualServerConfig", method: str, pending: dict[str, str | None]
                   ) -> tuple[list[dict[str, Any]], dict[str, str], list[dict[str, str]], dict[str, Any]]:
        """One page from every pending origin, concurrently: (published items, next cursors, omitted,
        the merged cacheability)."""
        includes = [inc for server in pending if (inc := vs.include_for(server)) is not None]
        pages = await asyncio.gather(*(self._page(ex, vs, inc, method, pending[inc.server]) for inc in includes),
                                     return_exceptions=True)
        field, key, kind, named = LISTS[method]
        items: list[dict[str, Any]] = []
        nxt: dict[str, str] = {}
        omitted: list[dict[str, str]] = []
        cache: dict[str, Any] = {"public": True, "ttl": None}
        for inc, page in zip(includes, pages):
            if isinstance(page, BaseException):
                reason = page.reason if isinstance(page, _Omitted) else "internal"
                if not isinstance(page, _Omitted):
                    log.error("virtual.origin_error", virtual=vs.name, server=inc.server, error=type(page).__name__)
                log.warning("virtual.origin_omitted", virtual=vs.name, server=inc.server, method=method,
                            reason=reason)
                BOUND.get(VIRTUAL_ORIGIN_OMITTED, vs.name, inc.server, reason).inc()
                omitted.append({"server": inc.server, "reason": reason})
                continue
            result = page
            ttl = result.get("ttlMs")
            ttl = ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else 0
            cache["ttl"] = ttl if cache["ttl"] is None else min(ttl, cache["ttl"])
            cache["public"] = cache["public"] and result.get("cacheScope") == "public"
            globs = inc.tools if kind == TOOLS else inc.prompts if kind == PROMPTS else None
            for item in result.get(field) or ():
                if not isinstance(item, dict) or not isinstance(item.get(key), str):
                    continue
                name = item[key]
                if named:
                    if not inc.publishes(globs, name):
                        continue
                    item = {**item, key: inc.prefix + name}
                else:
                    self._remember(vs, field, name, inc.server)
                meta = item.get("_meta")
                item = {**item, "_meta": {**(meta if isinstance(meta, dict) else {}), META_ORIGIN: inc.server}}
                items.append(item)
            if isinstance(result.get("nextCursor"), str):
                nxt[inc.server] = result["nextCursor"]
        cache["ttl"] = cache["ttl"] or 0
        return items, nxt, omitted, cache

    def _remember(self, vs: "VirtualServerConfig", field: str, uri: str, server: str) -> None:
        if field == "resourceTemplates":
            if len(self._templates[vs.name]) < _MAX_URIS:
                self._templates[vs.name].setdefault(uri, server)
            return
        uris = self._uris[vs.name]
        if uri not in uris:                   # the first include that lists a URI serves it
            uris[uri] = server
            if len(uris) > _MAX_URIS:
                uris.popitem(last=False)

    async def _page(self, ex: Exchange, vs: "VirtualServerConfig", inc: "Include", method: str,
                    origin_cursor: str | None) -> dict[str, Any]:
        # A list's only params are the cursor and _meta (the same for a refresh made for a read).
        params = {k: v for k, v in params_of(ex).items() if k == "_meta"}
        if origin_cursor is not None:
            params["cursor"] = origin_cursor
        router = self._router
        sub = router.sub(ex, vs, inc.server, method, params)

        async def bind(sub: Exchange) -> None:
            pending = router.legacy.bind(ex, vs, sub, hook=False)
            if pending is not None:
                await pending

        async def collect(sub: Exchange) -> web.StreamResponse:
            return await router.collect(sub, "POST")

        try:
            resp = await asyncio.wait_for(router.call_origin(sub, collect, bind if sub.era != MODERN else None),
                                          vs.origin_timeout)
        except asyncio.TimeoutError:
            raise _Omitted("timeout") from None
        raw = resp.body if isinstance(resp, web.Response) else None
        try:
            msg = orjson.loads(raw) if isinstance(raw, (bytes, bytearray)) and raw else None
        except orjson.JSONDecodeError:
            msg = None
        if resp.status != 200 or not isinstance(msg, dict) or not isinstance(msg.get("result"), dict):
            raise _Omitted(sub.reason or ("rpc_error" if isinstance(msg, dict) and "error" in msg else "invalid"))
        return msg["result"]


def params_of(ex: Exchange) -> dict[str, Any]:
    params = ex.message.get("params") if isinstance(ex.message, dict) else None
    return dict(params) if isinstance(params, dict) else {}
