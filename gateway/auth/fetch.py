"""Fetching OAuth documents with the gateway's own aiohttp session.

One place for the rules every OAuth fetch follows: HTTPS (loopback excepted),
no redirects (a redirect could point the gateway at keys an attacker
controls), a timeout, a size cap, JSON objects only.  Failures become
``FetchError`` with a short reason; aiohttp's exceptions stop here.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from .netpolicy import url_problem

MAX_DOCUMENT_BYTES = 512 * 1024     # metadata / JWKS / token answers are a few KiB


class FetchError(Exception):
    """An OAuth document could not be fetched; ``reason`` is a short fixed label."""

    def __init__(self, reason: str, detail: str, status: int = 0) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


async def request_json(
    session: aiohttp.ClientSession, method: str, url: str, *, timeout: float,
    data: dict[str, str] | None = None, headers: dict[str, str] | None = None,
    accept_error_json: bool = False,
) -> dict[str, Any]:
    """GET/POST ``url`` and return the JSON object it answers.

    With ``accept_error_json`` a 4xx answer carrying a JSON object is returned
    too (token endpoints answer errors that way); its ``status`` is on the
    ``FetchError`` otherwise.
    """
    if why := url_problem(url, allow_query=True):
        raise FetchError("insecure_url", why)
    hdrs = {"Accept": "application/json"}
    if headers:
        hdrs.update(headers)
    try:
        async with session.request(
            method, url, data=data, headers=hdrs, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise FetchError("unreachable", f"{_safe(url)}: {type(exc).__name__}") from exc
    if len(body) > MAX_DOCUMENT_BYTES:
        raise FetchError("too_large", f"{_safe(url)}: answer larger than {MAX_DOCUMENT_BYTES} bytes", status)
    if 300 <= status < 400:
        raise FetchError("redirect", f"{_safe(url)}: answered a redirect ({status}); redirects are not followed",
                         status)
    ok = 200 <= status < 300 or (accept_error_json and 400 <= status < 500)
    doc: Any = None
    if ok:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
    if not ok:
        raise FetchError("http_status", f"{_safe(url)}: HTTP {status}", status)
    if not isinstance(doc, dict):
        raise FetchError("invalid_json", f"{_safe(url)}: answer is not a JSON object", status)
    if not 200 <= status < 300:
        doc = {**doc, "_status": status}
    return doc


def _safe(url: str) -> str:
    """The URL without query (a query could carry a secret) for log lines."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def metadata_urls(issuer: str) -> list[str]:
    """RFC 8414 first (path-inserted), then OpenID Connect discovery (appended, inserted)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    urls = [f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}{path}/.well-known/openid-configuration"]
    if path:
        urls.append(f"{origin}/.well-known/openid-configuration{path}")
    return urls


async def discover(session: aiohttp.ClientSession, issuer: str, *, timeout: float) -> dict[str, Any]:
    """The issuer's metadata; its ``issuer`` member must equal ``issuer`` exactly (RFC 8414 §3.3)."""
    last: FetchError | None = None
    for url in metadata_urls(issuer):
        try:
            doc = await request_json(session, "GET", url, timeout=timeout)
        except FetchError as exc:
            last = exc
            if exc.reason in ("http_status", "invalid_json"):
                continue        # try the next well-known location
            raise
        if doc.get("issuer") != issuer:
            raise FetchError("issuer_mismatch", f"{_safe(url)}: metadata names issuer "
                             f"{str(doc.get('issuer'))[:200]!r}, expected {issuer!r}")
        return doc
    assert last is not None
    raise FetchError("no_metadata", f"no authorization server metadata for {issuer} ({last})", last.status)
