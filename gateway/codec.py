"""The one strict JSON-RPC codec, used in both directions.

Every JSON-RPC message the gateway acts on (a client's request body, an
upstream's JSON reply, each SSE event's data, live or replayed) goes through
``decode``.  The rules are stricter than any peer's, because a peer more
lenient than the gateway would act on something the gateway never checked:

- UTF-8 only, no byte-order mark; lone surrogates refused.
- Duplicate object keys refused (parsers disagree on which copy wins).
- Non-finite numbers (``NaN``, ``Infinity``, ``1e400``) and integers that do
  not fit 64 bits refused (parsers disagree on what they become).
- Nesting bounded: what orjson can serialise again (254 levels); real MCP
  messages stay under ~20.
- The envelope is exactly one of request, notification, result or error,
  with no other members.

What is forwarded is ``Message.raw``: the input bytes when they are proven to
be the canonical serialisation of the decoded value (``orjson.dumps(value) ==
raw``, the common case: SDKs write compact JSON), otherwise the gateway's own
serialisation of the value that was checked.  A hook that changes the value
re-encodes it (``encode``).
"""
from __future__ import annotations

import json
from typing import Any

import orjson

from .errors import CodecError  # noqa: F401 - raised here, re-exported: the codec's error

REQUEST = "request"
NOTIFICATION = "notification"
RESULT = "result"
ERROR = "error"

_INT_MIN = -(2 ** 63)
_INT_MAX = 2 ** 64 - 1
_ENVELOPE = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})


class Message:
    """One decoded JSON-RPC message.  ``raw`` is what the gateway forwards."""

    __slots__ = ("value", "kind", "raw", "id", "method")

    def __init__(self, value: dict[str, Any], kind: str, raw: bytes) -> None:
        self.value = value
        self.kind = kind
        self.raw = raw
        self.id = value.get("id")
        self.method: str | None = value.get("method")

    def replace(self, value: dict[str, Any]) -> "Message":
        """The same message after a hook changed (or substituted) its value."""
        if value is self.value:
            self.raw = orjson.dumps(value)     # changed in place: serialise what is now checked
            return self
        return classify(value, orjson.dumps(value))


# -- strict JSON ---------------------------------------------------------------------


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise CodecError("duplicate object key", "duplicate_key")
    return out


def _constant(name: str) -> Any:
    raise CodecError(f"non-finite number {name}", "non_finite_number")


def _int(text: str) -> int:
    if len(text) > 20:
        raise CodecError("integer out of range", "number_out_of_range")
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise CodecError("integer out of range", "number_out_of_range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise CodecError("number out of range", "number_out_of_range")
    return value


_STRICT = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int,
                           parse_float=_float)


def loads(raw: bytes | str) -> tuple[Any, bytes]:
    """Strictly parse one JSON text: ``(value, bytes to forward)``.  Raises ``CodecError``."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as exc:    # lone surrogates in text the gateway decoded
            raise CodecError("text is not valid UTF-8", "invalid_utf8") from exc
    try:
        value = orjson.loads(raw)           # UTF-8, no BOM, no NaN, bounded depth
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"invalid JSON: {exc.msg}", "invalid_json") from None
    try:
        canonical = orjson.dumps(value)
    except TypeError:                       # orjson serialises 254 levels at most
        raise CodecError("JSON nested too deep", "too_deep") from None
    if canonical == raw:
        return value, raw                   # proven: no duplicate keys, nothing lossy
    # Whitespace, escapes or number spellings differ: re-check with the strict stdlib
    # decoder (duplicate keys, 64-bit integers), then forward the gateway's own bytes.
    try:
        value = _STRICT.decode(raw.decode("utf-8"))
    except CodecError:
        raise
    except (ValueError, RecursionError) as exc:
        raise CodecError("invalid JSON", "invalid_json") from exc
    return value, orjson.dumps(value)


# -- the envelope ----------------------------------------------------------------------


def classify(value: Any, raw: bytes) -> Message:
    """The JSON-RPC 2.0 envelope of ``value`` as exactly one kind.  Raises ``CodecError``."""
    if isinstance(value, list):
        raise CodecError("JSON-RPC batches are not supported", "batch")
    if not isinstance(value, dict):
        raise CodecError("a JSON-RPC message must be an object", "invalid_envelope")
    if value.get("jsonrpc") != "2.0":
        raise CodecError("jsonrpc must be \"2.0\"", "invalid_envelope")
    if not _ENVELOPE.issuperset(value):
        raise CodecError("unknown JSON-RPC envelope member", "invalid_envelope")
    has_id = "id" in value
    rid = value.get("id")
    if "method" in value:
        if "result" in value or "error" in value:
            raise CodecError("a message cannot be both a request and a response", "invalid_envelope")
        if not isinstance(value["method"], str):
            raise CodecError("method must be a string", "invalid_envelope")
        params = value.get("params")
        if "params" in value and not isinstance(params, dict):
            raise CodecError("params must be an object", "invalid_envelope")
        if not has_id:
            return Message(value, NOTIFICATION, raw)
        if not _valid_id(rid):
            raise CodecError("id must be a string or an integer", "invalid_envelope")
        return Message(value, REQUEST, raw)
    if not has_id or "params" in value:
        raise CodecError("message is neither a request, a notification nor a response",
                         "invalid_envelope")
    if "result" in value:
        if "error" in value:
            raise CodecError("a response cannot carry both result and error", "invalid_envelope")
        if not _valid_id(rid):
            raise CodecError("id must be a string or an integer", "invalid_envelope")
        if not isinstance(value["result"], dict):
            raise CodecError("an MCP result must be an object", "invalid_envelope")
        return Message(value, RESULT, raw)
    if "error" in value:
        err = value["error"]
        if rid is not None and not _valid_id(rid):
            raise CodecError("id must be a string, an integer or null", "invalid_envelope")
        if (not isinstance(err, dict) or not isinstance(err.get("code"), int)
                or isinstance(err.get("code"), bool) or not isinstance(err.get("message"), str)
                or not {"code", "message", "data"}.issuperset(err)):
            raise CodecError("error must be {code, message[, data]}", "invalid_envelope")
        return Message(value, ERROR, raw)
    raise CodecError("message is neither a request, a notification nor a response", "invalid_envelope")


def _valid_id(rid: Any) -> bool:
    return isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))


def decode(raw: bytes | str) -> Message:
    """Strictly parse and classify one JSON-RPC message.  Raises ``CodecError``."""
    value, forward = loads(raw)
    return classify(value, forward)


def deeper_than(value: Any, limit: int) -> bool:
    """Does ``value`` nest objects/arrays more than ``limit`` levels?  Iterative: no recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def encode(value: Any) -> bytes:
    return orjson.dumps(value)


# -- media types -------------------------------------------------------------------------

JSON = "json"
SSE = "sse"


def media_type(header: str | None) -> tuple[str | None, str | None]:
    """``(JSON | SSE | None, problem)`` for a Content-Type value.

    Type and parameter names are case-insensitive (RFC 9110 §8.3.1), so
    ``Text/Event-Stream`` is SSE; a ``charset`` other than UTF-8 is a problem
    (the codec reads UTF-8 only), as is anything but JSON or SSE.
    """
    if header is None:
        return None, "missing"
    if len(header) > 256:
        return None, "malformed"
    kind, _, params = header.partition(";")
    kind = kind.strip().lower()
    if kind == "application/json":
        found: str | None = JSON
    elif kind == "text/event-stream":
        found = SSE
    else:
        return None, "unsupported"
    for param in params.split(";") if params else ():
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return None, "charset"
    return found, None
