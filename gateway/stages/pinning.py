"""Pinning: no tool definition reaches the model unless it is the approved one.

Runs after authz (a refused tool must look unknown before pinning could say
"held"); its response hook therefore runs *before* authz's list filter and
sees the upstream's whole tool list.  ``on_request`` fires once per client
message of a server whose ``pinning.mode`` is not ``off``:

- ``tools/list``: the approved set is made available (lock file re-read if it
  changed; a tofu pin loaded or, on first sight, established from a complete
  side fetch), then a hook inspects every page of the result (JSON or each
  SSE event): fingerprints, change kinds, poisoning findings.  Held tools are
  removed from the page (``enforce``/``tofu``, or a blocking finding); the rest
  is relayed and the catalog updated.  A listing's last page completes it:
  removed tools are reported and the tool-set fingerprint recorded.
- ``tools/call``: refused with ``ToolHeld`` (-32005) when the tool's current
  definition is not approved.  "Current" is the catalog's, refreshed by a side
  fetch when this replica has not seen a complete listing, when it is older
  than ``recheck_after``, or after ``notifications/tools/list_changed``.
- every SSE stream of the server (GET streams, ``subscriptions/listen``, call
  streams) is watched for ``notifications/tools/list_changed``, which marks the
  catalog stale here and, through the store, on every replica.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import structlog

from ..errors import (
    GatewayError, ToolHeld, Unavailable, UpstreamAuthRefused, UpstreamInvalid, UpstreamTimeout,
    UpstreamUnavailable,
)
from ..inspect.catalog import Entry, ToolCatalog
from ..inspect.pin_lists import Listing, ListJudge, too_deep
from ..inspect.pin_signals import Signals, record
from ..inspect.pin_state import ServerPins
from ..inspect.tool_fetch import FetchError, fetch_tools
from ..store.base import StoreError

if TYPE_CHECKING:
    from ..config.model import Config, ServerConfig
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.pinning")
CHANNEL = "pinning"
_REPLAY = "\x00replay"       # no upstream cursor: listing_for() finds no listing for it          # store pub/sub: b"stale:<server>:<replica>" and b"reset:<server>"

FetchFn = Callable[["ServerConfig", "Exchange | None"], Awaitable[list[dict[str, Any]]]]


class Pinning:
    name = "pinning"

    def __init__(self, config: "Config", store: Any, catalog: ToolCatalog, fetch: FetchFn) -> None:
        self.store = store
        self.catalog = catalog
        self._configs = config.servers
        self.signals = Signals()
        self._fetch = fetch
        pins_dir = config.pinning_dir or os.path.dirname(os.path.abspath(config.path))
        self.servers: dict[str, ServerPins] = {
            name: ServerPins(name, s.pinning, pins_dir, self.signals)
            for name, s in config.servers.items() if s.pinning is not None and s.pinning.enabled
        }
        self.lists = ListJudge(self.servers, catalog, self.signals, config.limits.max_tools_per_page)
        self._refreshing: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._replica = secrets.token_hex(4)   # to ignore our own stale notices
        self._watch = _Watch(self)
        # Subscribed before the store starts: RedisStore subscribes the pub/sub
        # connection to the channels it knows at start.
        store.subscribe(CHANNEL, self._on_message)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        for st in self.servers.values():
            st.check_lock(force=True)
            if st.cfg.mode == "enforce" and st.lock is None:
                log.error("pins.no_lock_file", server=st.name, path=st.lock_path,
                          detail="mode enforce without a lock file: every tool is held; "
                                 f"run `mcp-gateway pins fetch {st.name}`")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def reload(self) -> None:
        """Re-read every lock file now (SIGHUP)."""
        for st in self.servers.values():
            st.check_lock(force=True)

    async def _on_message(self, _channel: str, message: bytes) -> None:
        what, _, rest = message.decode("utf-8", "replace").partition(":")
        server, _, origin = rest.partition(":")
        st = self.servers.get(server)
        if st is None:
            return
        if what == "stale" and origin != self._replica:
            self.catalog.mark_stale(server)
            log.info("pins.stale_remote", server=server)
        elif what == "reset":
            st.forget_tofu()
            self.catalog.mark_stale(server)

    def pinned_names(self, server: str) -> Any:
        """The names of the server's approved tools (lock file, or tofu pins once loaded), or None."""
        st = self.servers.get(server)
        approved = st.approved if st is not None else None
        return approved.tools if approved is not None else None

    # -- requests ---------------------------------------------------------------

    async def on_request(self, ex: "Exchange") -> None:
        """Fires after authz; ``ex.method``/``ex.name``/``ex.message`` are set for POSTs."""
        pending = self.check(ex)
        if pending is not None:
            await pending

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        """``on_request`` without a coroutine for a call to a tool already judged (see pipeline.py)."""
        st = self.servers.get(ex.server.name)
        if st is None:
            return None
        method = ex.method
        if method == "tools/call":
            if not self._call_judged(st, ex):
                return self._call(st, ex)
            ex.response_hooks.append(self._watch)
        elif method == "tools/list":
            return self._list(st, ex)
        elif method == "subscriptions/listen" or (method is None and ex.request.method == "GET"):
            ex.response_hooks.append(self._watch)
        return None

    async def _list(self, st: ServerPins, ex: "Exchange") -> None:
        st.check_lock(force=True)
        await self._ensure(st, ex)
        params = ex.message.get("params") if isinstance(ex.message, dict) else None
        cursor = params.get("cursor") if isinstance(params, dict) else None
        if ex.replay:
            cursor = _REPLAY      # a replayed page is checked like any page but never completes a listing
        ex.response_hooks.append(_ListHook(self, st, cursor if isinstance(cursor, str) else None))

    async def _call(self, st: ServerPins, ex: "Exchange") -> None:
        await self._check_call(st, ex)
        ex.response_hooks.append(self._watch)

    async def _ensure(self, st: ServerPins, ex: "Exchange | None") -> None:
        try:
            await st.ensure(self.store, lambda e: self._fetch_live(st, e), ex)
        except StoreError as exc:
            if st.holding:
                raise Unavailable("tool pins are unavailable (store unreachable); failing closed",
                                  reason="pins_unavailable") from exc
            log.warning("pins.store_unavailable", server=st.name)
        except GatewayError:
            if st.holding:
                raise
            log.warning("pins.first_fetch_failed", server=st.name)

    async def _fetch_live(self, st: ServerPins, ex: "Exchange | None") -> list[dict[str, Any]]:
        try:
            tools = await self._fetch(self._configs[st.name], ex)
            return [t for t in tools if not too_deep(st.name, t)]
        except FetchError as exc:
            err = {"upstream_timeout": UpstreamTimeout, "upstream_auth_refused": UpstreamAuthRefused,
                   "upstream_unavailable": UpstreamUnavailable}.get(exc.reason, UpstreamInvalid)
            raise err(f"could not read the upstream's tools to check them: {exc}") from exc

    # -- tools/call -----------------------------------------------------------------

    def _call_judged(self, st: ServerPins, ex: "Exchange") -> bool:
        """True when ``_check_call`` would pass without awaiting anything: an approved set is
        in force, the catalog is fresh, and the tool's verdict is current and not held.
        Everything else (refreshes, holds, unknown tools) takes ``_check_call``."""
        now = time.monotonic()
        st.check_lock(now=now)
        if not st.settled:
            return False
        cat = self.catalog.server(st.name)
        if not cat.fresh(st.cfg.recheck_after, now):
            return False
        tool = ex.name or ""
        entry = cat.tools.get(tool)
        if entry is None or entry.held or entry.print is None or entry.version != st.version:
            return False
        if entry.kinds:
            self.signals.call_warned(st.name, tool, entry.kinds)
        return True

    async def _check_call(self, st: ServerPins, ex: "Exchange") -> None:
        server, tool = st.name, ex.name or ""
        st.check_lock()
        await self._ensure(st, ex)
        cat = self.catalog.server(server)
        if not cat.fresh(st.cfg.recheck_after):
            await self._refresh(st, ex)
        entry = cat.tools.get(tool)
        if entry is not None and (entry.print is None or entry.version != st.version):
            entry = self.lists.reevaluate(st, entry)
        if entry is not None and not entry.held:
            if entry.kinds:
                self.signals.call_warned(server, tool, entry.kinds)
            return
        if entry is None:
            approved = st.approved
            if approved is None or tool not in approved.tools:
                # Never listed, never approved: no definition reached the model through
                # the gateway, so there is nothing to pin; the upstream answers as it would
                # for any unknown name (policy decides whether such calls pass at all).
                self.signals.call_warned(server, tool, ("tool_unlisted",))
                return
            kinds: tuple[str, ...] = ("tool_removed",)   # approved, gone from the list, still called
        else:
            kinds = entry.blocking
        if not st.holding and (entry is None or not _blocking_findings(entry)):
            self.signals.call_warned(server, tool, kinds)
            return
        self.signals.call_held(server, tool, kinds)
        record(ex, {"tool": tool, "action": "held", "kinds": list(kinds)})
        why = ("its definition is not the approved one" if entry is not None
               else "it was approved but is no longer in the server's tool list")
        raise ToolHeld(f"Tool {tool!r} is held for review: {why}. An operator must approve it "
                       f"(mcp-gateway pins diff/approve {server}).", data={"tool": tool, "kinds": list(kinds)})

    async def _refresh(self, st: ServerPins, ex: "Exchange") -> None:
        """Fetch and check the complete live list (one fetch per server at a time)."""
        fut = self._refreshing.get(st.name)
        if fut is None:
            fut = self._refreshing[st.name] = asyncio.ensure_future(self._do_refresh(st, ex))
            fut.add_done_callback(lambda _f, n=st.name: self._refreshing.pop(n, None))
        try:
            await asyncio.shield(fut)
        except GatewayError:
            if st.holding:
                raise
            log.warning("pins.refresh_failed", server=st.name)

    async def _do_refresh(self, st: ServerPins, ex: "Exchange") -> None:
        tools = await self._fetch_live(st, ex)
        listing = Listing(st.version)
        self.lists.inspect_page(st, None, tools, listing)
        self.lists.complete(st, None, listing)

    async def refresh_tools(self, ex: "Exchange") -> None:
        """Fill the catalog with the server's live tools (for the policy stage's annotation
        lookups on a replica that has not relayed a listing).  Raises ``GatewayError``."""
        st = self.servers.get(ex.server.name)
        if st is not None:
            await self._ensure(st, ex)
            await self._refresh(st, ex)
            return
        try:
            tools = await self._fetch(ex.server, ex)
        except FetchError as exc:
            raise UpstreamUnavailable(f"could not read the upstream's tools: {exc}") from exc
        self.catalog.update(ex.server.name, tools)

    # -- list_changed on any stream ----------------------------------------------------

    def mark_stale(self, server: str) -> None:
        self.catalog.mark_stale(server)
        log.info("pins.list_changed", server=server)
        task = asyncio.get_running_loop().create_task(self._publish(f"stale:{server}:{self._replica}".encode()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, message: bytes) -> None:
        try:
            await self.store.publish(CHANNEL, message)
        except StoreError:
            log.warning("pins.publish_failed")


class _Watch:
    """Response hook for any stream of a pinned server: notices ``notifications/tools/list_changed``.

    """

    __slots__ = ("stage",)
    readonly = True          # never changes a message (response.py need not serialise it again)

    def __init__(self, stage: "Pinning") -> None:
        self.stage = stage

    def __call__(self, ex: "Exchange", message: dict[str, Any]) -> dict[str, Any]:
        if message.get("method") == "notifications/tools/list_changed":
            self.stage.mark_stale(ex.server.name)
        return message


class _ListHook:
    """Response hook for one ``tools/list`` exchange (every message of the response)."""

    __slots__ = ("stage", "st", "cursor")

    def __init__(self, stage: Pinning, st: ServerPins, cursor: str | None) -> None:
        self.stage = stage
        self.st = st
        self.cursor = cursor

    def __call__(self, ex: "Exchange", message: dict[str, Any]) -> dict[str, Any] | None:
        if "method" in message:   # a notification or server request on the SSE stream
            return self.stage._watch(ex, message)
        result = message.get("result")
        if not isinstance(result, dict) or "tools" not in result:
            return message
        tools = result["tools"]
        if not isinstance(tools, list):
            result["tools"] = []
            return message
        lists, st = self.stage.lists, self.st
        listing = lists.listing_for(st, self.cursor)
        partial = listing is None
        if listing is None:
            listing = Listing(st.version)
        kept = lists.inspect_page(st, ex, tools, listing)
        if len(kept) != len(tools):
            result["tools"] = kept
        next_cursor = result.get("nextCursor")
        if isinstance(next_cursor, str):
            if not partial:
                lists.continue_listing(st, next_cursor, listing)
        elif not partial:
            lists.complete(st, ex, listing)
        return message


def _blocking_findings(entry: Entry) -> bool:
    return any(f.rule in entry.blocking for f in entry.findings)


def make_pinning(config: "Config", store: Any, catalog: ToolCatalog, clients: dict[str, Any],
                 credentials: dict[str, Any]) -> Pinning | None:
    """Build the stage for ``app.py`` (None when no server pins its tools).

    Side fetches are plain JSON-RPC (``tool_fetch``) over the server's own
    control client (``clients[name]``) with its upstream credentials
    (``credentials[name]``, given the caller's exchange, so per-caller
    credentials such as token exchange apply); the era that worked is
    remembered per server.
    """
    if not any(s.pinning is not None and s.pinning.enabled for s in config.servers.values()):
        return None
    eras: dict[str, str] = {}

    async def fetch(server: "ServerConfig", ex: "Exchange | None") -> list[dict[str, Any]]:
        provider = credentials.get(server.name)
        headers = dict(await provider.headers(ex)) if provider is not None and ex is not None else {}
        tools, era = await fetch_tools(clients[server.name], server.url, headers,
                                       timeout=min(server.read_timeout, 30.0), era=eras.get(server.name))
        eras[server.name] = era
        return tools

    return Pinning(config, store, catalog, fetch)
