"""Fingerprints of tool definitions: SHA-256 over RFC 8785 canonical JSON.

A tool's fingerprint covers everything the model sees (name, title,
description, schemas, annotations, ``_meta`` and any field a future spec
adds), so no part of a definition can change without changing the hash.
The canonical form is RFC 8785 (JCS): sorted keys, minimal escaping,
ECMAScript number formatting, the same bytes any other JCS implementation
produces.

The reference implementation (``rfc8785``) costs ~65 µs per tool.  For the
values tool definitions almost always hold (strings, integers in the safe
range, booleans, null, BMP keys) orjson with sorted keys produces the very
same bytes in ~2 µs; ``canonical_json`` checks that precondition and falls
back to ``rfc8785`` otherwise.  ``tests/test_pinning_fingerprint.py`` proves the
two agree on arbitrary JSON (hypothesis).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable

import orjson
import rfc8785

_SAFE_INT = 2**53 - 1
# RFC 8785 orders keys by UTF-16 code units, orjson by code points; they agree
# below the surrogate range, so keys must stay under U+D800 for the fast path.
_KEY_LIMIT = "\ud800"
NAME_FIELDS = frozenset({"name", "title"})   # left out of the body fingerprint (rename detection)


def _fast_ok(value: Any) -> bool:
    """True when orjson's sorted output is byte-identical to RFC 8785 for ``value``."""
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        v = pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is dict:
            for k, item in v.items():
                if type(k) is not str or (not k.isascii() and max(k) >= _KEY_LIMIT):
                    return False
                push(item)
        elif t is list:
            for item in v:
                push(item)
        elif t is int:
            if not -_SAFE_INT <= v <= _SAFE_INT:
                return False
        else:  # float (ECMAScript formatting differs), subclasses, anything exotic
            return False
    return True


def _as_plain(value: Any) -> Any:
    """Plain dict/list/str copies (YAML loaders hand out subclasses); big ints become floats,
    which is how every JSON parser that follows RFC 8785 (I-JSON) reads them."""
    if isinstance(value, dict):
        return {str(k): _as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value if type(value) in (bool, str) or value is None else str(value)
    if isinstance(value, int):
        return value if -_SAFE_INT <= value <= _SAFE_INT else float(value)
    if isinstance(value, float):
        return value
    raise TypeError(f"not a JSON value: {type(value).__name__}")


# A float in orjson's output (no whitespace) is the whole output or follows ":", "," or "[", and has
# a dot or an exponent.  The same bytes inside a string only cause a needless slow path.
_FLOAT = re.compile(rb"[:,\[]-?[0-9]+[.eE]")   # starts with a character class: a fast scan
_SORTED_STRICT = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER


def canonical_json(value: Any, *, fast: bool | None = None) -> bytes:
    """RFC 8785 canonical bytes of a JSON value (``fast``: precomputed ``_fast_ok``)."""
    if fast is None:
        # Cheapest proof first: ASCII-only output (so no key ordering subtleties), no float
        # token, integers within 53 bits (OPT_STRICT_INTEGER raises otherwise).
        try:
            out = orjson.dumps(value, option=_SORTED_STRICT)
        except TypeError:
            out = None
        if out is not None and out.isascii() and out[:1] not in b"-0123456789" and not _FLOAT.search(out):
            return out
        fast = _fast_ok(value)
    if fast:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # e.g. a lone surrogate orjson refuses to encode
            pass
    return rfc8785.dumps(_as_plain(value))


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fingerprint(value: Any) -> str:
    return digest(canonical_json(value))


@dataclass(frozen=True, slots=True)
class ToolPrint:
    """One tool definition, reduced to what pinning compares.

    ``definition`` is the definition as hashed (fields listed in the server's
    ``ignore_fields`` removed); ``body`` is the fingerprint without name and
    title, equal for two tools that differ only in name (a rename).
    """

    name: str
    fingerprint: str
    body: str
    definition: dict[str, Any]


def tool_print(tool: dict[str, Any], ignore: frozenset[str] = frozenset()) -> ToolPrint:
    definition = {k: v for k, v in tool.items() if k not in ignore} if ignore else tool
    name = tool.get("name")
    full = canonical_json(definition)
    body = canonical_json({k: v for k, v in definition.items() if k not in NAME_FIELDS})
    return ToolPrint(name if isinstance(name, str) else "", digest(full), digest(body), definition)


def set_fingerprint(prints: Iterable[tuple[str, str]]) -> str:
    """Fingerprint of a whole tool set: RFC 8785 JSON of ``{name: fingerprint}``."""
    return fingerprint(dict(prints))
