"""SSE pass-through: how soon each event of a streamed tool call reaches the client.

The upstream's ``stream`` tool sends ``PROGRESS_EVENTS`` progress notifications and then
the result, ``INTERVAL_MS`` apart, the first at once. A pass-through that buffers shows
up as a late first event; one that drops progress shows up as missing events. Rates are
low here, so a Python aiohttp client is accurate enough (wrk is not needed).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .mcp import McpSession, iter_sse, request_headers

PROGRESS_EVENTS = 4
INTERVAL_MS = 100
EXPECTED_EVENTS = PROGRESS_EVENTS + 1
REQUEST_TIMEOUT_S = 10.0


@dataclass
class SseResult:
    conc: int
    sessions: int
    n: int
    headers_ms: list[float] = field(default_factory=list)
    events_ms: list[list[float]] = field(default_factory=list)  # per request, per event
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"conc": self.conc, "sessions": self.sessions, "n": self.n,
                "headers_ms": self.headers_ms, "events_ms": self.events_ms,
                "errors": self.errors}


async def _one_call(http: aiohttp.ClientSession, session: McpSession, seq: int,
                    result: SseResult) -> None:
    rpc_id = f"sse-{seq}"
    token = f"progress-{seq}"
    msg = {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
           "params": {"name": "stream", "_meta": {"progressToken": token},
                      "arguments": {"count": PROGRESS_EVENTS, "interval_ms": INTERVAL_MS}}}
    body = json.dumps(msg)
    headers = request_headers(msg, session.session_id, session.extra_headers)
    times: list[float] = []
    t0 = time.perf_counter()
    async with http.post(session.url, data=body, headers=headers) as resp:
        t_headers = time.perf_counter()
        ctype = resp.headers.get("Content-Type", "")
        if resp.status != 200 or not ctype.startswith("text/event-stream"):
            raise RuntimeError(f"HTTP {resp.status} {ctype!r}: {(await resp.text())[:200]}")
        progress = 0
        async for event in iter_sse(resp.content):
            times.append((time.perf_counter() - t0) * 1e3)
            if event.get("method") == "notifications/progress":
                if event["params"].get("progressToken") != token:
                    raise RuntimeError(f"progress for another request: {event['params']}")
                progress += 1
            elif event.get("id") == rpc_id:
                if "result" not in event:
                    raise RuntimeError(f"error result: {event}")
                break
            else:
                raise RuntimeError(f"unexpected event: {str(event)[:200]}")
    result.headers_ms.append((t_headers - t0) * 1e3)
    result.events_ms.append(times)
    if progress != PROGRESS_EVENTS or len(times) != EXPECTED_EVENTS:
        raise RuntimeError(f"{len(times)}/{EXPECTED_EVENTS} events, {progress} progress")


async def run_sse(url: str, extra_headers: dict[str, str], conc: int, n: int,
                  sessions: int) -> SseResult:
    """``n`` streamed calls from ``conc`` workers over ``sessions`` MCP sessions (1 or conc)."""
    result = SseResult(conc=conc, sessions=sessions, n=n)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        opened = [await McpSession(url, dict(extra_headers)).open(http) for _ in range(sessions)]
        counter = iter(range(n))

        async def worker(w: int) -> None:
            session = opened[w % len(opened)]
            for seq in counter:
                try:
                    await _one_call(http, session, seq, result)
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError,
                        ValueError) as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:300])

        await asyncio.gather(*(worker(w) for w in range(conc)))
    return result
