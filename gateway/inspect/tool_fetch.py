"""Fetch an upstream's complete, raw tool list over plain JSON-RPC (both protocol eras).

Used by ``mcp-gateway pins`` and by the pinning stage when it must know the
live definitions before relaying anything (the first tofu pin, a call on a
replica that has not seen a listing, a catalog marked stale).  It keeps the
definitions exactly as the server sent them: an SDK client would parse them
into models and re-serialise, and the fingerprints would no longer match what
the gateway relays.

Era: a 2026-07-28 request (stateless, one POST per page) is tried first; any
refusal falls back to the 2025-11-25 handshake (initialize, list, DELETE).
The client capabilities advertised are the broadest the spec defines, so a
server that registers tools only for capable clients shows all of them.
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from .. import __version__
from .sse import SSEFramer, SSETooLarge

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
MAX_PAGES = 100                 # a paginator that never ends cannot hang a fetch
MAX_BYTES = 16 * 1024 * 1024    # one response, JSON or one SSE event
CAPABILITIES: dict[str, Any] = {
    "sampling": {}, "roots": {"listChanged": True}, "elicitation": {"form": {}, "url": {}},
    "tasks": {"requests": {"sampling": {"createMessage": {}}, "elicitation": {"create": {}}}},
}
CLIENT_INFO = {"name": "mcp-gateway-pinning", "version": __version__}


class FetchError(Exception):
    """The upstream's tool list could not be read; ``reason`` is a closed-set word."""

    def __init__(self, message: str, reason: str = "upstream_invalid") -> None:
        super().__init__(message)
        self.reason = reason


class _Refused(Exception):
    """The era attempt was refused (HTTP 4xx or a JSON-RPC error): try the other era."""


async def fetch_tools(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, *,
                      timeout: float = 15.0, era: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Every tool the upstream lists, in order, and the era that worked (``modern``/``legacy``)."""
    headers = dict(headers or {})
    try:
        async with asyncio.timeout(timeout):
            if era != "legacy":
                try:
                    return await _modern(http, url, headers), "modern"
                except _Refused:
                    if era == "modern":
                        raise FetchError("the upstream refused a 2026-07-28 tools/list", "upstream_refused")
            try:
                return await _legacy(http, url, headers), "legacy"
            except _Refused as exc:
                raise FetchError(f"the upstream refused tools/list: {exc}", "upstream_refused") from exc
    except asyncio.TimeoutError as exc:
        raise FetchError("the upstream did not list its tools in time", "upstream_timeout") from exc
    except aiohttp.ClientError as exc:
        raise FetchError(f"the upstream is unreachable: {type(exc).__name__}", "upstream_unavailable") from exc


async def _modern(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
            "io.modelcontextprotocol/clientCapabilities": CAPABILITIES}
    h = {**headers, "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"}

    async def page(cursor: str | None, rid: int) -> dict[str, Any]:
        params: dict[str, Any] = {"_meta": meta}
        if cursor is not None:
            params["cursor"] = cursor
        result, _ = await _call(http, url, h, {"jsonrpc": "2.0", "id": rid, "method": "tools/list", "params": params})
        return result

    return await _paginate(page)


async def _legacy(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY, "capabilities": CAPABILITIES, "clientInfo": CLIENT_INFO}}
    result, session = await _call(http, url, headers, init)
    version = result.get("protocolVersion") if isinstance(result, dict) else None
    h = dict(headers)
    if session:
        h["Mcp-Session-Id"] = session
    if isinstance(version, str):
        h["MCP-Protocol-Version"] = version
    try:
        await _notify(http, url, h, {"jsonrpc": "2.0", "method": "notifications/initialized"})

        async def page(cursor: str | None, rid: int) -> dict[str, Any]:
            params = {"cursor": cursor} if cursor is not None else {}
            result, _ = await _call(http, url, h, {"jsonrpc": "2.0", "id": rid, "method": "tools/list",
                                                   "params": params})
            return result

        return await _paginate(page)
    finally:
        if session:
            try:
                async with http.delete(url, headers=h, allow_redirects=False) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass   # the upstream expires the session by itself


async def _paginate(page: Any) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    for n in range(MAX_PAGES):
        result = await page(cursor, n + 2)
        items = result.get("tools") if isinstance(result, dict) else None
        if not isinstance(items, list):
            raise FetchError("the upstream's tools/list result has no tools array")
        tools.extend(t for t in items if isinstance(t, dict))
        cursor = result.get("nextCursor")
        if not isinstance(cursor, str):
            return tools
    raise FetchError(f"the upstream's tools/list did not end within {MAX_PAGES} pages")


async def _notify(http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
    h = {**headers, "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with http.post(url, data=orjson.dumps(body), headers=h, allow_redirects=False) as resp:
        await resp.read()


async def _call(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                body: dict[str, Any]) -> tuple[Any, str | None]:
    """POST one request; return (result, Mcp-Session-Id) from a JSON or SSE answer."""
    h = {**headers, "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with http.post(url, data=orjson.dumps(body), headers=h, allow_redirects=False) as resp:
        if resp.status in (401, 403):
            raise FetchError(f"the upstream refused the gateway's credentials (HTTP {resp.status})",
                             "upstream_auth_refused")
        ctype = resp.headers.get("Content-Type", "")
        session = resp.headers.get("Mcp-Session-Id")
        if ctype.startswith("text/event-stream"):
            message = await _sse_response(resp, body["id"])
        else:
            raw = await resp.content.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                raise FetchError("the upstream's answer exceeds the size limit", "upstream_too_large")
            try:
                message = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                message = None
            if message is None or resp.status >= 400:
                raise _Refused(f"HTTP {resp.status}")
    if not isinstance(message, dict):
        raise FetchError("the upstream sent an invalid JSON-RPC answer")
    if "error" in message:
        raise _Refused(f"JSON-RPC error {message['error'].get('code') if isinstance(message['error'], dict) else ''}")
    return message.get("result"), session


async def _sse_response(resp: aiohttp.ClientResponse, rid: Any) -> Any:
    framer = SSEFramer(MAX_BYTES)
    try:
        async for chunk in resp.content.iter_any():
            for ev in framer.feed(chunk):
                if ev.data is None:
                    continue
                try:
                    msg = orjson.loads(ev.data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(msg, dict) and msg.get("id") == rid and ("result" in msg or "error" in msg):
                    return msg
    except SSETooLarge as exc:
        raise FetchError("an SSE event from the upstream exceeds the size limit", "upstream_too_large") from exc
    raise FetchError("the upstream's SSE stream ended without an answer")
