"""Builds the gateway and fixes the ONE order in which the stages run.

Request path:  hygiene -> authn -> parse -> session -> authz -> pinning -> upstream
Response path: upstream -> pinning hook -> authz hook -> client   (reverse order)

Ordering constraints:
- hygiene first: Origin/Host (DNS rebinding) and tokens in the URL are refused
  before a token is even looked at.
- authn before parse: an unauthenticated caller cannot make the gateway read
  or parse a body.
- parse before session/authz: both decide on the JSON-RPC body, which parse
  has checked against the Mcp-Method/Mcp-Name headers.
- session after authn: a session is bound to the principal that created it.
- authz before pinning: a refused tool must look like an unknown tool, so
  policy answers before pinning could reveal "held for review".  On the way
  back the order reverses, so pinning sees the upstream's whole tool list
  before the policy filter trims it for this caller.
"""
from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import structlog
from aiohttp import web

from . import __version__
from .admin import make_admin_app
from .config.model import Config
from .errors import GatewayError, InsufficientScope, UnknownMount
from .pipeline import Exchange
from .stages.hygiene import Hygiene
from .stages.parse import Parse
from .stages.session import Session
from .store.redis import make_store
from .store.sessions import SessionStore
from .telemetry import audit
from .telemetry.metrics import count_rejection
from .upstream import Forwarder, Upstreams, error_body

log = structlog.get_logger("gateway")

_JSON = {"Content-Type": "application/json"}


class Gateway:
    """App resources, created in ``start`` and closed exactly once in ``close``."""

    def __init__(self, config: Config) -> None:
        from .auth.upstream_creds import IDENTITY_HEADERS, make_credentials
        from .stages.authn import Authn

        self.config = config
        self.store = make_store(config.store.kind, config.store.url, config.store.prefix)
        self.sessions = SessionStore(self.store, config.store.session_ttl)
        self.upstreams = Upstreams(config)
        self.credentials = {name: c for name, s in config.servers.items()
                            if (c := make_credentials(s, config)) is not None}
        self.forwarder = Forwarder(config, self.upstreams, self.sessions, self.credentials,
                                   IDENTITY_HEADERS)
        self.authn = Authn(config, self)
        self.stages: tuple[Any, ...] = (
            Hygiene(config),
            self.authn,
            Parse(config),
            Session(self.sessions),
            *self._policy_stages(),
        )
        self.shutting_down = False
        self.started_at = time.time()

    def _policy_stages(self) -> list[Any]:
        """authz and pinning, when their modules are configured (see module docstring)."""
        stages: list[Any] = []
        # Scopes named in servers.<name>.auth (auth issue): after parse, before authz.
        from .stages.scopes import Scopes
        if (scopes := Scopes.make(self.config)) is not None:
            stages.append(scopes)
        try:
            from .stages.authz import make_authz
        except ImportError:
            make_authz = None
        if make_authz is not None and (stage := make_authz(self.config, self)) is not None:
            stages.append(stage)
        try:
            from .stages.pinning import make_pinning
        except ImportError:
            make_pinning = None
        if make_pinning is not None and (stage := make_pinning(self.config, self)) is not None:
            stages.append(stage)
        return stages

    async def start(self) -> None:
        await self.store.start()
        await self.upstreams.start()
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

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        store_ok = await self.store.ping()
        ok = store_ok and not self.shutting_down
        return ok, {"store": "ok" if store_ok else "unreachable", "config": self.config.path,
                    "version": __version__, "shutting_down": self.shutting_down,
                    "auth": self.authn.status()}

    # -- the request path ---------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        server = self.config.servers.get(request.match_info["server"])
        if server is None:
            count_rejection("_unknown", UnknownMount.reason)
            return self._error(None, UnknownMount("no MCP server is mounted at this path"))
        ex = Exchange(request, server)
        audit.start(ex)
        try:
            for stage in self.stages:
                await stage.on_request(ex)
            return await self.forwarder.forward(ex)
        except GatewayError as err:
            return self._error(ex, err)
        except Exception:
            log.exception("gateway.internal_error", server=server.name)
            return self._error(ex, GatewayError("internal gateway error"))
        finally:
            audit.finish(ex, self.config.logging.audit)

    def _error(self, ex: Exchange | None, err: GatewayError) -> web.Response:
        headers = dict(_JSON)
        headers.update(err.headers)
        if ex is not None and ex.response_headers:
            headers.update(ex.response_headers)
        if isinstance(err, InsufficientScope) and ex is not None and "WWW-Authenticate" not in headers:
            from .auth.challenge import www_authenticate
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


async def _not_found(_request: web.Request) -> web.Response:
    err = UnknownMount("not found; MCP servers are mounted at /mcp/<name>", reason="not_found")
    return web.Response(status=404, body=error_body(err, None), headers=_JSON)


def make_public_app(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=gw.config.limits.max_body_bytes)
    app.router.add_route("OPTIONS", "/mcp/{server}", gw.stages[0].preflight)
    app.router.add_route("*", "/mcp/{server}", gw.handle)
    try:
        from .auth.metadata import routes as auth_routes
    except ImportError:
        auth_routes = None
    if auth_routes is not None:
        app.router.add_routes(auth_routes(gw.config))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


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
    public = web.AppRunner(make_public_app(gw), shutdown_timeout=config.shutdown_grace,
                           access_log=None, handle_signals=False, handler_cancellation=True)
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
        """SIGHUP: every stage with a reload() re-reads its files now (policies, pin lock files)."""
        for stage in gw.stages:
            if hasattr(stage, "reload"):
                stage.reload()

    try:
        loop.add_signal_handler(signal.SIGHUP, reload_files)
    except (NotImplementedError, RuntimeError):
        pass
    try:
        site = web.TCPSite(public, config.listen.host, config.listen.port, reuse_port=reuse_port)
        await site.start()
        admin_site = web.TCPSite(admin, config.admin.host, config.admin.port, reuse_port=reuse_port)
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
        gw.shutting_down = True
        log.info("gateway.stopping", grace_seconds=config.shutdown_grace)
    finally:
        await public.cleanup()
        await admin.cleanup()
        await gw.close()
        audit.WRITER.flush()
        log.info("gateway.stopped")
