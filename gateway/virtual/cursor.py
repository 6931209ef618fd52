"""The opaque cursor of a merged list: which origins still have pages, and their own cursors.

A client gets ``nextCursor`` for the merged list, never an origin's: it is the
state of every origin still listing, signed (HMAC-SHA256 with the virtual
server's key) and bound to the virtual server and method, so a client can
neither forge an origin's cursor nor replay a tools cursor on prompts.  With
several replicas, ``cursor_secret`` gives them one key; otherwise a cursor is
only good on the replica that made it (a random key per process).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import orjson

from ..errors import GatewayError, INVALID_PARAMS

MAX_CURSOR = 4096     # bytes: a cursor is small; anything longer is refused before decoding
_MAC = 16             # bytes of HMAC kept


class InvalidCursor(GatewayError):
    status = 200
    code = INVALID_PARAMS
    reason = "cursor_invalid"


def encode(key: bytes, virtual: str, method: str, pending: dict[str, str | None]) -> str:
    """``pending``: origin -> its next cursor (None: start its list)."""
    payload = orjson.dumps([virtual, method, pending])
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:_MAC]
    return base64.urlsafe_b64encode(mac + payload).decode().rstrip("=")


def decode(key: bytes, virtual: str, method: str, cursor: object) -> dict[str, str | None]:
    """The pending origins; ``InvalidCursor`` for anything this server did not issue for ``method``."""
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR:
        raise InvalidCursor("Invalid params: unknown cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise InvalidCursor("Invalid params: unknown cursor") from None
    mac, payload = raw[:_MAC], raw[_MAC:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()[:_MAC]):
        raise InvalidCursor("Invalid params: unknown cursor")
    v, m, pending = orjson.loads(payload)
    if v != virtual or m != method or not isinstance(pending, dict):
        raise InvalidCursor("Invalid params: unknown cursor")
    return pending
