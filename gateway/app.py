"""Builds the gateway and fixes the ONE order in which the stages run, both ways.

Request:   hygiene -> authn -> parse -> session -> stream -> scopes -> authz -> pinning -> streams -> ratelimit
           -> upstream
Head:      upstream status/headers -> session (map ids, DELETE) -> media type (response.py)
Messages:  codec.decode -> stream (admit) -> pinning hook -> authz hook -> results hook -> mask hook
           -> codec.encode -> client

Ordering constraints:
- hygiene first: Origin/Host (DNS rebinding) and tokens in the URL are refused
  before a token is even looked at.
- authn before parse: an unauthenticated caller cannot make the gateway read
  or parse a body.
- parse before session/authz: both decide on the JSON-RPC body, which parse
  has checked against the Mcp-Method/Mcp-Name headers.
- session after authn: a session is bound to the principal that created it.
- stream after session: a Last-Event-ID is bound to the session and principal, and
  a replayed list stream must be marked before authz and pinning hook it.
- on the way back, stream admission first: an answer on a stream that may not carry
  it never reaches a hook, so no hook can be fed a message meant for another request.
- scopes (mount-wide, from the auth config) before authz: the cheapest refusal
  first, and its 403 names the mount's scopes before any per-tool step-up.
- streams (GET streams per principal) and ratelimit last: a request refused by policy
  or held by pinning never takes a stream slot or consumes quota.  Both charge the same
  limiter (exact across replicas with Redis).
- authz before pinning: a refused tool must look like an unknown tool, so
  policy answers before pinning could reveal "held for review".  On the way
  back the order reverses, so pinning sees the upstream's whole tool list
  before the policy filter trims it for this caller.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import structlog
from aiohttp import web

from . import __version__
from .admin import make_admin_app
from .listener import GuardedAppRunner
from .auth.challenge import www_authenticate
from .auth.metadata import routes as auth_routes
from .auth.upstream_creds import IDENTITY_HEADERS, make_credentials
from .config.model import Config
from .errors import GatewayError, InsufficientScope, UnknownMount, UpstreamUnavailable
from .inspect.catalog import ToolCatalog
from .inspect.tool_fetch import FetchError, fetch_tools
from .stages.authn import Authn
from .stages.authz import make_authz
from .stages.hygiene import Hygiene
from .stages.parse import Parse
from .stages.pinning import make_pinning
from .stages.scopes import Scopes
from .pipeline import Exchange, checker
from .ratelimit.limiter import make_limiter
from .stages.mask import Mask
from .stages.results import Results
from .stages.ratelimit import RateLimit
from .stages.session import Session
from .stages.stream import EventIds, Stream
from .stages.streams import StreamQuota
from .response import ResponsePath, error_body
from .store.redis import make_store
from .store.sessions import SessionStore
from .telemetry import audit
from .telemetry.client_address import ClientAddress
from .telemetry import metrics
from .telemetry.metrics import count_rejection
from .telemetry.tracing import SPAN_NAMES, Tracer, forward_recorded, run_recorded
from .upstream import Forwarder, Upstreams
from .virtual.router import VirtualRouter
from .virtual.sessions import VirtualSessions

log = structlog.get_logger("gateway")

_JSON = {"Content-Type": "application/json"}


class Gateway:
    """App resources, created in ``start`` and closed exactly once in ``close``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = make_store(config.store)
        self.sessions = SessionStore(self.store, config.store.session_ttl)
        self.upstreams = Upstreams(config)
        self.credentials = {name: c for name, s in config.servers.items()
                            if (c := make_credentials(s, config)) is not None}
        session = Session(self.sessions, terminate=self._end_upstream_session)
        self.stream = Stream(EventIds(self.store))
        # The response order (see the module docstring): head stages, then per message.
        self.response_path = ResponsePath(head=(session.on_head,), stream=self.stream,
                                          line_limit=config.limits.max_sse_event_bytes)
        self.forwarder = Forwarder(config, self.upstreams, self.response_path, self.credentials,
                                   IDENTITY_HEADERS)
        # The last-seen tool definitions per server: pinning checks them, authz reads
        # their annotations (destructiveHint) for tools/call.
        self.catalog = ToolCatalog()
        self.authn = Authn(config)
        pinning = make_pinning(config, self.store, self.catalog, self.upstreams.clients, self.credentials)
        # A replica that has not relayed a listing yet fetches the live tools on demand.
        self.refresh_tools = pinning.refresh_tools if pinning is not None else self._fetch_tools
        stages: list[Any] = [
            Hygiene(config),
            self.authn,
            Parse(config),
            session,
            self.stream,
            # Registered before the other stages' response hooks, so it runs after them:
            # masking is the last change to a message on its way to the client.
            Mask(config),
            # Registered after Mask, so its hook runs before masking: injection scanning
            # reads the upstream's text, then secrets are masked (in its annotation too).
            Results(config),
        ]
        if (scopes := Scopes.make(config)) is not None:
            stages.append(scopes)                 # mount-wide scopes: cheapest refusal first
        authz = make_authz(config, self.catalog, refresh=self.refresh_tools)
        stages.append(authz)
        self._count_call = authz.count_call
        if pinning is not None:
            stages.append(pinning)
            authz.pinned = pinning.pinned_names
        # Limits last: a refused or held call never consumes quota.  One limiter for both;
        # the rate-limit stage (the last, which virtual servers rely on) starts and closes it.
        limiter = make_limiter(config.store)
        stages.append(StreamQuota(config, limiter))
        stages.append(RateLimit(authz.policies, limiter))
        self.stages: tuple[Any, ...] = tuple(stages)
        # See pipeline.py; a stage that says it has nothing to do (authn with auth mode none:
        # every exchange starts anonymous) is left out of the request path.
        self._checks = tuple(checker(stage) for stage in self.stages if not getattr(stage, "idle", False))
        self._audit = config.logging.audit
        self._log_args = config.logging.log_arguments
        self._client = ClientAddress(config.http.trusted_proxies)
        self.tracer = Tracer(config.tracing)
        # Spans name the stages on the request path (see telemetry.tracing).
        self._named_checks = _named(self.stages)
        # Virtual servers: the front (hygiene, authn, parse) runs against the virtual mount,
        # the rest of the request order against each origin (gateway/virtual/router.py).
        # Session and stream (stages[3:5]) are the virtual server's: the client's headers name
        # the virtual session and stream; the router binds each origin's (virtual/legacy.py).
        assert self.stages[3] is session and self.stages[4] is self.stream
        self.virtual = VirtualRouter(
            config, self.serve,
            front=_named(self.stages[:3]),
            # The virtual server's own policy section is decided between the origin's stages
            # and its rate limits: a call refused at either level never consumes quota.
            origin=_named(self.stages[5:-1]), limits=_named_one(self.stages[-1]),
            forward=self.forwarder.forward,
            collect=self.forwarder.collect, policies=authz.policies, catalog=self.catalog,
            legacy={"sessions": VirtualSessions(self.store, self.sessions, config.store.session_ttl),
                    "session": checker(session), "event_ids": self.stream.ids,
                    "open_stream": self.forwarder.open_stream, "path": self.response_path,
                    "event_limit": config.limits.max_sse_event_bytes})
        self.shutting_down = False
        self.started_at = time.time()

    async def _fetch_tools(self, ex: Exchange) -> None:
        """Fill the catalog with ``ex.server``'s live tools (no pinning configured)."""
        server = ex.server
        provider = self.credentials.get(server.name)
        headers = dict(await provider.headers(ex)) if provider is not None else {}
        try:
            tools, _era = await fetch_tools(self.upstreams.clients[server.name], server.url, headers,
                                            timeout=min(server.read_timeout, 30.0))
        except FetchError as exc:
            raise UpstreamUnavailable(f"could not read the upstream's tools: {exc}") from exc
        self.catalog.update(server.name, tools)

    async def _end_upstream_session(self, ex: Exchange, upstream_sid: str) -> None:
        """End an upstream session whose mapping could not be stored (it would be orphaned)."""
        headers = {"Mcp-Session-Id": upstream_sid, "Accept-Encoding": "identity"}
        if ex.protocol_version:
            headers["MCP-Protocol-Version"] = ex.protocol_version
        provider = self.credentials.get(ex.server.name)
        try:
            if provider is not None:
                headers.update(await provider.headers(ex))
            status = await self.forwarder.send(ex.server, "DELETE", headers)
            log.info("session.upstream_terminated", server=ex.server.name, status=status)
        except Exception as exc:   # best effort: the upstream's own idle expiry is the backstop
            log.warning("session.upstream_terminate_failed", server=ex.server.name, error=type(exc).__name__)

    async def start(self) -> None:
        await self.store.start()
        await self.upstreams.start()
        if self.tracer.exporter is not None:
            await self.tracer.exporter.start()
        for provider in self.credentials.values():
            await provider.start(next(iter(self.upstreams.clients.values())))
        for stage in self.stages:
            if hasattr(stage, "start"):
                await stage.start()

    async def close(self) -> None:
        for stage in reversed(self.stages):
            if hasattr(stage, "close"):
                await stage.close()
        for provider in self.credentials.values():
            await provider.close()
        await self.upstreams.close()
        await self.store.close()
        if self.tracer.exporter is not None:
            await self.tracer.exporter.close()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        store_ok = await self.store.ping()
        ok = store_ok and not self.shutting_down
        return ok, {"store": "ok" if store_ok else "unreachable",
                    "version": __version__, "shutting_down": self.shutting_down,
                    "auth": self.authn.status()}

    # -- the request path ---------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["server"]
        server = self.config.servers.get(name)
        if server is None:
            virtual = self.config.virtual_servers.get(name)
            if virtual is not None:
                return await self.serve(Exchange(request, virtual.mount), self.virtual.run)
            count_rejection("_unknown", UnknownMount.reason)
            if self._audit:
                audit.unknown_mount(request, UnknownMount.status, self._client.of(request))
            return self._error(None, UnknownMount("no MCP server is mounted at this path"))
        return await self.serve(Exchange(request, server))

    async def serve(self, ex: Exchange, run: Any = None) -> web.StreamResponse:
        """``run(ex)`` (default: the stages, then the upstream) with everything an exchange
        gets however it ends: audit, trace, errors.

        Virtual servers call it once for their own exchange and once per sub-exchange to an origin."""
        audit.start(ex)
        trace = ex.trace
        if trace is None and ex.via is None:
            # A virtual server's sub-exchange (``via``) comes with its parent's child, or with
            # none when the parent has none (the same request: begin would find none either).
            trace = ex.trace = self.tracer.begin(ex)
        try:
            if run is not None:
                return await run(ex)
            # A mount's own pipeline, inlined: one coroutine less per request.
            if trace is not None and trace.spans is not None:
                return await self._recorded(ex, trace)
            for check in self._checks:
                pending = check(ex)
                if pending is not None:
                    await pending
            return await self.forwarder.forward(ex)
        except GatewayError as err:
            return self._error(ex, err)
        except Exception:
            log.exception("gateway.internal_error", server=ex.server.name)
            return self._error(ex, GatewayError("internal gateway error"))
        finally:
            if ex.finishers is not None:
                for finish in ex.finishers:
                    finish(ex)
            self._count_call(ex)
            audit.finish(ex, self._audit, self._client, self._log_args)
            if trace is not None:
                self.tracer.end(ex, trace)

    async def _recorded(self, ex: Exchange, trace: Any) -> web.StreamResponse:
        """The request path of a sampled request with span export on: each stage timed."""
        await run_recorded(ex, trace, self._named_checks)
        return await forward_recorded(ex, trace, self.forwarder.forward)

    def _error(self, ex: Exchange | None, err: GatewayError) -> web.Response:
        headers = dict(_JSON)
        headers.update(err.headers)
        if ex is not None and ex.response_headers:
            headers.update(ex.response_headers)
        if isinstance(err, InsufficientScope) and ex is not None and "WWW-Authenticate" not in headers:
                headers["WWW-Authenticate"] = www_authenticate(
                self.config, ex.server, error="insufficient_scope", scopes=err.scopes,
                description="the operation needs additional scopes")
        if ex is not None:
            ex.status = err.status
            ex.outcome = "rejected" if err.status < 500 else "error"
            ex.reason = err.reason
            count_rejection(ex.server.name, err.reason)
        rpc_id = ex.rpc_id if ex is not None else None
        return web.Response(status=err.status, body=error_body(err, rpc_id), headers=headers)


