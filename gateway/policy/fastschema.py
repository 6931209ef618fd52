"""A fast validity check for the JSON Schema subset argument constraints use.

``jsonschema``'s ``is_valid`` costs ~25 µs even for a two-property schema,
half the per-decision budget.  ``compile_check`` turns a schema written in a
common subset into a closure that answers the same yes/no in ~1-2 µs, and
returns ``None`` for anything else (the caller then keeps ``jsonschema``).
Error messages always come from ``jsonschema``, and only on refusal.

Supported (JSON Schema 2020-12 semantics, each keyword applying only to its
instance type): boolean schemas, ``type``, ``enum``, ``const``,
``properties``, ``required``, ``additionalProperties``, ``items``,
``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern``,
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, and
annotation keywords.  ``tests/test_policy_fastschema.py`` checks agreement
with ``jsonschema`` on generated schemas and instances.
"""
from __future__ import annotations

import re
from typing import Any, Callable

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "deprecated",
                          "readOnly", "writeOnly", "$schema"})
_SUPPORTED = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items",
                        "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
                        "exclusiveMinimum", "exclusiveMaximum"}) | _ANNOTATIONS
_DIALECTS = frozenset({"https://json-schema.org/draft/2020-12/schema", "https://json-schema.org/draft/2020-12/schema#"})


class _Unsupported(Exception):
    pass


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_integer(x: Any) -> bool:
    # JSON Schema: 1.0 is an integer.
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and x.is_integer())


_TYPES: dict[str, Check] = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``, containers compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _nonneg_int(v: Any) -> int:
    if not _is_integer(v) or v < 0:
        raise _Unsupported
    return int(v)


def _num(v: Any) -> float:
    if not _is_number(v):
        raise _Unsupported
    return v


def _compile(schema: Any) -> Check:
    if schema is True:
        return lambda x: True
    if schema is False:
        return lambda x: False
    if not isinstance(schema, dict) or not set(schema) <= _SUPPORTED:
        raise _Unsupported
    if "$schema" in schema and schema["$schema"] not in _DIALECTS:
        raise _Unsupported
    checks: list[Check] = []
    names: list[Any] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not names or not all(isinstance(n, str) and n in _TYPES for n in names):
            raise _Unsupported
        preds = [_TYPES[n] for n in names]
        checks.append(preds[0] if len(preds) == 1 else (lambda x, ps=tuple(preds): any(p(x) for p in ps)))
    if "enum" in schema:
        if not isinstance(schema["enum"], list):
            raise _Unsupported
        options = tuple(schema["enum"])
        checks.append(lambda x: any(json_equal(x, o) for o in options))
    if "const" in schema:
        const = schema["const"]
        checks.append(lambda x: json_equal(x, const))
    by_type = {"object": _object_checks(schema), "array": _array_checks(schema),
               "string": _string_checks(schema), "number": _number_checks(schema)}
    if len(names) == 1 and names[0] in ("object", "string"):
        # One type: the other types' keywords cannot fail (they apply only to their own
        # type), and this type's checks may assume it: one closure does both.
        typed = _TYPED[names[0]](schema)
        if typed is not None:
            checks[0] = typed
        checks.extend(by_type[names[0]] if typed is None else ())
        return _all(checks)
    for extra in by_type.values():
        checks.extend(extra)
    return _all(checks)


def _all(checks: list[Check]) -> Check:
    if not checks:
        return lambda x: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda x: first(x) and second(x)
    fixed = tuple(checks)

    def every(x: Any) -> bool:
        for c in fixed:     # a loop, not all(genexpr): this runs on every call
            if not c(x):
                return False
        return True

    return every


def _object_checks(schema: dict[str, Any]) -> list[Check]:
    fields = _object_fields(schema)
    return [] if fields is None else [_object_check(fields, non_object=True)]


def _object_fields(schema: dict[str, Any]) -> tuple[dict[str, Check], Check, tuple[str, ...], bool] | None:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    extra = schema.get("additionalProperties", True)
    if not isinstance(props, dict) or not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _Unsupported
    if not props and not required and extra is True:
        return None
    return {k: _compile(v) for k, v in props.items()}, _compile(extra), tuple(required), extra is True


