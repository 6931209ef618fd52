"""JSON-RPC parsing and the 2026-07-28 header/body consistency check.

Later stages authorize on the *body*; an upstream may route on the
``Mcp-Method``/``Mcp-Name`` headers.  If the two disagreed, a request could be
authorized as one call and executed as another, so any mismatch is refused
here with 400 / -32020 before anything else looks at the message.
"""
from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any, Awaitable

from aiohttp import web

from .. import codec
from ..errors import (
    BadRequest, BodyTooLarge, HeaderMismatch, ParseError, RequestTimeout, UnsupportedMediaType,
)
from ..pipeline import MODERN

if TYPE_CHECKING:
    from ..config.model import Config
    from ..pipeline import Exchange

MODERN_FROM = "2026-07-28"
# Methods whose target is mirrored in Mcp-Name, and where it lives in params.
_NAME_PARAM = {"tools/call": "name", "resources/read": "uri", "prompts/get": "name"}
_PV_META = "io.modelcontextprotocol/protocolVersion"


def decode_header_value(value: str) -> str:
    """Undo the ``=?base64?...?=`` sentinel used for non-ASCII header values."""
    # (A slice comparison first: str.startswith parses its arguments the slow way.)
    if value[:2] == "=?" and value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except ValueError as exc:   # binascii.Error, UnicodeDecodeError, and non-ASCII text (str input)
            raise HeaderMismatch("malformed base64 header value", reason="header_malformed") from exc
    return value


class Parse:
    name = "parse"

    def __init__(self, config: "Config") -> None:
        self._max = config.limits.max_body_bytes
        self._body_timeout = config.limits.body_timeout

    async def on_request(self, ex: "Exchange") -> None:
        pending = self.check(ex)
        if pending is not None:
            await pending

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        """``on_request`` without a coroutine when the whole body has already arrived (pipeline.py).

        The body is taken from the request's stream once, here, and lives in
        ``ex.body`` (nothing else reads the request body).
        """
        req = ex.request
        headers = req.headers
        version = headers.get("MCP-Protocol-Version")
        ex.protocol_version = version
        if version is not None and version >= MODERN_FROM:
            ex.era = MODERN
        if req.method != "POST":
            return None
        ctype = headers.get("Content-Type")
        if ctype != "application/json" and codec.media_type(ctype)[0] != codec.JSON:
            raise UnsupportedMediaType("Content-Type must be application/json (UTF-8)")
        coding = headers.get("Content-Encoding")
        if coding is not None and coding.strip().lower() != "identity":
            # Decoding would mean inflating attacker bytes; no MCP SDK compresses requests.
            raise UnsupportedMediaType("Content-Encoding is not accepted; send the body unencoded",
                                       reason="unsupported_content_encoding")
        length = req.content_length
        if length is not None and length > self._max:
            raise BodyTooLarge(f"request body exceeds {self._max} bytes")
        content = req.content
        if content.is_eof() and not content.at_eof():
            # Everything arrived and nothing has read it: what request.read() would return.
            body = content.read_nowait()
            if len(body) > self._max:
                raise BodyTooLarge(f"request body exceeds {self._max} bytes")
            self._message(ex, req.headers, body)
            return None
        return self._read(ex)

    async def _read(self, ex: "Exchange") -> None:
        try:
            body = await asyncio.wait_for(ex.request.read(), self._body_timeout)
        except web.HTTPRequestEntityTooLarge as exc:
            raise BodyTooLarge(f"request body exceeds {self._max} bytes") from exc
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self._body_timeout:g} s",
                                 headers={"Connection": "close"}) from None
        self._message(ex, ex.request.headers, body)

    def _message(self, ex: "Exchange", headers: Any, body: bytes) -> None:
        try:
            # One strict codec (codec.py): what is forwarded is what was parsed and classified.
            message = codec.decode(body)
        except codec.CodecError as exc:
            if exc.reason == "batch":
                raise BadRequest("JSON-RPC batches are not supported (removed in MCP 2025-06-18); "
                                 "send one message per request", reason="batch_rejected") from None
            if exc.reason == "invalid_envelope":
                raise BadRequest(f"body must be a single JSON-RPC 2.0 message: {exc}",
                                 reason="invalid_jsonrpc") from None
            raise ParseError(f"request body is not strict JSON ({exc.reason})") from None
        ex.body = message.raw
        ex.message = msg = message.value
        ex.rpc_id = msg.get("id")
        ex.method = method = message.method
        ex.is_request = message.kind is codec.REQUEST
        params = msg.get("params")
        field = _NAME_PARAM.get(method) if method else None
        if field is not None and params is not None:
            target = params.get(field)
            if not isinstance(target, str):
                raise BadRequest(f"params.{field} must be a string", reason="invalid_params")
            ex.name = target
            if method == "tools/call":
                ex.arguments = params.get("arguments")
        self._check_headers(ex, headers, method, params)

    @staticmethod
    def _check_headers(ex: "Exchange", headers: Any, method: str | None, params: Any) -> None:
        hdr_method = headers.get("Mcp-Method")
        hdr_name = headers.get("Mcp-Name")
        if ex.era == MODERN and method is not None:
            if hdr_method is None:
                raise HeaderMismatch("Mcp-Method header is required", reason="header_missing")
            if method in _NAME_PARAM and hdr_name is None:
                raise HeaderMismatch("Mcp-Name header is required", reason="header_missing")
        # Whatever the era the header selects, a body that names its version must agree with it:
        # otherwise the gateway would handle one era and the upstream read the other.
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and _PV_META in meta and meta[_PV_META] != ex.protocol_version:
            raise HeaderMismatch("MCP-Protocol-Version header does not match the body",
                                 reason="header_mismatch")
        if hdr_method is not None and decode_header_value(hdr_method) != method:
            raise HeaderMismatch("Mcp-Method header does not match the body", reason="header_mismatch")
        if hdr_name is not None and decode_header_value(hdr_name) != (ex.name if method in _NAME_PARAM else None):
            raise HeaderMismatch("Mcp-Name header does not match the body", reason="header_mismatch")
