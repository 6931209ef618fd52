"""The admin listener: /healthz, /readyz and /metrics, never on the public port."""
from __future__ import annotations

import os
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from .telemetry.metrics import flush as flush_metrics


def _registry() -> Any:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return DEFAULT_REGISTRY


def make_admin_app(readiness: Callable[[], Any]) -> web.Application:
    """``readiness`` is an async callable returning (ok: bool, details: dict)."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ok, details = await readiness()
        return web.json_response({"status": "ready" if ok else "not ready", **details},
                                 status=200 if ok else 503)

    async def metrics(_request: web.Request) -> web.Response:
        flush_metrics()     # the request path tallies; see telemetry.metrics
        body = generate_latest(_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