def _typed_object(schema: dict[str, Any]) -> Check | None:
    """``type: object`` and the object keywords in one closure (None: no object keywords)."""
    fields = _object_fields(schema)
    return None if fields is None else _object_check(fields, non_object=False)


def _object_check(fields: tuple[dict[str, Check], Check, tuple[str, ...], bool], non_object: bool) -> Check:
    """The object keywords as one closure; ``non_object`` is the verdict for a value that is
    not an object (True when ``type`` is not also ``object``: the keywords then do not apply)."""
    sub, extra_check, req, any_extra = fields

    def check(x: Any) -> bool:
        if not isinstance(x, dict):
            return non_object
        for key in req:
            if key not in x:
                return False
        for key, value in x.items():
            c = sub.get(key)
            if c is not None:
                if not c(value):
                    return False
            elif not any_extra and not extra_check(value):
                return False
        return True

    return check


def _array_checks(schema: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    if "items" in schema:
        item = _compile(schema["items"])
        out.append(lambda x: not isinstance(x, list) or all(item(v) for v in x))
    if "minItems" in schema:
        n = _nonneg_int(schema["minItems"])
        out.append(lambda x: not isinstance(x, list) or len(x) >= n)
    if "maxItems" in schema:
        m = _nonneg_int(schema["maxItems"])
        out.append(lambda x: not isinstance(x, list) or len(x) <= m)
    return out


def _string_fields(schema: dict[str, Any]) -> tuple[int | None, int | None, Any]:
    lo = _nonneg_int(schema["minLength"]) if "minLength" in schema else None
    hi = _nonneg_int(schema["maxLength"]) if "maxLength" in schema else None
    search = None
    if "pattern" in schema:
        if not isinstance(schema["pattern"], str):
            raise _Unsupported
        search = re.compile(schema["pattern"]).search
    return lo, hi, search


def _typed_string(schema: dict[str, Any]) -> Check | None:
    """``type: string`` and the string keywords in one closure (None: no string keywords)."""
    lo, hi, search = _string_fields(schema)
    if lo is None and search is None:
        if hi is None:
            return None
        return lambda x: isinstance(x, str) and len(x) <= hi
    if lo is None and hi is None:
        return lambda x: isinstance(x, str) and search(x) is not None

    def text(x: Any) -> bool:
        if not isinstance(x, str):
            return False
        if (lo is not None and len(x) < lo) or (hi is not None and len(x) > hi):
            return False
        return search is None or search(x) is not None

    return text


_TYPED = {"object": _typed_object, "string": _typed_string}


def _string_checks(schema: dict[str, Any]) -> list[Check]:
    lo, hi, search = _string_fields(schema)
    if lo is None and hi is None and search is None:
        return []

    def text(x: Any) -> bool:
        if not isinstance(x, str):
            return True
        if (lo is not None and len(x) < lo) or (hi is not None and len(x) > hi):
            return False
        return search is None or search(x) is not None

    return [text]


def _number_checks(schema: dict[str, Any]) -> list[Check]:
    lo = _num(schema["minimum"]) if "minimum" in schema else None
    hi = _num(schema["maximum"]) if "maximum" in schema else None
    xlo = _num(schema["exclusiveMinimum"]) if "exclusiveMinimum" in schema else None
    xhi = _num(schema["exclusiveMaximum"]) if "exclusiveMaximum" in schema else None
    if lo is None and hi is None and xlo is None and xhi is None:
        return []

    def bounds(x: Any) -> bool:
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            return True
        return ((lo is None or x >= lo) and (hi is None or x <= hi)
                and (xlo is None or x > xlo) and (xhi is None or x < xhi))

    return [bounds]


def compile_check(schema: Any) -> Check | None:
    """A yes/no validator for ``schema``, or None when it uses keywords outside the subset."""
    try:
        return _compile(schema)
    except (_Unsupported, re.error, TypeError):
        return None