def _named_one(stage: Any) -> tuple[str, Any]:
    """(span name, check) of ``stage`` (spans name the stages: telemetry.tracing)."""
    return SPAN_NAMES.get(stage.name, f"mcp.{stage.name}"), checker(stage)


def _named(stages: Any) -> tuple[tuple[str, Any], ...]:
    """``_named_one`` of each working stage, in order."""
    return tuple(_named_one(stage) for stage in stages if not getattr(stage, "idle", False))


async def _not_found(_request: web.Request) -> web.Response:
    err = UnknownMount("not found; MCP servers are mounted at /mcp/<name>", reason="not_found")
    return web.Response(status=404, body=error_body(err, None), headers=_JSON)


def make_public_app(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=gw.config.limits.max_body_bytes)
    app.router.add_route("OPTIONS", "/mcp/{server}", gw.stages[0].preflight)
    app.router.add_route("*", "/mcp/{server}", gw.handle)
    app.router.add_routes(auth_routes(gw.config))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


def _site(runner: web.AppRunner, listener: Any, reuse_port: bool) -> web.BaseSite:
    """A TCP site for ``listener``; ``::`` means every address, IPv4 included.

    asyncio sets IPV6_V6ONLY on every IPv6 socket it binds, so ``host: "::"`` would
    listen on IPv6 only and a Kubernetes probe or a compose neighbour reaching the pod's
    IPv4 address would be refused. The dual-stack socket is made here instead.
    """
    if listener.host != "::":
        return web.TCPSite(runner, listener.host, listener.port, reuse_port=reuse_port)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::", listener.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return web.SockSite(runner, sock)


