"""The admin listener: /healthz, /readyz and /metrics, never on the public port."""
from __future__ import annotations

import os
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from .telemetry.metrics import flush as flush_metrics


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class WorkerProcesses:
    """``process_*`` series for every live worker under ``--workers`` (label ``pid``).

    prometheus_client's own process collector describes only the process that
    renders the scrape; here every worker that has metric files in the shared
    directory and is still alive (and still a gateway: pids are reused) is read
    from /proc.
    """

    def __init__(self, directory: str) -> None:
        self._dir = directory

    def _pids(self) -> set[int]:
        pids = set()
        for name in os.listdir(self._dir):
            tail = name.rsplit("_", 1)[-1]
            if tail.endswith(".db") and tail[:-3].isdigit():
                pids.add(int(tail[:-3]))
        return pids

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rss = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes, per worker.",
                                labels=["pid"])
        cpu = CounterMetricFamily("process_cpu_seconds_total", "User and system CPU time, per worker.",
                                  labels=["pid"])
        fds = GaugeMetricFamily("process_open_fds", "Open file descriptors, per worker.", labels=["pid"])
        started = GaugeMetricFamily("process_start_time_seconds", "Start time since the epoch, per worker.",
                                    labels=["pid"])
        boot = _boot_time()
        for pid in sorted(self._pids()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if b"gateway" not in fh.read():
                        continue
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
                n_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue            # gone between the listing and the read
            label = [str(pid)]
            cpu.add_metric(label, (int(fields[11]) + int(fields[12])) / _TICKS)
            rss.add_metric(label, int(fields[21]) * _PAGE)
            fds.add_metric(label, n_fds)
            started.add_metric(label, boot + int(fields[19]) / _TICKS)
        return [rss, cpu, fds, started]


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _registry() -> Any:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(WorkerProcesses(directory))
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
