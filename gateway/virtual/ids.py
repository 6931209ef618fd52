"""The ids a 2025-11-25 virtual session shows its client in place of an origin's.

- **Server-to-client request ids.**  A request an origin sends (sampling,
  elicitation, roots) is relayed with the id ``~<payload>.<mac>``, where the
  payload is ``[origin, original id]``; the client's answer names that id, so
  the gateway knows which origin it answers and restores the original id, with
  its JSON type.  The MAC (the event-id key, shared through the store, so any
  replica verifies) binds it to the virtual session and principal: a forged or
  foreign id is refused, never forwarded.
- **Merged GET stream event ids.**  Each event's id is ``~<payload>.<mac>``
  where the payload is ``{origin: the origin's last event id}`` for every origin
  of the merged stream so far: a client that reconnects with it resumes every
  origin where it left off.

Both are capped (``MAX_ID``) before decoding; an id of a POST's stream (one
origin) is the stream stage's own (``stages/stream.py``).
"""
from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

import orjson

from ..stages.stream import EventIds

MAX_ID = 4096            # characters: an id longer than this was not minted here
_REQUEST = "\x00virtual-request"
_MERGED = "\x00virtual-merged"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _payload(presented: Any) -> tuple[str, str] | None:
    if not isinstance(presented, str) or len(presented) > MAX_ID or presented[:1] != "~" \
            or presented.count(".") != 1:
        return None
    payload, mac = presented[1:].split(".")
    return payload, mac


def _decode(payload: str) -> Any:
    try:
        return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None


class VirtualIds:
    def __init__(self, keys: EventIds) -> None:
        self._keys = keys

    def request_id(self, sid: str, principal: str, origin: str, rpc_id: Any) -> str:
        return self._mint(_REQUEST, sid, principal, [origin, rpc_id])

    def original(self, sid: str, principal: str, presented: Any) -> tuple[str, Any] | None:
        """``(origin, original id)`` of an id ``request_id`` minted for this session, else None."""
        value = self._open(_REQUEST, sid, principal, presented)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], (str, int)) and not isinstance(value[1], bool)):
            return None
        return value[0], value[1]

    def merged(self, sid: str, principal: str, positions: dict[str, str]) -> str:
        return self._mint(_MERGED, sid, principal, positions)

    def positions(self, sid: str, principal: str, presented: str) -> dict[str, str] | None:
        """Every origin's last event id in a merged-stream id minted for this session, else None."""
        value = self._open(_MERGED, sid, principal, presented)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            return None
        return value

    def _mint(self, domain: str, sid: str, principal: str, value: Any) -> str:
        payload = _b64(orjson.dumps(value))
        return f"~{payload}.{self._keys.sign(domain, sid, principal, payload)}"

    def _open(self, domain: str, sid: str, principal: str, presented: Any) -> Any:
        """The value an id ``_mint`` made for this domain, session and principal, else None."""
        parts = _payload(presented)
        if parts is None or not hmac.compare_digest(parts[1], self._keys.sign(domain, sid, principal, parts[0])):
            return None
        return _decode(parts[0])


def is_merged(presented: str) -> bool:
    """A virtual id (``~...``) rather than an origin stream's id minted by the stream stage."""
    return presented[:1] == "~"