async def serve(config: Config, *, reuse_port: bool = False, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``), then drain in-flight requests."""
    gw = Gateway(config)
    try:
        await gw.start()
    except BaseException:
        await gw.close()
        raise
    # handler_cancellation: a client disconnect must reach the upstream at once
    # (see Forwarder._client_gone), not at the next event the gateway writes.
    public = GuardedAppRunner(make_public_app(gw), shutdown_timeout=config.shutdown_grace,
                              access_log=None, handle_signals=False, handler_cancellation=True,
                              header_timeout=config.limits.header_timeout,
                              keepalive_timeout=config.limits.keepalive_timeout,
                              max_connections=config.limits.max_client_connections)
    admin = web.AppRunner(make_admin_app(gw.readiness), access_log=None, handle_signals=False)
    await public.setup()
    await admin.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    def reload_files() -> None:
        """SIGHUP: every stage with a reload() re-reads its files now (policies, pin lock files),
        and the audit file is reopened (log rotation)."""
        for stage in gw.stages:
            if hasattr(stage, "reload"):
                stage.reload()
        audit.WRITER.reopen()

    try:
        loop.add_signal_handler(signal.SIGHUP, reload_files)
    except (NotImplementedError, RuntimeError):
        pass
    # --workers: the tallied per-request metrics reach the shared multiprocess files
    # once a second (a single process flushes when /metrics is rendered).
    flusher = (asyncio.ensure_future(metrics.flush_every(1.0))
               if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None)
    try:
        site = _site(public, config.listen, reuse_port)
        await site.start()
        admin_site = _site(admin, config.admin, reuse_port)
        await admin_site.start()
        if config.auth.mode == "none":
            log.warning("gateway.auth_disabled", detail="auth mode 'none': every caller is anonymous",
                        listen=config.listen.host, loopback=config.listen.is_loopback)
        log.info("gateway.ready", version=__version__, listen=[str(a) for a in public.addresses],
                 admin=[str(a) for a in admin.addresses], servers=sorted(config.servers),
                 store=config.store.kind, auth=config.auth.mode)
        if ready is not None:
            ready.set()
        await stop.wait()
        # The order a rolling update needs: unready first, keep accepting while load
        # balancers notice, then stop accepting and drain in-flight streams.
        gw.shutting_down = True
        log.info("gateway.draining", delay_seconds=config.shutdown_delay, grace_seconds=config.shutdown_grace)
        if config.shutdown_delay > 0:
            await asyncio.sleep(config.shutdown_delay)
        log.info("gateway.stopping", grace_seconds=config.shutdown_grace)
    finally:
        await public.cleanup()          # stops accepting, then waits up to shutdown_grace for handlers
        await admin.cleanup()
        await gw.close()
        if flusher is not None:
            flusher.cancel()
        metrics.flush()
        audit.WRITER.flush()
        log.info("gateway.stopped")
